"""The other official V1 families (Lite0-4, EdgeTPU-S/M/L, CondConv-B0 4e/8e/8e-depth): architecture vs the
official manifests, numerics vs timm's separate ports of the same graphs, and the model API per family."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import MANIFESTS, load_manifest, realistic_init_, shared_path

import effnet_timm  # noqa: F401  (registers the models)
from effnet_timm.models.config import FAMILIES, FAMILY_VARIANTS, BlockConfig, block_table, head_filters, stem_filters

TINY = {
    'lite': 'efficientnet-lite-tiny',
    'edgetpu': 'efficientnet-edgetpu-tiny',
    'condconv': 'efficientnet-condconv-tiny',
}
# timm's own ports (its `_gen_efficientnet_lite/_edge/_condconv`), key-compatible with ours.
TIMM_TWINS = {
    'effnet_v1_lite0': 'tf_efficientnet_lite0',
    'effnet_v1_lite3': 'tf_efficientnet_lite3',
    'effnet_v1_edgetpu_s': 'tf_efficientnet_es',
    'effnet_v1_edgetpu_l': 'tf_efficientnet_el',
    'effnet_v1_condconv_b0_4e': 'tf_efficientnet_cc_b0_4e',
}


def official_row(b: BlockConfig) -> dict:
    """A block in the field names and conventions of the manifests' `params.blocks` rows."""
    return dict(
        index=b.index,
        stage=b.stage,
        kernel_size=b.kernel_size,
        strides=[b.stride, b.stride],
        input_filters=b.input_filters,
        expanded_filters=b.expanded_filters,
        output_filters=b.output_filters,
        se_reduced_filters=b.se_reduced_filters if b.has_se else None,
        has_expand_conv=b.has_expand_conv,
        has_residual=b.has_residual,
        declared_input_filters=b.declared_input_filters,
        block_class='MBConvBlockWithoutDepthwise' if b.fused else 'MBConvBlock',
        has_depthwise=not b.fused,
        expand_kernel_size=(3 if b.fused else 1) if b.has_expand_conv else None,
        has_se=b.has_se,
        id_skip=b.id_skip,
        condconv=b.condconv,
    )


def _manifest(variant: str) -> dict:
    shared_path('manifests')
    return load_manifest(MANIFESTS / f'{FAMILY_VARIANTS[variant].official_name}.json')


def _params_on_meta(name: str, **kwargs) -> int:
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.oracle
@pytest.mark.parametrize('variant', list(FAMILY_VARIANTS))
def test_block_table_equals_official_channel_table(variant):
    manifest = _manifest(variant)
    params, family = manifest['params'], manifest['family']
    spec = FAMILY_VARIANTS[variant]
    assert (spec.width, spec.depth, spec.resolution, spec.dropout) == (
        params['width_coefficient'],
        params['depth_coefficient'],
        params['resolution'],
        params['dropout_rate'],
    )
    assert spec.family == family['family'] and spec.num_experts == (family['condconv_num_experts'] or 0)
    assert FAMILIES[spec.family].activation == family['activation']
    assert FAMILIES[spec.family].num_classes == family['num_classes']
    ours = block_table(spec.width, spec.depth, family=spec.family, num_experts=spec.num_experts)
    assert [official_row(b) for b in ours] == params['blocks']
    assert stem_filters(spec.width, family=spec.family) == params['stem_filters']
    assert head_filters(spec.width, family=spec.family) == params['head_filters']


@pytest.mark.oracle
@pytest.mark.parametrize('family', list(TINY))
def test_tiny_fixture_table(family):
    params = load_manifest(shared_path(TINY[family], 'manifest.json'))['params']
    experts = params.get('condconv_num_experts') or 0
    ours = block_table(params['width_coefficient'], params['depth_coefficient'], family=family, num_experts=experts)
    assert [official_row(b) for b in ours] == params['blocks']
    assert stem_filters(params['width_coefficient'], family=family) == params['stem_filters']
    assert head_filters(params['width_coefficient'], family=family) == params['head_filters']


@pytest.mark.oracle
@pytest.mark.parametrize('variant', list(FAMILY_VARIANTS))
def test_parameter_count_equals_official(variant):
    classes = FAMILIES[FAMILY_VARIANTS[variant].family].num_classes  # the official graph's (EdgeTPU: 1001)
    assert _params_on_meta(variant, num_classes=classes) == _manifest(variant)['checkpoint']['num_trainable_parameters']


@pytest.mark.oracle
@pytest.mark.parametrize('family', list(TINY))
def test_generic_constructor_builds_tiny_fixture_network(family):
    manifest = load_manifest(shared_path(TINY[family], 'manifest.json'))
    params = manifest['params']
    kwargs = dict(
        width_coefficient=0.25,
        depth_coefficient=0.25,
        family=family,
        num_experts=params.get('condconv_num_experts') or 0,
        num_classes=params['global_params']['num_classes'],
    )
    assert _params_on_meta('effnet_v1', **kwargs) == manifest['checkpoint']['num_trainable_parameters']


def test_condconv_needs_experts():
    with pytest.raises(ValueError, match='num_experts'):
        block_table(1.0, 1.0, family='condconv')


def test_edgetpu_has_imagenet_classes_and_a_label_offset():
    """timm's convention for checkpoints with a background class: a 1000-class model, `label_offset` 1."""
    model = timm.create_model('effnet_v1_edgetpu_s', pretrained=False)
    assert model.num_classes == 1000
    assert model.pretrained_cfg['label_offset'] == 1 and model.pretrained_cfg['num_classes'] == 1000


@pytest.mark.parametrize('variant', list(TIMM_TWINS))
def test_logits_match_timm_port(variant):
    """timm's ports are separate code for the same TF graphs; with our weights they give our logits at the
    native size and at odd / non-square sizes (TF 'SAME' padding)."""
    ours = realistic_init_(timm.create_model(variant, drop_path_rate=0.0), calib_size=96)
    ref = timm.create_model(TIMM_TWINS[variant], num_classes=ours.num_classes).eval()
    ref.load_state_dict(ours.state_dict())
    for size in [(FAMILY_VARIANTS[variant].resolution,) * 2, (97, 130)]:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[1]))
        with torch.inference_mode():
            a, b = ours(x), ref(x)
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5, size


@pytest.mark.parametrize('variant', ['effnet_v1_lite0', 'effnet_v1_edgetpu_s', 'effnet_v1_condconv_b0_4e'])
def test_features_only_channels_and_reductions(variant):
    table = block_table(**_scale(variant))
    model = timm.create_model(variant, features_only=True)
    x = torch.randn(1, 3, 64, 64)
    feats = model(x)
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [64 // f.shape[-1] for f in feats] == model.feature_info.reduction() == [2, 4, 8, 16, 32]
    # The last level is the last block's output.
    assert model.feature_info.channels()[-1] == table[-1].output_filters


def _scale(variant: str) -> dict:
    spec = FAMILY_VARIANTS[variant]
    return dict(width=spec.width, depth=spec.depth, family=spec.family, num_experts=spec.num_experts)


@pytest.mark.parametrize('variant', ['effnet_v1_lite0', 'effnet_v1_edgetpu_s', 'effnet_v1_condconv_b0_4e'])
def test_memory_lean_training_gradients_equal_plain_autograd(variant):
    model = realistic_init_(timm.create_model(variant, drop_path_rate=0.0, drop_rate=0.0), calib_size=64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    grads = []
    for lean in (True, False):
        model.zero_grad()
        model.set_memory_efficient(lean)
        model.train()
        model(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    got, ref = grads
    # As tests/models/test_exactness.py: relative to each gradient's norm, with slack for float-noise gradients.
    atol = 1e-5 * torch.cat([g.flatten() for g in ref.values()]).norm()
    errors = {
        n: float((g - ref[n]).norm() / ref[n].norm())
        for n, g in got.items()
        if (g - ref[n]).norm() > 1e-3 * ref[n].norm() + atol
    }
    assert not errors, errors


@pytest.mark.parametrize('variant', ['effnet_v1_lite0', 'effnet_v1_edgetpu_s', 'effnet_v1_condconv_b0_4e'])
def test_fuse_keeps_logits(variant):
    from effnet_timm.models.fusion import fuse

    torch.manual_seed(0)  # realistic_init_ leaves some parameters (CondConv experts' scale) to timm's init
    model = realistic_init_(timm.create_model(variant), calib_size=64).eval()
    fused = fuse(model)
    # Every BatchNorm outside the CondConv blocks is folded.
    kept = {n.rsplit('.', 1)[0] for n, m in fused.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert all(type(fused.get_submodule(k)).__name__ == 'CondConvInvertedResidual' for k in kept)
    x = torch.randn(2, 3, 97, 80, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = model(x), fused(x)
    # Folding rounds each conv once more: the fused bound, 1e-4 of each image's largest logit. These random
    # CondConv mixtures amplify it (1e-5 here; up to 2e-4 seen with other global seeds, logits up to 1e5).
    assert ((a - b).abs().amax(1) / a.abs().amax(1)).max().item() <= 1e-4


@pytest.mark.parametrize('family', list(TINY))
def test_export_dynamic_size_and_trace_are_exact_at_other_sizes(family):
    """torch.export with free height/width, and torch.jit.trace at one parity run at the other (TF padding)."""
    from torch.export import Dim

    experts = 4 if family == 'condconv' else 0
    model = timm.create_model(
        'effnet_v1', width_coefficient=0.25, depth_coefficient=0.25, family=family, num_experts=experts
    )
    model = realistic_init_(model, calib_size=64).eval()
    sizes = [(64, 64), (97, 130), (65, 81)]
    inputs = [torch.randn(1, 3, *s, generator=torch.Generator().manual_seed(s[1])) for s in sizes]
    dims = {2: Dim('height', min=64, max=1024), 3: Dim('width', min=64, max=1024)}
    exported = torch.export.export(model, (inputs[0],), dynamic_shapes=(dims,)).module()
    with torch.inference_mode():
        traced = torch.jit.trace(model, inputs[0], check_trace=False)
        for x in inputs:
            expected = model(x)
            torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)


def _bytes_kept_by_forward(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(x)
    del out
    return sum(event.self_cpu_memory_usage for event in prof.key_averages())


# Measured at 2x96x96: Lite 0.37, EdgeTPU 0.56, CondConv 0.60 (its per-example mixed kernels are kept as in timm).
@pytest.mark.parametrize(
    'variant,bound', [('effnet_v1_lite0', 0.5), ('effnet_v1_edgetpu_s', 0.7), ('effnet_v1_condconv_b0_4e', 0.75)]
)
def test_memory_lean_training_keeps_less_for_backward(variant, bound):
    model = timm.create_model(variant, drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 96, 96)
    lean = _bytes_kept_by_forward(model, x)
    model.set_memory_efficient(False)
    assert lean <= bound * _bytes_kept_by_forward(model, x)


@pytest.mark.parametrize('family', list(TINY))
def test_onnx_export_reproduces_the_logits(family, tmp_path):
    """ONNX (the dynamo exporter) of each family, run by onnxruntime at the exported size (TF padding is
    resolved per size, as for the B-series): within the fused bound of the eager logits."""
    onnx = pytest.importorskip('onnx', reason='ONNX export check needs `pip install onnx onnxruntime onnxscript`')
    ort = pytest.importorskip('onnxruntime', reason='ONNX parity needs `pip install onnxruntime`')
    pytest.importorskip('onnxscript', reason='torch.onnx.export (dynamo) needs `pip install onnxscript`')
    experts = 4 if family == 'condconv' else 0
    model = timm.create_model(
        'effnet_v1', width_coefficient=0.25, depth_coefficient=0.25, family=family, num_experts=experts
    )
    model = realistic_init_(model, calib_size=64).eval()
    x = torch.randn(2, 3, 65, 80, generator=torch.Generator().manual_seed(1))
    path = tmp_path / f'{family}.onnx'
    torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False)
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.inference_mode():
        ref = model(x)
    assert ref.abs().max() > 1
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-4
