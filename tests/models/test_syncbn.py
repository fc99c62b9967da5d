"""SyncBatchNorm conversion (torch's and timm's) must leave the model computing the same function.

Both converters replace every `_BatchNorm` module with a `SyncBatchNorm` (torch's keeps nothing else the
module did), so the Swish must live outside the norm modules. SyncBatchNorm's synchronised training
forward needs CUDA and a process group; here (CPU, one process) its structure, eval function, single-process
training gradients and the state dict are checked.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import timm
import timm.layers
import torch
from conftest import realistic_init_

import effnet_timm  # noqa: F401  (registers the models)
from effnet_timm.models.fusion import fuse

CONVERTERS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    'torch': torch.nn.SyncBatchNorm.convert_sync_batchnorm,
    'timm': timm.layers.convert_sync_batchnorm,
}


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng():
        yield


@pytest.fixture(scope='module')
def b0() -> torch.nn.Module:
    with torch.random.fork_rng():
        model = timm.create_model('effnet_v1_b0', drop_rate=0.0, drop_path_rate=0.0)
        return realistic_init_(model, calib_size=64).eval()


def _timm_b0(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = timm.create_model('tf_efficientnet_b0', drop_rate=0.0, drop_path_rate=0.0)
    model.load_state_dict(state)  # strict: the same keys
    return model


def _input(*size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(sum(size)))


def _count(model: torch.nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize('converter', list(CONVERTERS))
def test_converted_model_has_syncbn_and_every_swish(b0, converter):
    converted = CONVERTERS[converter](copy.deepcopy(b0))
    norms = _count(b0, torch.nn.BatchNorm2d)
    assert norms == 49  # B0: stem, head, 16 blocks' 2 or 3
    assert _count(converted, torch.nn.SyncBatchNorm) == norms
    assert _count(converted, torch.nn.BatchNorm2d) == 0
    # Every Swish is still there: 33 after BatchNorms, 16 inside the SE modules.
    assert _count(converted, torch.nn.SiLU) == _count(b0, torch.nn.SiLU) == 33 + 16
    assert list(converted.state_dict()) == list(b0.state_dict())


@pytest.mark.parametrize('converter', list(CONVERTERS))
def test_converted_model_gives_the_original_eval_logits(b0, converter):
    converted = CONVERTERS[converter](copy.deepcopy(b0)).eval()
    reference = _timm_b0(b0.state_dict()).eval()
    x = _input(64, 65)
    with torch.no_grad():
        got, ours, ref = converted(x), b0(x), reference(x)
    assert ref.abs().max() > 1
    torch.testing.assert_close(got, ours, rtol=0, atol=0)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # fuse() folds a SyncBatchNorm as it folds the BatchNorm it replaced
        fused = fuse(converted)(x)
        torch.testing.assert_close(fused, fuse(b0)(x), rtol=0, atol=0)
    assert (fused - ref).abs().max() <= 2e-5 * ref.abs().max()


@pytest.mark.parametrize('converter', list(CONVERTERS))
def test_converted_model_trains_with_plain_autograd_gradients(b0, converter):
    """One process and no process group: SyncBatchNorm normalises locally, so timm's model is the reference.
    No recipe is recorded after a SyncBatchNorm (its statistics are not ours to fold), so this is exact."""
    converted = CONVERTERS[converter](copy.deepcopy(b0)).train()
    reference = _timm_b0(b0.state_dict()).train()
    x = _input(64, 64)
    grads = []
    for model in (converted, reference):
        model(x).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    scale = torch.cat([g.flatten() for g in grads[1].values()]).norm()
    for name, g in grads[0].items():
        assert (g - grads[1][name]).norm() <= 1e-3 * grads[1][name].norm() + 1e-5 * scale, name


def test_timm_tf_efficientnet_weights_load_strictly():
    theirs = timm.create_model('tf_efficientnet_b0')
    ours = timm.create_model('effnet_v1_b0')
    result = ours.load_state_dict(theirs.state_dict(), strict=True)  # raises on any missing/unexpected key
    assert not result.missing_keys and not result.unexpected_keys
    assert list(ours.state_dict()) == list(theirs.state_dict())
