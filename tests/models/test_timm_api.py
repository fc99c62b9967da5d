"""The contract timm's own tests/test_models.py holds its models to, applied to ours."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg_value

import effnet_timm  # noqa: F401  (registers the models)

SMALL = (3, 96, 96)
ALL = timm.list_models('effnet_v1*')


@pytest.fixture(scope='module')
def b0():
    return timm.create_model('effnet_v1_b0').eval()


def test_every_variant_is_registered_under_its_own_module():
    families = [f'effnet_v1_lite{i}' for i in range(5)] + [f'effnet_v1_edgetpu_{s}' for s in 'sml']
    families += ['effnet_v1_condconv_b0_4e', 'effnet_v1_condconv_b0_8e', 'effnet_v1_condconv_b0_8e_depth']
    assert sorted(ALL) == sorted(['effnet_v1'] + [f'effnet_v1_b{i}' for i in range(9)] + ['effnet_v1_l2'] + families)
    assert timm.list_models(module='effnet_v1') == ALL
    assert not set(ALL) & set(timm.list_models(module='efficientnet'))


def test_forward_and_grad_checkpointing_agree(b0):
    x = torch.randn(2, *SMALL)
    with torch.inference_mode():
        out = b0(x)
    assert out.shape == (2, 1000) and not torch.isnan(out).any()
    b0.set_grad_checkpointing()
    try:
        with torch.no_grad():
            out2 = b0(x)
    finally:
        b0.set_grad_checkpointing(False)
    torch.testing.assert_close(out, out2, rtol=1e-4, atol=1e-5)


def test_backward_reaches_every_parameter():
    model = timm.create_model('effnet_v1_b0', num_classes=42)
    out = model(torch.randn(2, *SMALL))
    assert out.shape == (2, 42)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_grad_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = timm.create_model('effnet_v1_b0', drop_rate=0.0, drop_path_rate=0.0).eval()
    x = torch.randn(2, *SMALL)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize('name', [n for n in ALL if n != 'effnet_v1_l2'])
def test_default_cfg_consistency(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg['classifier'] + '.weight' in state and cfg['first_conv'] + '.weight' in state
    x = torch.randn(1, *cfg['input_size'][:1], 64, 64)
    with torch.inference_mode():
        features = model.forward_features(x)
        assert features.shape[1] == model.num_features
        assert model.forward_head(features, pre_logits=True).shape[-1] == model.head_hidden_size
    assert cfg['pool_size'] == tuple(-(-s // 32) for s in cfg['input_size'][1:])
    assert model.default_cfg is model.pretrained_cfg


def test_pool_size_is_forward_features_shape_at_the_cfg_input_size(b0):
    cfg = b0.pretrained_cfg
    with torch.inference_mode():
        assert tuple(b0.forward_features(torch.randn(1, *cfg['input_size'])).shape[-2:]) == cfg['pool_size']


def test_reset_classifier_and_unpooled_outputs():
    model = timm.create_model('effnet_v1_b0').eval()
    x = torch.randn(1, *SMALL)
    model.reset_classifier(0)
    assert model(x).shape == (1, 1280)
    model.reset_classifier(0, '')
    assert model(x).shape == (1, 1280, 3, 3)
    model.reset_classifier(7, 'avg')
    assert model(x).shape == (1, 7) and model.get_classifier().out_features == 7
    unpooled = timm.create_model('effnet_v1_b0', num_classes=0, global_pool='').eval()
    assert unpooled(x).shape == (1, 1280, 3, 3)
    assert timm.create_model('effnet_v1_b0', num_classes=0)(x).shape == (1, 1280)


def test_device_and_dtype_factory_arguments_as_timm():
    meta = timm.create_model('effnet_v1_b0', device='meta')
    assert {p.device.type for p in meta.parameters()} == {'meta'}
    ours = timm.create_model('effnet_v1_b0', dtype=torch.float64).eval()
    theirs = timm.create_model('tf_efficientnet_b0', dtype=torch.float64).eval()
    assert {t.dtype for t in [*ours.parameters(), *ours.buffers()] if t.is_floating_point()} == {torch.float64}
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, *SMALL, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-12)
    ours.reset_classifier(5)
    assert ours.classifier.weight.dtype == torch.float64


def test_in_chans_and_global_pool_kwargs():
    model = timm.create_model('effnet_v1_b1', in_chans=1, global_pool='max', num_classes=3).eval()
    assert model.conv_stem.in_channels == 1
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)
    assert model.global_pool.pool_type == 'max'


def test_features_only_levels_and_out_indices():
    model = timm.create_model('effnet_v1_b0', features_only=True).eval()
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert model.feature_info.channels() == [16, 24, 40, 112, 320]
    with torch.inference_mode():
        feats = model(torch.randn(1, 3, 224, 224))
    assert [f.shape[1:] for f in feats] == [(16, 112, 112), (24, 56, 56), (40, 28, 28), (112, 14, 14), (320, 7, 7)]
    picked = timm.create_model('effnet_v1_b3', features_only=True, out_indices=(1, 3)).eval()
    assert picked.feature_info.channels() == [32, 136]
    with torch.inference_mode():
        assert [f.shape[1] for f in picked(torch.randn(1, 3, 64, 64))] == [32, 136]


@pytest.mark.parametrize('feature_cls', ['hook', 'fx'])
def test_features_only_with_timm_generic_extractors(feature_cls):
    model = timm.create_model('effnet_v1_b0', features_only=True, feature_cls=feature_cls).eval()
    with torch.inference_mode():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [16, 24, 40, 112, 320]


def test_output_stride_dilates_instead_of_downsampling():
    model = timm.create_model('effnet_v1_b0', features_only=True, output_stride=16).eval()
    assert model.feature_info.reduction() == [2, 4, 8, 16, 16]
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 64, 64))[-1].shape[-2:] == (4, 4)


def test_forward_intermediates_match_features_and_final_output(b0):
    x = torch.randn(1, *SMALL)
    with torch.inference_mode():
        final, inter = b0.forward_intermediates(x)
        assert [t.shape[1] for t in inter] == [i['num_chs'] for i in b0.feature_info]
        assert [x.shape[-1] // t.shape[-1] for t in inter] == [2, 4, 8, 16, 32]
        torch.testing.assert_close(final, b0.forward_features(x))
        only = b0.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        torch.testing.assert_close(only, [inter[0], inter[2]])
        _, last = b0.forward_intermediates(x, indices=1, stop_early=True)
        torch.testing.assert_close(last[0], inter[-1])


def test_prune_intermediate_layers_keeps_the_requested_levels():
    model = timm.create_model('effnet_v1_b0').eval()
    x = torch.randn(1, *SMALL)
    with torch.inference_mode():
        expected = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        assert model.prune_intermediate_layers([1, 2]) == [1, 2]
        got = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    assert len(model.blocks) == 3 and model.num_classes == 0
    torch.testing.assert_close(got, expected)


def test_group_matcher_covers_every_parameter():
    from timm.models import group_parameters

    model = timm.create_model('effnet_v1_b0')
    groups = group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) < len(groups)


def test_channels_last_gives_the_same_logits(b0):
    x = torch.randn(2, *SMALL)
    with torch.inference_mode():
        ref = b0(x)
        b0.to(memory_format=torch.channels_last)
        try:
            out = b0(x.contiguous(memory_format=torch.channels_last))
        finally:
            b0.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_torchscript(b0):
    with timm.layers.set_scriptable(True):
        model = timm.create_model('effnet_v1_b0').eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, *SMALL)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), model(x))


def test_torch_compile_fullgraph_matches_eager():
    model = timm.create_model('effnet_v1', width_coefficient=0.25, depth_coefficient=0.25).eval()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    for size in ((64, 64), (65, 70)):
        x = torch.randn(1, 3, *size)
        with torch.inference_mode():
            torch.testing.assert_close(compiled(x), model(x))


def test_pretrained_cfg_values_resolve():
    assert get_pretrained_cfg_value('effnet_v1_b3.aa_in1k', 'input_size') == (3, 300, 300)
    assert timm.data.resolve_data_config({}, model=timm.create_model('effnet_v1_b3.aa_in1k'))['crop_pct'] == 0.903


def test_forward_intermediates_extra_blocks_as_timms_efficientnet(b0):
    # timm's tf_efficientnet_b0 is the reference: the same state dict, its own forward_intermediates.
    reference = timm.create_model('tf_efficientnet_b0').eval()
    reference.load_state_dict(b0.state_dict())
    x = torch.randn(1, *SMALL)
    with torch.inference_mode():
        for kwargs in ({}, dict(indices=[0, 3, 7]), dict(indices=2, stop_early=True)):
            final, inter = b0.forward_intermediates(x, extra_blocks=True, **kwargs)
            ref_final, ref_inter = reference.forward_intermediates(x, extra_blocks=True, **kwargs)
            assert len(inter) == len(ref_inter), kwargs
            torch.testing.assert_close(inter, ref_inter, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(final, ref_final, rtol=1e-4, atol=1e-4)
        only = b0.forward_intermediates(x, indices=[0, 1], extra_blocks=True, intermediates_only=True)
    assert [t.shape[1] for t in only] == [32, 16]  # the stem, then stage 1
