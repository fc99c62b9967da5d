"""The shortcuts must compute what plain PyTorch computes, wherever a user can reach them.

Training gradients of the memory-lean path (recomputation from recipes) under in-place edits and double
backward, tracing and legacy ONNX export at the other size parity, `fuse()` at other dtypes, and the
memory-efficient switch. References are independent of our code: timm's `tf_efficientnet_b0` with the same
weights (plain autograd, TF padding of its own), or PyTorch itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import timm
import torch
from conftest import realistic_init_

import effnet_timm  # noqa: F401  (registers the models)
from effnet_timm.models.fusion import fuse


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng():
        yield


HALF = dict(width_coefficient=0.5, depth_coefficient=0.5)  # every block shape, a quarter of B0's work


def _timm_tf(width: float, depth: float) -> torch.nn.Module:
    """timm's tf_efficientnet at any scale: its B0 definition with TF's eps and 'same' padding."""
    if (width, depth) == (1.0, 1.0):
        return timm.create_model('tf_efficientnet_b0', drop_rate=0.0, drop_path_rate=0.0)
    from timm.models.efficientnet import _gen_efficientnet

    return _gen_efficientnet(
        'tf_efficientnet_b0',
        channel_multiplier=width,
        depth_multiplier=depth,
        pretrained=False,
        bn_eps=1e-3,
        pad_type='same',
        drop_rate=0.0,
        drop_path_rate=0.0,
    )


def _state(**scale) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():
        model = timm.create_model('effnet_v1', **scale, drop_rate=0.0, drop_path_rate=0.0)
        return realistic_init_(model, calib_size=64).state_dict()


@pytest.fixture(scope='module')
def half_state() -> dict[str, torch.Tensor]:
    return _state(**HALF)


def _pair(state: dict[str, torch.Tensor], width: float = 0.5, depth: float = 0.5, **kwargs) -> tuple:
    """Ours and timm's tf_efficientnet (the independent reference) with the same weights."""
    ours = timm.create_model(
        'effnet_v1', width_coefficient=width, depth_coefficient=depth, drop_rate=0.0, drop_path_rate=0.0, **kwargs
    )
    theirs = _timm_tf(width, depth)
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    return ours, theirs


def _input(*size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(sum(size)))


def _grads(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss_fn(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rel: float = 1e-3) -> None:
    assert got.keys() == ref.keys()
    # Some gradients are float noise (a bias followed by a training BatchNorm): absolute slack for those.
    atol = 1e-5 * torch.cat([g.flatten() for g in ref.values()]).norm()
    errors = {
        name: float((g - ref[name]).norm() / ref[name].norm())
        for name, g in got.items()
        if (g - ref[name]).norm() > rel * ref[name].norm() + atol
    }
    assert not errors, errors


def _mask_hook(seed: int) -> Callable:
    def hook(module, inputs, out):
        mask = torch.rand(out.shape[1], generator=torch.Generator().manual_seed(seed)) * 2
        out.mul_(mask[:, None, None].to(out.dtype))  # in place, as a pruning or masking hook would

    return hook


# --- 1. in-place edits of recomputable tensors ----------------------------------------------------------

# (our module, timm's module with the same output): our BatchNorms are separate from their Swish, timm's
# BatchNormAct2d applies `drop` (Identity) between them.
HOOK_POINTS = [
    ('act1', 'bn1'),  # stem BN+Swish output
    ('bn1', 'bn1.drop'),  # stem BN output, before Swish
    ('blocks.0.0.act1', 'blocks.0.0.bn1'),  # DepthwiseSeparable
    ('blocks.0.0.se', 'blocks.0.0.se'),
    ('blocks.1.0.bn1', 'blocks.1.0.bn1.drop'),  # InvertedResidual expand BN, before Swish
    ('blocks.1.0.act1', 'blocks.1.0.bn1'),
    ('blocks.1.0.act2', 'blocks.1.0.bn2'),  # stride-2 depthwise
    ('blocks.1.0.se', 'blocks.1.0.se'),
    ('blocks.1.0.bn3', 'blocks.1.0.bn3'),  # projection BN (no activation)
    ('blocks.3.1', 'blocks.3.1'),  # block output (residual)
    ('act2', 'bn2'),  # head: the forward_features output
]


@pytest.mark.parametrize('ours_name,timm_name', HOOK_POINTS)
def test_forward_hook_editing_an_output_in_place_gives_plain_autograd_gradients(half_state, ours_name, timm_name):
    ours, theirs = _pair(half_state)
    x = _input(64, 64)
    ours.get_submodule(ours_name).register_forward_hook(_mask_hook(1))
    theirs.get_submodule(timm_name).register_forward_hook(_mask_hook(1))
    loss = lambda m: m.train()(x).square().mean()  # noqa: E731
    _assert_same_grads(_grads(ours, loss), _grads(theirs, loss))


def test_forward_features_output_edited_in_place_and_fed_on(half_state):
    """Features edited in place, then read by the head and by a second network (a two-stage model), whose
    own training forward keeps what it reads: it must keep the edited values."""
    ours, theirs = _pair(half_state)
    channels = ours.num_features
    second_ours = timm.create_model(
        'effnet_v1',
        width_coefficient=0.25,
        depth_coefficient=0.25,
        in_chans=channels,
        num_classes=10,
        drop_rate=0.0,
        drop_path_rate=0.0,
    )
    from timm.models.efficientnet import _gen_efficientnet

    second_theirs = _gen_efficientnet(
        'tf_efficientnet_b0',
        channel_multiplier=0.25,
        depth_multiplier=0.25,
        pretrained=False,
        bn_eps=1e-3,
        pad_type='same',
        in_chans=channels,
        num_classes=10,
        drop_rate=0.0,
        drop_path_rate=0.0,
    )
    second_theirs.load_state_dict(second_ours.state_dict())
    x = _input(96, 96)
    mask = (torch.rand(channels, generator=torch.Generator().manual_seed(0)) > 0.5).float()[:, None, None]

    def loss(both: torch.nn.Module) -> torch.Tensor:
        feats = both.first.train().forward_features(x)
        feats.mul_(mask)
        return both.first.forward_head(feats).square().mean() + both.second.train()(feats).square().mean()

    pair = [
        torch.nn.ModuleDict(dict(first=first, second=second))
        for first, second in ((ours, second_ours), (theirs, second_theirs))
    ]
    _assert_same_grads(_grads(pair[0], loss), _grads(pair[1], loss))


def test_editing_a_tensor_backward_needs_fails_as_in_plain_autograd(half_state):
    """A forward hook that edits a BatchNorm's input after the BatchNorm kept it: autograd raises (it cannot
    know the old value); so must we, not silently use the new value."""

    def edit_input(module, inputs, out):
        inputs[0].mul_(2)

    for model in _pair(half_state):
        model.blocks[1][0].bn2.register_forward_hook(edit_input)
        loss = model.train()(_input(64, 64)).square().mean()
        with pytest.raises(RuntimeError, match='modified by an inplace operation|modified in place'):
            loss.backward()


def test_gradient_penalty_double_backward_gives_plain_autograd_gradients(half_state):
    ours, theirs = _pair(half_state)
    x = _input(64, 64).requires_grad_()

    def penalty(m: torch.nn.Module) -> torch.Tensor:
        out = m.train()(x).square().mean()
        (grad_x,) = torch.autograd.grad(out, x, create_graph=True)
        return out + grad_x.square().sum() * 1e3

    _assert_same_grads(_grads(ours, penalty), _grads(theirs, penalty), rel=2e-3)


# --- 4. the memory-efficient switch ---------------------------------------------------------------------


def _bytes_kept_by_forward(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(x)
    del out
    return sum(event.self_cpu_memory_usage for event in prof.key_averages())


def test_set_memory_efficient_switches_to_plain_autograd_and_back(half_state):
    ours, theirs = _pair(half_state)
    ours.train(), theirs.train()
    x = _input(96, 96)
    kept_timm = _bytes_kept_by_forward(theirs, x)
    assert _bytes_kept_by_forward(ours, x) <= 0.4 * kept_timm
    ours.set_memory_efficient(False)
    assert _bytes_kept_by_forward(ours, x) >= 0.9 * kept_timm
    ours.set_memory_efficient(True)
    assert _bytes_kept_by_forward(ours, x) <= 0.4 * kept_timm


def test_create_model_passes_memory_efficient_through(half_state):
    lean = timm.create_model('effnet_v1_b0', drop_path_rate=0.0).train()
    plain = timm.create_model('effnet_v1_b0', drop_path_rate=0.0, memory_efficient=False).train()
    assert lean.memory_efficient and not plain.memory_efficient
    x = _input(96, 96)
    assert _bytes_kept_by_forward(lean, x) <= 0.5 * _bytes_kept_by_forward(plain, x)


# --- 2. tracing and the legacy (TorchScript-based) ONNX exporter ------------------------------------------


@pytest.fixture(scope='module')
def b0_eval() -> tuple:
    ours, theirs = _pair(_state(), width=1.0, depth=1.0)
    return ours.eval(), theirs.eval()


@pytest.fixture(scope='module')
def half_eval(half_state) -> tuple:
    ours, theirs = _pair(half_state)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize('trace_size,run_size', [(64, 65), (65, 64), (64, 64)])
def test_traced_model_is_exact_at_the_other_size_parity(b0_eval, trace_size, run_size):
    ours, theirs = b0_eval
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        traced = torch.jit.trace(ours, _input(trace_size, trace_size, batch=1), check_trace=False)
    x = _input(run_size, run_size + 2, batch=1)
    with torch.no_grad():
        got, eager, ref = traced(x), ours(x), theirs(x)
    assert ref.abs().max() > 1
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_legacy_onnx_export_with_dynamic_axes_is_exact_at_the_other_parity(half_eval, tmp_path):
    pytest.importorskip('onnx', reason='ONNX export check needs `pip install onnx onnxruntime`')
    ort = pytest.importorskip('onnxruntime', reason='ONNX parity needs `pip install onnxruntime`')
    ours, _ = half_eval
    path = tmp_path / 'half.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(
            ours,
            (_input(64, 64, batch=1),),
            str(path),
            dynamo=False,
            input_names=['x'],
            output_names=['logits'],
            dynamic_axes={'x': {0: 'n', 2: 'h', 3: 'w'}},
        )
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for size in [(65, 65), (64, 67), (66, 64)]:
        x = _input(*size, batch=1)
        got = torch.from_numpy(session.run(None, {'x': x.numpy()})[0])
        with torch.no_grad():
            ref = ours(x)
        assert ref.abs().max() > 1
        assert (got - ref).abs().max() <= 1e-4, size


# --- 3. fuse() keeps the model's dtype and device -------------------------------------------------------


@pytest.fixture(scope='module')
def tiny_state() -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():
        model = timm.create_model('effnet_v1', width_coefficient=0.25, depth_coefficient=0.25, drop_path_rate=0.0)
        return realistic_init_(model, calib_size=64).state_dict()


def _tiny(state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    model = timm.create_model('effnet_v1', width_coefficient=0.25, depth_coefficient=0.25, drop_path_rate=0.0)
    model.load_state_dict(state)
    return model.to(dtype).eval()


def _fp16_conv_runs_on_cpu() -> bool:
    try:
        torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3, dtype=torch.half), torch.ones(1, 1, 1, 1, dtype=torch.half))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.bfloat16, 0.1), (torch.float16, 2e-2)])
def test_fuse_keeps_dtype_and_device_and_matches_unfused(tiny_state, dtype, tol):
    model = _tiny(tiny_state, dtype)
    fused = fuse(model)
    tensors = list(fused.named_parameters()) + list(fused.named_buffers())
    wrong = [(n, t.dtype, t.device) for n, t in tensors if t.is_floating_point() and t.dtype != dtype]
    assert not wrong
    assert {t.device for _, t in tensors} == {torch.device('cpu')}
    if dtype == torch.float16 and not _fp16_conv_runs_on_cpu():
        pytest.skip('this CPU build has no float16 conv (dtypes checked above)')
    x = _input(65, 64).to(dtype)
    with torch.inference_mode():
        got, ref = fused(x), model(x)
        exact = _tiny(tiny_state, torch.float64)(x.double())
    assert got.dtype == dtype
    assert exact.abs().max() > 1
    # Folding in float64 then rounding once is no further from the float64 model than the unfused model is.
    scale = exact.abs().max()
    assert (got.double() - ref.double()).abs().max() <= tol * scale
    assert (got.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-9 * scale


def test_batchnorm_hook_output_is_not_overwritten_by_swish_under_no_grad(half_state):
    """A hook that keeps `bn1`'s output (no clone) must still hold BatchNorm's values after the forward:
    an in-place Swish under no_grad used to overwrite them with the Swish of them."""
    ours, _ = _pair(half_state)
    ours.eval()
    kept = {}
    ours.conv_stem.register_forward_hook(lambda m, i, o: kept.__setitem__('conv', o.clone()))
    ours.bn1.register_forward_hook(lambda m, i, o: kept.__setitem__('bn', o))
    with torch.no_grad():
        ours(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    bn = ours.bn1
    expected = torch.nn.functional.batch_norm(
        kept['conv'], bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
    )
    assert expected.min() < -1.0  # below Swish's minimum (-0.28): an overwrite cannot pass unnoticed
    torch.testing.assert_close(kept['bn'], expected, rtol=1e-5, atol=1e-5)


# --- 5. gradient checkpointing leaves BatchNorm buffers as a plain step ---------------------------------


def _stages_checkpointed_by_torch(model: torch.nn.Module) -> torch.nn.Module:
    """Each stage checkpointed from outside by torch's own checkpoint (timm's `checkpoint_seq`)."""
    from timm.models import checkpoint_seq

    stages = model.blocks
    stages.forward = lambda x: checkpoint_seq(stages, x)
    return model


def _stages_checkpointed_by_ours(model: torch.nn.Module) -> torch.nn.Module:
    """Each stage checkpointed from outside by `effnet_timm.models.recompute.checkpoint`."""
    from effnet_timm.models.recompute import checkpoint

    stages = model.blocks

    def forward(x: torch.Tensor) -> torch.Tensor:
        for stage in stages:
            x = checkpoint(stage, x)
        return x

    stages.forward = forward
    return model


CHECKPOINTING: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    'block': lambda m: (m.set_grad_checkpointing(True), m)[1],  # what timm's train.py --grad-checkpointing sets
    'stage_torch': _stages_checkpointed_by_torch,
    'stage_ours': _stages_checkpointed_by_ours,
}


def _train_step(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict, dict]:
    grads = _grads(model.train(), lambda m: m(x).square().mean())
    return grads, {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize('how', list(CHECKPOINTING))
def test_checkpointed_training_step_leaves_batchnorm_buffers_as_a_plain_step(half_state, how):
    """The recomputation in backward re-runs every training BatchNorm; it must not update the running statistics
    a second time. Reference: timm's tf_efficientnet (TF's decay 0.99, momentum 0.01) in a plain step."""
    ours, theirs = _pair(half_state)
    for m in theirs.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.01  # timm keeps PyTorch's 0.1 for tf_* models; TF's (and ours) is 0.01
    x = _input(64, 64, batch=4)
    plain = timm.create_model('effnet_v1', **HALF, drop_rate=0.0, drop_path_rate=0.0, memory_efficient=False)
    plain.load_state_dict(half_state)
    ref_grads, ref_buffers = _train_step(theirs, x)
    plain_grads, plain_buffers = _train_step(plain, x)
    ours.set_memory_efficient(False)  # as checkpointing does (from outside, the stem and head would be lean)
    grads, buffers = _train_step(CHECKPOINTING[how](ours), x)
    assert buffers.keys() == ref_buffers.keys()
    steps = {int(b - half_state[n]) for n, b in buffers.items() if n.endswith('num_batches_tracked')}
    assert steps == {1}, f'num_batches_tracked advanced by {steps} in one step'
    changed = [n for n, b in buffers.items() if not torch.equal(b, ref_buffers[n])]
    assert not changed, f'{len(changed)} of {len(buffers)} buffers differ from a plain step, e.g. {changed[:3]}'
    assert not [n for n in plain_buffers if not torch.equal(plain_buffers[n], ref_buffers[n])]
    # Gradients: bit-equal to our plain-autograd step (the same kernels), close to timm's.
    assert not [n for n, g in grads.items() if not torch.equal(g, plain_grads[n])]
    _assert_same_grads(grads, ref_grads)


# --- 6. a batch of one per channel -----------------------------------------------------------------------


def test_training_batch_of_one_per_channel_raises_as_plain_batchnorm(half_state):
    """A 32 px image alone leaves one value per channel at the 1x1 head: plain BatchNorm raises; the memory-lean
    BatchNorm used to write NaN into running_var instead (every later eval forward NaN)."""
    ours, theirs = _pair(half_state)
    x = _input(32, 32, batch=1)
    with pytest.raises(ValueError, match='Expected more than 1 value per channel when training') as expected:
        theirs.train()(x)
    with pytest.raises(ValueError) as got:
        ours.train()(x)
    assert str(got.value) == str(expected.value)
    assert all(torch.isfinite(b).all() for n, b in ours.named_buffers() if n.endswith(('_mean', '_var')))


# --- 7. recipes live outside the tensors ------------------------------------------------------------------


def test_tensor_kept_by_a_forward_hook_saves_loads_and_frees_like_any_other(half_state, tmp_path):
    """A training forward's BatchNorm output, kept by a hook: `torch.save` writes just its values, the default
    (weights-only) `torch.load` reads it back, and it keeps no recipe source (the conv output) alive."""
    import io
    import weakref

    ours, _ = _pair(half_state)
    kept, conv_out = {}, {}
    ours.bn1.register_forward_hook(lambda m, i, o: kept.__setitem__('bn1', o))
    ours.conv_stem.register_forward_hook(lambda m, i, o: conv_out.__setitem__('ref', weakref.ref(o)))
    ours.train()(_input(64, 64)).square().mean().backward()
    out = kept['bn1']
    assert conv_out['ref']() is None, 'the conv output is still alive after backward'
    buf = io.BytesIO()
    torch.save(out, buf)
    plain = io.BytesIO()
    torch.save(out.detach().clone(), plain)
    assert len(buf.getvalue()) <= len(plain.getvalue()) + 1024  # a recipe would add the conv output and more
    buf.seek(0)
    loaded = torch.load(buf)  # weights_only=True, torch's default
    assert torch.equal(loaded, out.detach())


def test_fuse_under_cpu_autocast_computes_in_the_autocast_dtype(tiny_state):
    """`validate --fuse --amp bf16 --device cpu`: every fused conv must compute in bf16 as the unfused convs do
    (the oneDNN fused kernel ignores autocast and computed in fp32)."""
    model = _tiny(tiny_state, torch.float32)
    fused = fuse(model)
    dtypes = []
    for m in fused.modules():
        if type(m).__name__ == 'FusedConv2d':
            m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x = _input(64, 64)
    with torch.inference_mode():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            got, ref = fused.forward_features(x), model.forward_features(x)
        exact = model.forward_features(x)
    assert ref.dtype == torch.bfloat16
    assert got.dtype == torch.bfloat16 and set(dtypes) == {torch.bfloat16}
    # As far from the fp32 model as the unfused bf16 model is (bf16 rounding, not another function).
    scale = exact.abs().max()
    assert (got.float() - exact).abs().max() <= 2 * (ref.float() - exact).abs().max() + 1e-3 * scale
