"""TF numerics: 'SAME' padding against TensorFlow itself, whole networks against timm's tf_efficientnet_*.

timm's `tf_efficientnet_bN` is a separate implementation of the same TF graph (its own Conv2dSame,
builder and blocks), so identical weights must give the same logits at any input size.
"""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import realistic_init_

import effnet_timm  # noqa: F401  (registers the models)
from effnet_timm.models.config import VARIANTS
from effnet_timm.models.layers import Conv2dTfSame, create_conv, tf_same_pad

REL_TOL = 1e-5  # of max |logit|


def _tf():
    return pytest.importorskip('tensorflow', reason='TensorFlow is the padding oracle (pip install .[test])')


@pytest.mark.oracle
@pytest.mark.parametrize('kernel,stride', [(3, 2), (5, 2), (3, 1), (5, 1), (1, 1), (1, 2)])
def test_conv_matches_tensorflow_same_padding_at_every_size(kernel, stride):
    tf = _tf()
    torch.manual_seed(0)
    conv = create_conv(2, 3, kernel, stride=stride)
    kernel_hwio = conv.weight.detach().permute(2, 3, 1, 0).numpy()
    for h, w in itertools.chain(((n, n) for n in range(1, 24)), [(16, 13), (13, 16), (31, 8)]):
        x = torch.randn(1, 2, h, w)
        expected = tf.nn.conv2d(x.permute(0, 2, 3, 1).numpy(), kernel_hwio, stride, 'SAME').numpy()
        got = conv(x).detach().permute(0, 2, 3, 1).numpy()
        assert got.shape == expected.shape, (h, w)
        assert abs(got - expected).max() < 1e-5, (h, w)


@pytest.mark.oracle
@pytest.mark.parametrize('kernel', [3, 5])
def test_depthwise_conv_matches_tensorflow_same_padding(kernel):
    tf = _tf()
    torch.manual_seed(0)
    conv = create_conv(4, 4, kernel, stride=2, groups=4)
    kernel_hwc1 = conv.weight.detach().permute(2, 3, 0, 1).numpy()
    for h, w in [(224, 224), (225, 225), (112, 113), (7, 6), (2, 2)]:
        x = torch.randn(1, 4, h, w)
        expected = tf.nn.depthwise_conv2d(x.permute(0, 2, 3, 1).numpy(), kernel_hwc1, (1, 2, 2, 1), 'SAME').numpy()
        got = conv(x).detach().permute(0, 2, 3, 1).numpy()
        assert abs(got - expected).max() < 1e-5, (h, w)


def test_stride2_padding_is_asymmetric_for_even_and_symmetric_for_odd_inputs():
    # The statement of TF's rule, written out independently of tf_same_pad's formula.
    assert tf_same_pad(224, 3, 2) == (0, 1)
    assert tf_same_pad(224, 5, 2) == (1, 2)
    assert tf_same_pad(225, 3, 2) == (1, 1)
    assert tf_same_pad(225, 5, 2) == (2, 2)


def test_pad_formula_equals_timm_ceil_form():
    from timm.layers.padding import get_same_padding

    for size, k, s, d in itertools.product(range(1, 300), (1, 2, 3, 5, 7), (1, 2, 3), (1, 2)):
        assert sum(tf_same_pad(size, k, s, d)) == get_same_padding(size, k, s, d), (size, k, s, d)


def _timm_twin(variant: str, model: torch.nn.Module) -> torch.nn.Module:
    ref = timm.create_model('tf_' + variant.replace('effnet_v1_', 'efficientnet_')).eval()
    ref.load_state_dict(model.state_dict())
    return ref


def _max_rel_diff(a: torch.nn.Module, b: torch.nn.Module, size) -> float:
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(size[0] * 1000 + size[1]))
    with torch.inference_mode():
        ya, yb = a(x), b(x)
    return ((ya - yb).abs().max() / yb.abs().max()).item()


@pytest.fixture(scope='module')
def b0_pair():
    ours = realistic_init_(timm.create_model('effnet_v1_b0', drop_path_rate=0.0))
    return ours, _timm_twin('effnet_v1_b0', ours)


@pytest.mark.parametrize('variant', [v for v in VARIANTS if v != 'effnet_v1_l2'])
def test_logits_match_timm_tf_port(variant):
    """Native size, and off-native odd, even and non-square sizes."""
    ours = realistic_init_(timm.create_model(variant, drop_path_rate=0.0), calib_size=96)
    ref = _timm_twin(variant, ours)
    native = VARIANTS[variant].resolution
    for size in [(native, native), (225, 225), (256, 192), (97, 130)]:
        assert _max_rel_diff(ours, ref, size) <= REL_TOL, size


def test_symmetric_padding_is_caught(b0_pair, monkeypatch):
    """The classic porting bug, PyTorch-style symmetric padding on stride-2 convs, fails the parity check."""
    ours, ref = b0_pair

    def symmetric_forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.kernel_size[0] // 2, self.dilation, self.groups)

    monkeypatch.setattr(Conv2dTfSame, 'forward', symmetric_forward)
    assert _max_rel_diff(ours, ref, (224, 224)) > 100 * REL_TOL
    monkeypatch.undo()
    assert _max_rel_diff(ours, ref, (224, 224)) <= REL_TOL


def test_pytorch_default_bn_eps_is_caught(b0_pair):
    """The other classic bug, BatchNorm eps 1e-5 instead of TF's 1e-3, fails the parity check."""
    ours, ref = b0_pair
    bns = [m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(bn.eps == 1e-3 for bn in bns)
    try:
        for bn in bns:
            bn.eps = 1e-5
        assert _max_rel_diff(ours, ref, (224, 224)) > 100 * REL_TOL
    finally:
        for bn in bns:
            bn.eps = 1e-3


def test_bn_momentum_is_tf_decay():
    model = timm.create_model('effnet_v1_b0')
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}


def test_feature_map_is_ceil_of_input_over_32():
    model = timm.create_model('effnet_v1_b0').eval()
    with torch.inference_mode():
        assert model.forward_features(torch.randn(1, 3, 225, 193)).shape[-2:] == (8, 7)


def test_stochastic_depth_grows_linearly_with_block_index():
    model = timm.create_model('effnet_v1_b0', drop_path_rate=0.2)
    rates = [getattr(b.drop_path, 'drop_prob', 0.0) for stage in model.blocks for b in stage]
    assert rates == pytest.approx([0.2 * i / 16 for i in range(16)])
    assert timm.create_model('effnet_v1_b4').drop_rate == 0.4  # official dropout from the variant table


def test_training_step_runs_and_drop_path_is_active():
    torch.manual_seed(0)
    model = timm.create_model('effnet_v1_b0', num_classes=5).train()
    x = torch.randn(2, 3, 64, 64)
    out1, out2 = model(x), model(x)
    assert not torch.allclose(out1, out2)  # dropout + stochastic depth are live in training
    out1.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
