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


def batch_norm_stand_in(model: torch.nn.Module) -> torch.nn.Module:
    """Every SyncBatchNorm replaced by a plain `nn.BatchNorm2d` with its state: what a converted model computes
    in one process, and what it can run under gloo on CPU (SyncBatchNorm's synchronised forward needs CUDA)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.SyncBatchNorm):
            plain = torch.nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine)
            plain.load_state_dict(module.state_dict())
            parent, _, attr = name.rpartition('.')
            setattr(model.get_submodule(parent), attr, plain.train(module.training))
    return model


def _checkpoint_stages(model: torch.nn.Module) -> torch.nn.Module:
    from effnet_timm.models.recompute import checkpoint

    stages = model.blocks

    def forward(x: torch.Tensor) -> torch.Tensor:
        for stage in stages:
            x = checkpoint(stage, x)
        return x

    stages.forward = forward
    return model


@pytest.mark.parametrize(
    'stand_in,per', [(False, 'block'), (True, 'stage')], ids=['syncbn-per_block', 'plain_bn_stand_in-per_stage']
)
def test_converted_model_checkpointed_leaves_buffers_and_gradients_as_a_plain_step(b0, stand_in, per):
    """Gradient checkpointing re-runs the converted model's BatchNorms (torch's modules, not ours) in backward:
    they must not update their running statistics twice. Reference: timm's tf_efficientnet_b0 (momentum set to
    TF's 0.01) in a plain step, and the converted model itself without checkpointing."""
    converted = timm.layers.convert_sync_batchnorm(copy.deepcopy(b0))
    if stand_in:
        converted = batch_norm_stand_in(converted)
    plain = copy.deepcopy(converted)
    if per == 'block':
        converted.set_grad_checkpointing(True)
    else:
        _checkpoint_stages(converted)
    reference = _timm_b0(b0.state_dict())
    for m in reference.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.01
    x = _input(64, 64, batch=4)
    steps = []
    for model in (converted, plain, reference):
        model.train()(x).square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        steps.append((grads, {n: b.clone() for n, b in model.named_buffers()}))
    (grads, buffers), (plain_grads, plain_buffers), (_, ref_buffers) = steps
    advanced = {int(b - b0.state_dict()[n]) for n, b in buffers.items() if n.endswith('num_batches_tracked')}
    assert advanced == {1}, f'num_batches_tracked advanced by {advanced} in one step'
    changed = [n for n, b in buffers.items() if not torch.equal(b, ref_buffers[n])]
    assert not changed, f'{len(changed)} of {len(buffers)} buffers differ from a plain step, e.g. {changed[:3]}'
    assert not [n for n, b in plain_buffers.items() if not torch.equal(b, ref_buffers[n])]
    assert not [n for n, g in grads.items() if not torch.equal(g, plain_grads[n])]
