"""Shared paths and helpers for the test suite."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import pytest
import torch

# Keep test runs hermetic: no telemetry, no accidental Hub traffic, a private cache.
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')
os.environ.setdefault('HF_HUB_DISABLE_XET', '1')

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / 'fixtures'
SHARED = REPO.parent / 'shared'
OFFICIAL = SHARED / 'fixtures' / 'official'
MANIFESTS = OFFICIAL / 'manifests'
# The scaled-down official checkpoint and the sample photos ship in the package; tests use those copies.
TINY_CKPT = REPO / 'convert' / 'demo' / 'efficientnet-tiny' / 'model.ckpt'
SAMPLES = REPO / 'convert' / 'samples'

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope='session')
def converted_tiny(tmp_path_factory) -> Path:
    """The demo checkpoint converted once at 96 px. Tests read it or copy it; none may edit it."""
    from effnet_convert.converter import convert
    folder = tmp_path_factory.mktemp('converted') / 'effnet_v1'
    convert(str(TINY_CKPT.parent), folder, image_size=96)
    return folder


@pytest.fixture(scope='session')
def tf():
    """TensorFlow, the test oracle (the `test` extra)."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    return pytest.importorskip('tensorflow', reason='TensorFlow (the test oracle) is not installed')


def save_v2(tf, prefix: Path, tensors: dict) -> Path:
    """Write a bundle with the SaveV2 op, as tf.compat.v1.train.Saver does, without building a graph."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[''] * len(names),
                      tensors=list(tensors.values()))
    return prefix


def shared_path(*parts: str) -> Path:
    """A file from ../shared, or skip the test with the reason."""
    path = OFFICIAL.joinpath(*parts)
    if not path.exists():
        pytest.skip(f'{path} is absent (../shared is not beside this checkout)')
    return path


def load_manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def realistic_init_(model: torch.nn.Module, calib_size: int = 128, seed: int = 0,
                    calib_input: Optional[torch.Tensor] = None) -> torch.nn.Module:
    """Give a model weights whose activations look trained: per-channel scaled kernels, random BN affine,
    BN statistics calibrated on one batch (as the official fixtures are made). Small-variance channels
    are what make BN eps and padding mistakes visible in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 4:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                scale = torch.exp(torch.empty(p.shape[0], 1, 1, 1).uniform_(-3.0, 0.7, generator=g))
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5 * scale)
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 3 / p.shape[1] ** 0.5)
            elif name.endswith('weight'):  # BN gamma
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            else:  # BN beta, conv/linear bias
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one batch sets the statistics exactly
        x = calib_input if calib_input is not None else torch.randn(
            4, 3, calib_size, calib_size, generator=g)
        model.train()
        model(x)
        model.eval()
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
    return model
