"""The TensorFlow references behind `--verify` reproduce the logits of the official TF graph."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, OFFICIAL, TINY_CKPT

from effnet_convert import tf_reference
from effnet_convert.errors import CheckpointError
from effnet_convert.tf_reference import keras_logits, load_official_variables, tf_graph_logits

pytestmark = pytest.mark.oracle  # every test here needs TensorFlow or ../shared

TINY = FIXTURES / 'efficientnet-tiny'
B0 = OFFICIAL / 'efficientnet-b0'
# Of the largest logit. Both references are well inside: the tf.nn graph is bit-identical to the official
# one here; Keras runs BN unfused (tf.nn.batch_normalization), which rounds differently: ~3e-6 on B0.
REL_TOL = 1e-5


@cache
def _official(folder: Path, ema: bool) -> tuple[dict[str, np.ndarray], str, np.ndarray, np.ndarray, dict]:
    """(variables, scope, inputs, official logits, manifest params) of a fixture folder, read once."""
    prefix = TINY_CKPT if folder == TINY else folder / 'model.ckpt'
    if not Path(f'{prefix}.index').exists():
        pytest.skip(f'{folder} is absent (../shared is not beside this checkout)')
    variables, scope = load_official_variables(prefix, ema)
    logits = np.load(folder / ('logits_ema.npy' if ema else 'logits_raw.npy'))
    params = json.loads((folder / 'manifest.json').read_text())['params']
    return variables, scope, np.load(folder / 'inputs.npy'), logits, params


def _graph(variables, scope, inputs, params) -> np.ndarray:
    return tf_graph_logits(variables, scope, inputs, params['width_coefficient'], params['depth_coefficient'])


def rel_diff(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def assert_reproduces(ours: np.ndarray, reference: np.ndarray, rel_tol: float = REL_TOL) -> None:
    assert ours.shape == reference.shape
    assert rel_diff(ours, reference) <= rel_tol
    np.testing.assert_array_equal(np.argsort(-ours, 1)[:, :5], np.argsort(-reference, 1)[:, :5])


# ---------------------------------------------------------------------------------------------------------
# Reading the checkpoint with TensorFlow


def test_load_official_variables_drops_bookkeeping(tf) -> None:
    folder = FIXTURES / 'efficientnet-tiny-rmsprop'  # the efficientnet-tiny network plus RMSProp slots
    manifest = json.loads((folder / 'manifest.json').read_text())
    reader = tf.train.load_checkpoint(str(folder / 'model.ckpt'))
    inputs = np.load(TINY / 'inputs.npy')
    for ema, kind in ((True, 'ema'), (False, 'raw')):
        variables, scope = load_official_variables(folder / 'model.ckpt', ema)
        assert scope == 'efficientnet-tiny'
        assert len(variables) == manifest['checkpoint']['num_model_variables']
        assert not [n for n in variables if n == 'global_step' or '/RMSProp' in n or 'ExponentialMovingAverage' in n]
        name = 'efficientnet-tiny/head/dense/bias'
        source = f'{name}/ExponentialMovingAverage' if ema else name
        np.testing.assert_array_equal(variables[name], reader.get_tensor(source))
        logits = np.load(folder / f'logits_{kind}.npy')
        assert_reproduces(_graph(variables, scope, inputs, manifest['params']), logits)


# ---------------------------------------------------------------------------------------------------------
# tf.nn graph and Keras against the official graph's logits


@pytest.mark.parametrize('folder', [TINY, B0], ids=['tiny', 'b0'])
@pytest.mark.parametrize('ema', [True, False], ids=['ema', 'raw'])
def test_graph_reproduces_official_logits(tf, folder: Path, ema: bool) -> None:
    variables, scope, inputs, logits, params = _official(folder, ema)
    assert_reproduces(_graph(variables, scope, inputs, params), logits)


def test_graph_accepts_gpu_batch_norm_names(tf) -> None:
    variables, scope, inputs, logits, params = _official(TINY, True)
    renamed = {n.replace('/tpu_batch_normalization', '/batch_normalization'): v for n, v in variables.items()}
    assert renamed.keys() != variables.keys()
    assert_reproduces(_graph(renamed, scope, inputs, params), logits)


def test_keras_reproduces_official_b0_logits(tf) -> None:
    variables, scope, inputs, logits, _ = _official(B0, True)
    assert_reproduces(keras_logits(variables, scope, inputs, 'effnet_v1_b0'), logits)


def test_keras_and_graph_agree_on_odd_sizes(tf) -> None:
    """193 px halves to 97, 49, 25, 13: every stride-2 layer sees an odd size, which the fixtures
    (224 px, all even) never exercise."""
    variables, scope, inputs, _, params = _official(B0, True)
    inputs = inputs[:, :193, :193]
    assert_reproduces(keras_logits(variables, scope, inputs, 'effnet_v1_b0'), _graph(variables, scope, inputs, params))


@pytest.mark.parametrize('kernel_size', [3, 5])
@pytest.mark.parametrize('size', [14, 15], ids=['even', 'odd'])
def test_keras_stride2_padding_is_tf_same(tf, kernel_size: int, size: int) -> None:
    import keras
    from keras.src.applications.imagenet_utils import correct_pad

    rng = np.random.default_rng(size * kernel_size)
    x = rng.standard_normal((2, size, size, 4)).astype(np.float32)
    kernel = rng.standard_normal((kernel_size, kernel_size, 4, 1)).astype(np.float32)
    inputs = keras.Input((size, size, 4))
    padded = keras.layers.ZeroPadding2D(correct_pad(inputs, kernel_size))(inputs)
    conv = keras.layers.DepthwiseConv2D(kernel_size, strides=2, padding='valid', use_bias=False)
    model = keras.Model(inputs, conv(padded))
    conv.kernel.assign(kernel)
    expected = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 2, 2, 1], padding='SAME').numpy()
    np.testing.assert_array_equal(np.asarray(model(x)), expected)


# ---------------------------------------------------------------------------------------------------------
# The oracle can fail: mistakes are loud


def test_wrong_batch_norm_assignment_disagrees(tf) -> None:
    """Expand BN and depthwise BN have the same shape, so only the logits can catch swapping them."""
    variables, scope, inputs, logits, params = _official(TINY, True)
    swapped = dict(variables)
    bn, dw_bn, project_bn = '/tpu_batch_normalization/', '/tpu_batch_normalization_1/', '/tpu_batch_normalization_2/'
    expanding = [n for n in variables if dw_bn in n and n.replace(dw_bn, project_bn) in variables]
    assert len(expanding) == 6 * 4  # tiny: 6 blocks with an expand conv, 4 variables per BN
    for name in expanding:
        plain = name.replace(dw_bn, bn)
        swapped[name], swapped[plain] = variables[plain], variables[name]
    assert rel_diff(_graph(swapped, scope, inputs, params), logits) > 0.1


def test_wrong_epsilon_disagrees(tf, monkeypatch) -> None:
    variables, scope, inputs, logits, params = _official(TINY, True)
    monkeypatch.setattr(tf_reference, 'BN_EPSILON', 1e-5)  # PyTorch's default, a classic porting slip
    assert rel_diff(_graph(variables, scope, inputs, params), logits) > 0.1


def test_swapped_se_convs_are_refused(tf) -> None:
    variables, scope, inputs, _, params = _official(TINY, True)
    swapped = dict(variables)
    reduce, expand = f'{scope}/blocks_0/se/conv2d/kernel', f'{scope}/blocks_0/se/conv2d_1/kernel'
    swapped[reduce], swapped[expand] = variables[expand], variables[reduce]
    message = r"blocks_0/se/conv2d/kernel': shape \[1, 1, 2, 8\], expected \[1, 1, 8, 2\]"
    with pytest.raises(CheckpointError, match=message):
        _graph(swapped, scope, inputs, params)


def test_missing_variable_and_bad_inputs_are_refused(tf) -> None:
    variables, scope, inputs, _, params = _official(TINY, True)
    incomplete = {n: v for n, v in variables.items() if not n.endswith('blocks_3/depthwise_conv2d/depthwise_kernel')}
    with pytest.raises(CheckpointError, match='blocks_3/depthwise_conv2d/depthwise_kernel.* is missing'):
        _graph(incomplete, scope, inputs, params)
    with pytest.raises(CheckpointError, match=r'stem/conv2d/kernel.*expected \[3, 3, 3, 16\]'):
        tf_graph_logits(variables, scope, inputs, 0.5, 0.25)  # the wrong width for this checkpoint
    with pytest.raises(ValueError, match='NHWC'):
        _graph(variables, scope, inputs.transpose(0, 3, 1, 2), params)
    with pytest.raises(ValueError, match="Keras has no 'effnet_v1_b8'"):
        keras_logits(variables, scope, inputs, 'effnet_v1_b8')


def test_without_tensorflow(monkeypatch) -> None:
    script = (
        "import sys; sys.modules['tensorflow'] = sys.modules['keras'] = None; "
        'import effnet_convert.tf_reference, effnet_convert.verify'
    )
    subprocess.run([sys.executable, '-c', script], check=True)
    monkeypatch.setitem(sys.modules, 'tensorflow', None)  # makes `import tensorflow` raise ImportError
    with pytest.raises(RuntimeError, match=r'^--verify needs TensorFlow: pip install "effnet-timm\[test\]"$'):
        load_official_variables(TINY_CKPT)
