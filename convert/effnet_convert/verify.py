"""`--verify`: the converted model against a TensorFlow computation of the same checkpoint, on photos."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

SAMPLES = sorted((Path(__file__).resolve().parent / 'samples').glob('*.jpg'))
# fp32 TF and PyTorch sum in different orders; deep variants drift more (B7 ~1e-4 of the largest logit).
REL_TOL = 2e-4


def verify_against_tensorflow(
    model: torch.nn.Module,
    weights,
    images: Sequence[Path] | None = None,
    rel_tol: float = REL_TOL,
) -> dict[str, object]:
    """Logits of `model` vs TensorFlow's official graph on the same preprocessed photos."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise CheckpointError(
            '--verify needs TensorFlow, which is not installed (pip install "effnet-timm[test]"); nothing was verified'
        ) from None
    import timm

    from effnet_timm.data.preprocessing import preprocess_batch

    from .tf_reference import tf_graph_logits

    arch = weights.architecture
    if arch.family != 'efficientnet':
        raise CheckpointError(
            f'--verify: the TensorFlow reference graph is the B-series one; {arch.family} checkpoints are checked '
            f'against the official fixtures in the tests instead; nothing was verified'
        )
    paths = list(images or SAMPLES)
    batch = preprocess_batch([str(p) for p in paths], timm.data.resolve_data_config({}, model=model))
    with torch.inference_mode():
        ours = model.eval()(batch).numpy()
    reference = tf_graph_logits(weights.official, arch.scope, batch.permute(0, 2, 3, 1).numpy(), arch.width, arch.depth)
    return compare_logits(ours, reference, rel_tol, 'TensorFlow official graph (tf.nn)', [p.name for p in paths])


def compare_logits(
    ours: np.ndarray, reference: np.ndarray, rel_tol: float, reference_name: str, image_names: list[str]
) -> dict[str, object]:
    max_abs = float(np.abs(ours - reference).max())
    max_rel = max_abs / float(np.abs(reference).max())
    top5_ours, top5_ref = np.argsort(-ours, 1)[:, :5], np.argsort(-reference, 1)[:, :5]
    identical = int((top5_ours == top5_ref).all(1).sum())
    return dict(
        reference=reference_name,
        images=len(image_names),
        image_names=image_names,
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        rel_tolerance=rel_tol,
        top5_identical=identical,
        passed=bool(max_rel <= rel_tol and identical == len(image_names)),
    )
