"""Model names and user weights for the commands: which registered name, which weights file, checked first.

The library behind `--model` / `--weights` of `effnet-timm predict` and `validate`: a name is a registered
architecture with one of its pretrained tags; user weights are a folder written by effnet-convert or a
safetensors file, checked (recorded digests, tensor names and shapes) before they are loaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from timm.models import PretrainedCfg, split_model_name_tag

from ..errors import InputError, first_line
from ..weights.integrity import verify_folder
from ..weights.tags import TAGS, family_cfg, pretrained_cfg

__all__ = ['known_tags', 'split_known_name', 'load_model']

# ----------------------------------------------------------------------------- model names


def known_tags(arch: str) -> list[str]:
    """The pretrained tags of ``arch``, its default first."""
    return [tag for tag, spec in TAGS.items() if arch in spec.variants]  # default first, as registered


def split_known_name(name: str) -> tuple[str, str]:
    """``(architecture, tag)`` of a registered effnet_timm model name; tag is '' when not given."""
    arch, tag = split_model_name_tag(name)
    known = timm.list_models('effnet_v1*')
    if arch not in known:
        raise InputError(f"unknown model '{name}' (known: {', '.join(known)})")
    if tag and tag not in known_tags(arch):
        raise InputError(f"{arch} has no pretrained tag '{tag}' (tags: {', '.join(known_tags(arch)) or 'none'})")
    return arch, tag


# ----------------------------------------------------------------------------- weights


def load_model(model_name: str | None, weights: Path | None) -> torch.nn.Module:
    """The eval-mode model for ``--model`` / ``--weights`` (see the ``predict`` help).

    User weights are a folder written by effnet-convert or a safetensors file. What the conversion recorded
    wins over the registry: the folder's config.json sets the architecture arguments and the preprocessing
    (input size, crop, mean/std), the file's metadata sets the variant and the tag. A ``--model`` that
    contradicts them is an error; a ``--model`` tag on weights converted without one brings its mean/std.
    A ``model.safetensors`` beside a ``config.json`` is read as that folder. Recorded file digests are
    checked before the weights are read.
    """
    if weights is None:
        if model_name is None:
            raise InputError('give --model, --weights, or both')
        split_known_name(model_name)
        return timm.create_model(model_name, pretrained=True).eval()
    file, folder = _weights_paths(weights)
    config = _folder_config(folder) if folder is not None else None
    if folder is not None:
        verify_folder(folder)  # a flipped byte must not become silently different logits
    metadata = _safetensors_metadata(file)
    arch, tag = _resolve_name(model_name, weights, file, config, metadata)
    model_args = config.get('model_args', {}) if config is not None else _metadata_model_args(arch, metadata)
    cfg = _weights_cfg(arch, tag, config, file, user_tag=not metadata.get('tag'))
    if config is None and arch == 'effnet_v1' and metadata.get('family'):
        cfg.update(family_cfg(metadata['family']))  # a generic Lite/EdgeTPU/CondConv: its family's preprocessing
    try:
        model = timm.create_model(arch, pretrained=False, pretrained_cfg=cfg, **model_args)
    except (TypeError, ValueError) as err:
        raise InputError(
            f'{_config_or_file(folder, file)}: cannot build {arch} from {model_args}: {first_line(err)}'
        ) from None
    _load_weights(model, file, arch)
    return model.eval()


def _config_or_file(folder: Path | None, file: Path) -> Path:
    return folder / 'config.json' if folder is not None else file


def _weights_paths(weights: Path) -> tuple[Path, Path | None]:
    """(the safetensors file, its converted folder or None)."""
    if weights.is_dir():
        if not (weights / 'config.json').is_file():
            raise InputError(f'{weights}: no config.json (not a folder written by effnet-convert)')
        file = weights / 'model.safetensors'
        if not file.is_file():
            raise InputError(f'{weights}: no model.safetensors (not a folder written by effnet-convert)')
        return file, weights
    if not weights.is_file():
        raise InputError(f'{weights}: no such file or folder')
    if weights.name == 'model.safetensors' and (weights.parent / 'config.json').is_file():
        return weights, weights.parent
    return weights, None


def _folder_config(folder: Path) -> dict[str, Any]:
    path = folder / 'config.json'
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f'{path}: unreadable: {first_line(err)}') from None
    if not isinstance(config, dict):
        raise InputError(f'{path}: not a timm config (a JSON object)')
    if config.get('architecture') not in timm.list_models('effnet_v1*'):
        raise InputError(f"{folder}: holds '{config.get('architecture')}', not an effnet_timm model")
    return config


def _safetensors_metadata(file: Path) -> dict[str, str]:
    try:
        with safe_open(str(file), framework='pt') as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(
            f'{file}: not a safetensors file ({first_line(err)}); --weights takes the '
            f'model.safetensors written by effnet-convert, or its folder'
        ) from None


def _resolve_name(
    model_name: str | None, weights: Path, file: Path, config: dict[str, Any] | None, metadata: dict[str, str]
) -> tuple[str, str]:
    """(architecture, tag) from --model checked against what the conversion recorded."""
    recorded_arch = (config or {}).get('architecture') or metadata.get('variant') or None
    recorded_tag = metadata.get('tag') or ''
    if model_name is None:
        if recorded_arch is None:
            raise InputError(f'{file}: records no architecture (not written by effnet-convert): give --model')
        arch, tag = split_known_name(recorded_arch)
    else:
        arch, tag = split_known_name(model_name)
        if recorded_arch is not None and arch != recorded_arch:
            raise InputError(f'{weights} holds {recorded_arch}, not {arch}')
    if tag and recorded_tag and tag != recorded_tag:
        raise InputError(f'{file} was converted with --tag {recorded_tag}, but --model asks for tag {tag}')
    tag = tag or recorded_tag
    if tag and tag not in known_tags(arch):
        raise InputError(
            f"{file}: recorded tag '{tag}' is not a tag of {arch} (tags: {', '.join(known_tags(arch)) or 'none'})"
        )
    return arch, tag


def _metadata_model_args(arch: str, metadata: dict[str, str]) -> dict[str, Any]:
    # The generic architecture needs its scale; a named variant fixes it.
    if arch != 'effnet_v1' or not metadata.get('width_coefficient'):
        return {}
    try:
        args: dict[str, Any] = dict(
            width_coefficient=float(metadata['width_coefficient']),
            depth_coefficient=float(metadata['depth_coefficient']),
        )
        if metadata.get('family'):  # recorded by the converter for Lite/EdgeTPU/CondConv
            args.update(family=metadata['family'], num_experts=int(metadata.get('num_experts') or 0))
        return args
    except (KeyError, ValueError):
        raise InputError(
            f'safetensors metadata: width/depth coefficients {metadata.get("width_coefficient")!r}/'
            f'{metadata.get("depth_coefficient")!r} are not numbers'
        ) from None


_CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(PretrainedCfg))
_NORMALIZATION = ('mean', 'std')


def _weights_cfg(arch: str, tag: str, config: dict[str, Any] | None, file: Path, user_tag: bool) -> dict[str, Any]:
    """The pretrained cfg of user weights: the tag's (or the architecture's), then the folder's config.json."""
    cfg = pretrained_cfg(arch, tag or None)
    if config is not None:
        folder_cfg = {k: v for k, v in (config.get('pretrained_cfg') or {}).items() if k in _CFG_FIELDS}
        if tag and user_tag:  # converted without a tag: the --model tag brings its normalization
            folder_cfg = {k: v for k, v in folder_cfg.items() if k not in _NORMALIZATION}
        cfg.update(folder_cfg)
    for key in ('hf_hub_id', 'url', 'hf_hub_filename', 'state_dict'):
        cfg.pop(key, None)  # these weights, never the Hub's
    cfg.update(architecture=arch, tag=tag or None, file=str(file))
    return cfg


def _apply_label_offset(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's `label_offset` convention (as its `load_pretrained`): the file has `offset` leading classes the
    model does not (EdgeTPU's background logit), which are dropped."""
    offset = (getattr(model, 'pretrained_cfg', None) or {}).get('label_offset') or 0
    weight = state.get('classifier.weight')
    if offset and weight is not None and weight.shape[0] == model.num_classes + offset:
        state = dict(state, **{k: state[k][offset:] for k in ('classifier.weight', 'classifier.bias')})
    return state


def _load_weights(model: torch.nn.Module, file: Path, arch: str) -> None:
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f'{file}: unreadable: {first_line(err)}') from None
    state = _apply_label_offset(state, model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    found = {k: tuple(v.shape) for k, v in state.items() if not k.endswith('num_batches_tracked')}
    problems = [f'{k} missing' for k in expected if k not in found]
    problems += [f'{k} unexpected' for k in found if k not in expected]
    problems += [
        f'{k} is {list(found[k])}, the model has {list(shape)}'
        for k, shape in expected.items()
        if k in found and found[k] != shape
    ]
    if problems:
        more = f' (+{len(problems) - 1} more)' if len(problems) > 1 else ''
        raise InputError(f'{file}: its tensors do not fit {arch}: {problems[0]}{more}')
    model.load_state_dict(state, strict=False)  # keys were checked above; BN counters are not stored
