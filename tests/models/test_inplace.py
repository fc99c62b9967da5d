"""In-place inference (issue 18): BatchNorm, Swish, SE scaling and the residual sum written into the conv
output wherever nothing can observe the overwritten tensors, decided at run time.

What must stay true: the same logits bit for bit as the out-of-place path (and timm's within float
rounding, which test_exactness checks), nothing a hook was handed or kept ever changes afterwards, and
graphs recorded by torch.jit.trace / torch.export / torch.compile hold the plain out-of-place ops.
"""

from __future__ import annotations

import contextlib

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import realistic_init_
from torch.utils.hooks import RemovableHandle

import effnet_timm  # noqa: F401  (registers the models)
from effnet_timm.models.blocks import conv_bn_act_, inplace_allowed
from effnet_timm.models.fusion import fuse
from effnet_timm.models.recompute_layers import BatchNormRecompute2d, SwishRecompute

# Depth 0.5: stages 3-5 have a second block with a residual sum; DropPath modules (identities in eval).
TINY = dict(width_coefficient=0.25, depth_coefficient=0.5, drop_path_rate=0.2)


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng():
        yield


@pytest.fixture(scope='module')
def tiny():
    with torch.random.fork_rng():
        model = timm.create_model('effnet_v1', **TINY)
        return realistic_init_(model, calib_size=64).eval()


def _input(*size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(sum(size)))


def _plain(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The out-of-place forward: grad mode on with parameters that require grad (values only)."""
    with torch.enable_grad():
        out = model(x)
    assert out.requires_grad
    return out.detach()


def _bytes_allocated(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes the forward allocates (the allocator's events), under inference_mode."""
    with torch.inference_mode():
        model(x)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            model(x)
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())


def test_inference_allocates_well_under_what_timm_allocates():
    """Per inverted-residual block timm allocates ~6 expanded-width tensors (conv, BN, conv, BN, SE product,
    plus the padded input copy), the in-place path 2 (the two conv outputs)."""
    x = _input(96, 96)
    ours = timm.create_model('effnet_v1_b0').eval()
    theirs = timm.create_model('tf_efficientnet_b0').eval()
    for fmt in (torch.contiguous_format, torch.channels_last):
        ours, theirs, x = ours.to(memory_format=fmt), theirs.to(memory_format=fmt), x.contiguous(memory_format=fmt)
        mine, timms = _bytes_allocated(ours, x), _bytes_allocated(theirs, x)
        assert mine <= 0.6 * timms, (fmt, mine, timms)


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('size', [(64, 64), (65, 71)])
def test_inplace_logits_equal_the_out_of_place_logits_bit_for_bit(tiny, channels_last, size):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model, x = tiny.to(memory_format=fmt), _input(*size).contiguous(memory_format=fmt)
    expected = _plain(model, x)
    assert expected.abs().max() > 1  # realistic logits
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert torch.equal(model(x), expected)
            features = model.forward_intermediates(x, intermediates_only=True)
        for got, ref in zip(features, [t.detach() for t in _intermediates_with_grad(model, x)]):
            assert torch.equal(got, ref)
    tiny.to(memory_format=torch.contiguous_format)


def _intermediates_with_grad(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.enable_grad():
        return model.forward_intermediates(x, intermediates_only=True)


def test_fused_model_in_place_equals_out_of_place(tiny):
    fused = fuse(tiny).to(memory_format=torch.channels_last)
    x = _input(65, 64).contiguous(memory_format=torch.channels_last)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, i: None)
    try:
        with torch.inference_mode():
            expected = fused(x)  # a global hook: every block takes the out-of-place path
    finally:
        handle.remove()
    with torch.inference_mode():
        assert torch.equal(fused(x), expected)


@pytest.mark.parametrize('shape', [(2, 1, 1, 1), (2, 3, 7, 9), (1, 17, 5, 5), (3, 64, 4, 6)])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('norm', [BatchNormRecompute2d, torch.nn.BatchNorm2d])
def test_batchnorm_written_over_the_conv_output_equals_f_batch_norm(shape, channels_last, norm):
    """The eval kernel reading and writing the same tensor gives F.batch_norm's numbers exactly."""
    g = torch.Generator().manual_seed(0)
    n, c, h, w = shape
    conv = torch.nn.Conv2d(c, c, 1, bias=False)
    bn = norm(c, eps=1e-3).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(generator=g)
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.1, 2.0, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    conv.to(memory_format=fmt)
    with torch.inference_mode():
        y = conv(x)
        expected = F.silu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, 1e-3))
        x_before = x.clone()
        got = conv_bn_act_(conv, bn, SwishRecompute(), x)
    assert torch.equal(got, expected)
    assert torch.equal(x, x_before)  # the input is never written


# --- nothing observable is overwritten -----------------------------------------------------------------


class _Keeper:
    """Hooks that keep what they are handed (no copy), and a copy of it to compare with afterwards."""

    def __init__(self) -> None:
        self.kept: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.handles: list[RemovableHandle] = []

    def keep(self, where: str, tensors) -> None:
        for t in tensors if isinstance(tensors, (tuple, list)) else (tensors,):
            if isinstance(t, torch.Tensor):
                self.kept.append((where, t, t.clone()))

    def forward_hook(self, name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output is left as it is
            self.keep(f'{name} input', inputs)
            self.keep(f'{name} output', output)

        return hook

    def pre_hook(self, name: str):
        return lambda m, inputs: self.keep(f'{name} pre-hook input', inputs)

    def assert_unchanged(self) -> None:
        assert self.kept
        changed = [where for where, t, copy in self.kept if not torch.equal(t, copy)]
        assert not changed, f'overwritten after a hook was handed it: {changed}'

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# Every module kind the in-place path writes around: stem, the depthwise-separable block (with a
# residual), a strided inverted-residual block (cropping TF-'SAME' conv), one with a residual, the head.
HOOKED = [
    'conv_stem',
    'bn1',
    'act1',
    'blocks.0.0.conv_dw',
    'blocks.0.0.bn1',
    'blocks.0.0.act1',
    'blocks.0.0.se',
    'blocks.0.0.conv_pw',
    'blocks.0.0.bn2',
    'blocks.1.0.conv_dw',
    'blocks.1.0.act2',
    'blocks.3.1.conv_pw',
    'blocks.3.1.bn1',
    'blocks.3.1.act1',
    'blocks.3.1.conv_dw',
    'blocks.3.1.bn2',
    'blocks.3.1.act2',
    'blocks.3.1.se',
    'blocks.3.1.conv_pwl',
    'blocks.3.1.bn3',
    'blocks.3.1.drop_path',
    'conv_head',
    'bn2',
    'act2',
]


@pytest.mark.parametrize('kind', ['forward', 'pre'])
def test_a_hook_on_one_module_keeps_what_it_was_handed(tiny, kind):
    x = _input(64, 64)
    expected = _plain(tiny, x)
    for name in HOOKED:
        keeper = _Keeper()
        module = tiny.get_submodule(name)
        if kind == 'forward':
            keeper.handles.append(module.register_forward_hook(keeper.forward_hook(name)))
        else:
            keeper.handles.append(module.register_forward_pre_hook(keeper.pre_hook(name)))
        try:
            with torch.no_grad():
                got = tiny(x)
        finally:
            keeper.remove()
        keeper.assert_unchanged()
        assert torch.equal(got, expected), name


def test_bn_hook_output_survives_and_other_blocks_stay_in_place(tiny):
    """A hook on one BatchNorm makes only its own block out-of-place (the others keep the fast path)."""
    model = timm.create_model('effnet_v1', **TINY)
    model.load_state_dict(tiny.state_dict())
    model.eval()
    kept = {}
    model.blocks[1][0].bn1.register_forward_hook(lambda m, i, o: kept.update(bn=o, conv=i[0].clone()))
    ops = []
    with torch.no_grad(), _op_names(ops):
        model(_input(64, 64))
    bn = model.blocks[1][0].bn1
    expected = F.batch_norm(kept['conv'], bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert expected.min() < -1.0  # below Swish's minimum (-0.28): an overwrite cannot pass unnoticed
    assert torch.equal(kept['bn'], expected)
    assert 'aten.silu_.default' in ops and 'aten.silu.default' in ops


@pytest.mark.parametrize('kind', ['forward', 'pre', 'forward_always_called'])
def test_a_global_module_hook_keeps_what_it_was_handed(tiny, kind):
    keeper = _Keeper()
    register = torch.nn.modules.module
    if kind == 'pre':
        keeper.handles.append(register.register_module_forward_pre_hook(keeper.pre_hook('global')))
    else:
        hook = keeper.forward_hook('global')
        keeper.handles.append(register.register_module_forward_hook(hook, always_call=kind != 'forward'))
    x = _input(64, 64)
    try:
        ops = []
        with torch.no_grad(), _op_names(ops):
            got = tiny(x)
        keeper.assert_unchanged()
        assert not [op for op in ops if op.split('.')[1].endswith('_')]  # nothing in place at all
    finally:
        keeper.remove()
    assert torch.equal(got, _plain(tiny, x))


@contextlib.contextmanager
def _op_names(names: list[str]):
    """Record the aten ops run (their overload names) while the context is open."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder():
        yield


def test_inplace_is_not_allowed_where_something_can_observe():
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert inplace_allowed(x)
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
        assert not inplace_allowed(x)
        handle.remove()
        assert not inplace_allowed(torch.nn.Parameter(x))  # a subclass
    assert not inplace_allowed(x)  # grad mode on: autograd may save any tensor


# --- recorded graphs hold the plain ops ---------------------------------------------------------------


def _inplace_nodes(graph: torch.fx.Graph) -> list[str]:
    """Nodes that write into a tensor: mutable aten overloads, `x.add_()`-style calls, `inplace=True`."""
    found = []
    for node in graph.nodes:
        if node.op not in ('call_function', 'call_method'):
            continue
        schema = getattr(node.target, '_schema', None)
        name = node.target if isinstance(node.target, str) else getattr(node.target, '__name__', '')
        trailing = name.endswith('_') and not name.endswith('__')
        if (schema is not None and schema.is_mutable) or trailing or node.kwargs.get('inplace'):
            found.append(node.format_node())
    return found


def test_jit_trace_records_the_out_of_place_graph(tiny):
    x = _input(64, 64, batch=1)
    with torch.no_grad():
        traced = torch.jit.trace(tiny, x)
        kinds = [node.kind() for node in traced.inlined_graph.nodes()]
        assert 'aten::silu' in kinds
        assert not [k for k in kinds if k.endswith('_') or 'native_batch_norm' in k]
        other = _input(64, 64, batch=1) * 2
        assert torch.equal(traced(other), tiny(other))


def test_export_records_the_out_of_place_graph(tiny):
    x = _input(64, 64, batch=1)
    with torch.no_grad():
        program = torch.export.export(tiny, (x,))
    assert not _inplace_nodes(program.graph)
    assert any('silu' in str(node.target) for node in program.graph.nodes)
    other = _input(64, 64, batch=1) * 2
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other), tiny(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode', [torch.no_grad, torch.inference_mode])
def test_compile_records_the_out_of_place_graph(tiny, mode):
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(tiny, fullgraph=True, backend=backend)
    x = _input(64, 64, batch=1)
    try:
        with mode():
            got = compiled(x)
            expected = tiny(x)
    finally:
        torch._dynamo.reset()
    assert graphs and not [node for graph in graphs for node in _inplace_nodes(graph)]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
