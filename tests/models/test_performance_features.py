"""Issue 4's features: copy-free TF padding, fused inference, compile/export/ONNX, training memory.

Speed itself is measured by benchmarks/bench_inference.py; these tests pin what must stay true for the
speed-ups to be allowed: same numerics, same API, exportable graphs, less memory kept for backward.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import realistic_init_

import effnet_timm  # noqa: F401  (registers the models)
from effnet_timm.models.fusion import FusedConv2d, fuse
from effnet_timm.models.layers import Conv2dTfSame
from effnet_timm.models.recompute import recipe_of, recompute_activations, strip_recipe
from effnet_timm.models.recompute_layers import BatchNormRecompute2d, SwishRecompute, batch_norm_with_recipe

TINY = dict(width_coefficient=0.25, depth_coefficient=0.25)


def _tiny(**kwargs) -> torch.nn.Module:
    return timm.create_model('effnet_v1', **TINY, **kwargs)


@pytest.fixture(autouse=True)
def _keep_global_rng():
    # These tests seed torch's global RNG; later test files must not see a different stream because of them.
    with torch.random.fork_rng():
        yield


@pytest.fixture(scope='module')
def tiny():
    with torch.random.fork_rng():
        return realistic_init_(_tiny(drop_path_rate=0.0), calib_size=64).eval()


def _input(*size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(sum(size)))


# --- TF 'SAME' padding without the padded copy ------------------------------------------------------


@pytest.mark.parametrize('kernel,in_chs,out_chs', [(3, 3, 32), (3, 8, 8), (5, 8, 8), (3, 2, 3)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_copy_free_stride2_conv_equals_pad_then_conv(kernel, in_chs, out_chs, channels_last):
    """Eager's two strategies (crop the output / pad the input) and the padded form that compile and
    export trace agree at every size parity and memory format; test_numerics checks eager against TF."""
    torch.manual_seed(0)
    groups = in_chs if in_chs == out_chs else 1
    conv = Conv2dTfSame(in_chs, out_chs, kernel, stride=2, groups=groups)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv.to(memory_format=fmt)
    for h, w in itertools.chain(((n, n) for n in range(1, 12)), [(16, 13), (13, 16), (30, 9)]):
        x = torch.randn(2, in_chs, h, w).contiguous(memory_format=fmt)
        expected = conv._conv(F.pad(x, conv._same_pads(x)), (0, 0))
        for pad_input in (False, True):
            conv.pad_input = pad_input
            got = conv(x)
            assert got.shape == expected.shape, (h, w, pad_input)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=f'{(h, w, pad_input)}')
            assert got.is_contiguous(memory_format=fmt), 'output must be dense in the input memory format'


def test_only_the_stem_pads_its_input():
    model = timm.create_model('effnet_v1_b0')
    padding_convs = [n for n, m in model.named_modules() if isinstance(m, Conv2dTfSame) and m.pad_input]
    assert padding_convs == ['conv_stem']


# --- fused inference ----------------------------------------------------------------------------------


@pytest.mark.parametrize('size', [(64, 64), (65, 65), (64, 77)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_fused_model_gives_the_same_logits(tiny, size, channels_last):
    fused = fuse(tiny)
    x = _input(*size)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref, got = tiny(x), fused(x)
    assert ref.abs().max() > 1  # realistic logits, so the tolerances below mean something
    assert (got - ref).abs().max() <= 1e-4
    assert ((got - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_fuse_folds_every_batchnorm_and_leaves_the_input_alone(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    fused = fuse(tiny)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    convs = [m for m in fused.modules() if isinstance(m, FusedConv2d)]
    assert len(convs) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in tiny.modules())
    assert {c.swish for c in convs} == {True, False}
    assert not fused.training
    state = tiny.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)


def test_fused_model_keeps_the_timm_inference_api(tiny):
    fused = fuse(tiny)
    x = _input(64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fused.forward_features(x), tiny.forward_features(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            fused.forward_head(fused.forward_features(x), pre_logits=True),
            tiny.forward_head(tiny.forward_features(x), pre_logits=True),
            rtol=1e-4,
            atol=1e-4,
        )
        for got, ref in zip(
            fused.forward_intermediates(x, intermediates_only=True),
            tiny.forward_intermediates(x, intermediates_only=True),
        ):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        fused.reset_classifier(5)
        assert fused(x).shape == (2, 5)


def test_fuse_works_on_a_features_only_model():
    model = realistic_init_(_tiny(features_only=True, out_indices=(1, 3), drop_path_rate=0.0), calib_size=64)
    model.eval()
    fused = fuse(model)
    x = _input(65, 64)
    with torch.inference_mode():
        for got, ref in zip(fused(x), model(x)):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# --- torch.compile, torch.export, ONNX ----------------------------------------------------------------


def test_compile_fullgraph_matches_eager_at_static_and_dynamic_sizes(tiny):
    """fullgraph=True fails on any graph break; the later sizes run the dynamic-shape graph(s)."""
    torch._dynamo.reset()
    compiled = torch.compile(tiny, fullgraph=True, backend='eager')
    with torch.inference_mode():
        for size in [(64, 64), (96, 96), (97, 99), (160, 128)]:
            x = _input(*size, batch=1)
            torch.testing.assert_close(compiled(x), tiny(x))
    torch._dynamo.reset()


def test_compiled_training_step_gives_eager_gradients():
    """AOTAutograd traces backward too (inductor would add ~40 s of C++ compile per graph here)."""
    torch.manual_seed(0)
    model = _tiny(drop_rate=0.0, drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 64, 64)
    model(x).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.compile(model, fullgraph=True, backend='aot_eager')(x).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()


def test_fused_model_compiles_fullgraph(tiny):
    fused = fuse(tiny)
    compiled = torch.compile(fused, fullgraph=True, backend='eager')
    x = _input(65, 64, batch=1)
    with torch.inference_mode():
        expected = fused(x)
        # Compiled, the fused convs run as conv + SiLU (oneDNN's fused kernel is eager-only): rounding differs,
        # within the fused path's bound (1e-4 of the largest logit; measured up to ~1e-5 abs with 2 threads).
        torch.testing.assert_close(compiled(x), expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    torch._dynamo.reset()


def test_export_with_dynamic_height_and_width_matches_eager(tiny):
    from torch.export import Dim

    # H, W >= 64: below that the last feature map may be 1x1, which shape specialisation treats apart.
    dims = {2: Dim('height', min=64, max=1024), 3: Dim('width', min=64, max=1024)}
    program = torch.export.export(tiny, (_input(64, 64, batch=1),), dynamic_shapes=(dims,))
    exported = program.module()
    with torch.inference_mode():
        for size in [(64, 64), (97, 130)]:
            x = _input(*size, batch=1)
            torch.testing.assert_close(exported(x), tiny(x), rtol=1e-5, atol=1e-5)


def test_onnx_export_has_constant_pads_and_onnxruntime_reproduces_the_logits(tiny, tmp_path):
    onnx = pytest.importorskip('onnx', reason='ONNX export check needs `pip install onnx onnxruntime onnxscript`')
    ort = pytest.importorskip('onnxruntime', reason='ONNX parity needs `pip install onnxruntime`')
    pytest.importorskip('onnxscript', reason='torch.onnx.export (dynamo) needs `pip install onnxscript`')
    path = tmp_path / 'tiny.onnx'
    x = _input(64, 64, batch=1)
    torch.onnx.export(tiny, (x,), str(path), dynamo=True, external_data=False)
    graph = onnx.load(str(path)).graph
    constants = {i.name for i in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == 'Constant' for out in node.output}
    computed_pads = [n.name for n in graph.node if n.op_type == 'Pad' and n.input[1] not in constants]
    assert not computed_pads
    assert not {'Shape', 'Mod'} & {n.op_type for n in graph.node}  # no pad arithmetic left in the graph
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.inference_mode():
        ref = tiny(x)
    assert ref.abs().max() > 1
    assert abs(torch.from_numpy(got) - ref).max() <= 1e-4


# --- training memory ----------------------------------------------------------------------------------


def _recorded_bn_swish(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """BatchNorm + Swish with recipes recorded: backward recomputes both outputs from `a`."""
    with recompute_activations():
        y = batch_norm_with_recipe(a, w, b, None, None, 0.1, 1e-3)
        out = SwishRecompute()(y)  # Swish keeps y by recipe
        assert recipe_of(y) is not None and recipe_of(out) is not None
        return strip_recipe(out * out)  # and the multiply keeps out by recipe


def test_recorded_bn_swish_passes_gradcheck_and_gradgradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_recorded_bn_swish, (x, weight, bias))
    assert torch.autograd.gradgradcheck(_recorded_bn_swish, (x, weight, bias))


def test_recorded_bn_swish_equals_autograd_and_updates_running_stats():
    x = torch.randn(4, 6, 7, 7, dtype=torch.float64) * 3 + 1
    grad = torch.randn_like(x)
    results = []
    for recorded in (True, False):
        torch.manual_seed(0)
        bn = (BatchNormRecompute2d if recorded else torch.nn.BatchNorm2d)(6, eps=1e-3, momentum=0.01)
        bn = bn.double().train()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        inp = x.clone().requires_grad_()
        with recompute_activations() if recorded else contextlib.nullcontext():
            out = (SwishRecompute() if recorded else torch.nn.SiLU())(bn(inp))
            assert (recipe_of(out) is not None) == recorded
        out.backward(grad)
        results.append(
            (out, inp.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var, bn.num_batches_tracked)
        )
    for me, ref in zip(*results):
        torch.testing.assert_close(me, ref)


def _bytes_kept_by_forward(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes allocated and not freed during one training forward: what autograd keeps for backward.

    Counted by the profiler's allocator events, so it sees whatever the model's own saved-tensor hooks
    keep (recipes instead of tensors) and would see any copy they made.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(x)
    del out
    return sum(event.self_cpu_memory_usage for event in prof.key_averages())


def _set_memory_efficient(model: torch.nn.Module, enable: bool) -> None:
    model.set_memory_efficient(enable)


def test_training_forward_keeps_a_third_of_what_timm_keeps():
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    ours = timm.create_model('effnet_v1_b0', drop_rate=0.0, drop_path_rate=0.0).train()
    theirs = timm.create_model('tf_efficientnet_b0', drop_rate=0.0, drop_path_rate=0.0).train()
    kept, kept_timm = _bytes_kept_by_forward(ours, x), _bytes_kept_by_forward(theirs, x)
    # Per MBConv block timm keeps 6 expanded-width tensors (plus the padded copy on stride 2), ours 2.
    assert kept <= 0.4 * kept_timm, (kept, kept_timm)
    _set_memory_efficient(ours, False)
    assert _bytes_kept_by_forward(ours, x) >= 0.9 * kept_timm  # plain autograd: what the savings are from
    _set_memory_efficient(ours, True)
    ours.set_grad_checkpointing()
    assert _bytes_kept_by_forward(ours, x) <= 0.5 * kept


def test_features_only_training_keeps_as_little():
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    ours = timm.create_model('effnet_v1_b0', features_only=True, drop_path_rate=0.0).train()
    theirs = timm.create_model('tf_efficientnet_b0', features_only=True, drop_path_rate=0.0).train()
    assert _bytes_kept_by_forward(ours, x) <= 0.4 * _bytes_kept_by_forward(theirs, x)


def test_recomputation_refuses_a_source_modified_in_place():
    model = _tiny(drop_rate=0.0, drop_path_rate=0.0).train()
    captured = {}
    model.blocks[1][0].conv_pw.register_forward_hook(lambda m, i, out: captured.setdefault('out', out))
    loss = model(_input(64, 64)).sum()
    with torch.no_grad():
        captured['out'].mul_(2)  # the block's expand conv output, from which backward recomputes
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        loss.backward()


def test_training_gradients_are_the_same_with_checkpointing_and_memory_efficient_swish():
    torch.manual_seed(0)
    model = _tiny(drop_rate=0.0, drop_path_rate=0.0).train()
    x = torch.randn(4, 3, 64, 64)

    def grads(efficient: bool, checkpointing: bool) -> dict:
        _set_memory_efficient(model, efficient)
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        model(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = grads(efficient=False, checkpointing=False)
    for efficient, checkpointing in [(True, False), (True, True)]:
        got = grads(efficient, checkpointing)
        for name, g in got.items():
            torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_mixed_precision_training_gives_plain_autograd_gradients():
    # Under autocast the conv outputs are bfloat16 while BatchNorm's statistics and parameters are float32:
    # recomputation must round to the dtype the forward produced, as plain autograd's saved tensors are.
    torch.manual_seed(0)
    model = _tiny(drop_rate=0.0, drop_path_rate=0.0).train()
    x = torch.randn(4, 3, 64, 64)

    def grads(efficient: bool) -> dict:
        _set_memory_efficient(model, efficient)
        model.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference, got = grads(efficient=False), grads(efficient=True)
    for name, g in got.items():
        assert (g - reference[name]).norm() <= 1e-2 * reference[name].norm() + 1e-6, name


def test_recomputed_backward_can_run_twice_with_retain_graph():
    torch.manual_seed(0)
    model = _tiny(drop_rate=0.0, drop_path_rate=0.0).train()
    loss = model(_input(64, 64)).square().mean()
    loss.backward(retain_graph=True)  # the first pass drops the values it cached for shared reads
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * first[name], rtol=1e-5, atol=1e-7, msg=name)


def test_callers_saved_tensor_hooks_see_every_saved_tensor():
    # e.g. torch.autograd.graph.save_on_cpu(): the model must not take the saved tensors away from it.
    model = _tiny(drop_rate=0.0, drop_path_rate=0.0).train()
    packed = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(_input(64, 64)).sum().backward()
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert len(packed) >= 2 * convs  # every conv's input and weight, at least
    with torch.autograd.graph.save_on_cpu():
        model(_input(64, 64)).sum().backward()
