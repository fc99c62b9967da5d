"""The converter seam: first use turns an official TF checkpoint into weights without importing effnet_convert.

Dependencies run one way. `effnet_convert` (convert/, the TF-free converter) imports `effnet_timm` (the model,
the tag table, the integrity records); `effnet_timm` never imports `effnet_convert`. When the weights cache
needs a conversion it asks for a converter by entry point: the group `effnet_timm.converters`, the name
`tf-checkpoint`, which pyproject.toml points at `effnet_convert.converter:convert`. Another converter can be
installed under that name by another distribution, with the same signature and errors (`InputError` subclasses,
effnet_timm.errors).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

__all__ = ['ENTRY_POINT_GROUP', 'TF_CHECKPOINT', 'tf_checkpoint_converter']

ENTRY_POINT_GROUP = 'effnet_timm.converters'
TF_CHECKPOINT = 'tf-checkpoint'
# What pyproject.toml registers; used as is by an install made before the entry point existed (its metadata
# lists no converter), so that such a checkout still converts on first use.
DEFAULT = 'effnet_convert.converter:convert'


def tf_checkpoint_converter() -> Callable[..., Any]:
    """`convert(source, out_dir, variant=..., tag=...)` of the installed official-checkpoint converter."""
    found = entry_points(group=ENTRY_POINT_GROUP, name=TF_CHECKPOINT)
    entry = next(iter(found), None) or EntryPoint(TF_CHECKPOINT, DEFAULT, ENTRY_POINT_GROUP)
    return entry.load()
