"""TensorFlow references for `--verify`: logits of an official checkpoint computed without PyTorch.

Two independent implementations take the checkpoint's variables (`'<scope>/<name>' → array`, EMA or raw
values already chosen, under the raw names) and an already normalized float32 NHWC batch:

* `tf_graph_logits`: the official `efficientnet_model` graph rewritten with `tf.nn` ops, any width/depth;
* `keras_logits`: `keras.applications.EfficientNetB0..B7` with the official variables assigned to it.

The official layer names are spelled out here on purpose instead of reusing `mapping.official_layout`:
an oracle that shared the converter's name table would repeat its mistakes.
TensorFlow is imported lazily, so the converter runs without it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from effnet_timm.models.config import VARIANTS, BlockConfig, block_table, head_filters, stem_filters

from .errors import CheckpointError
from .mapping import BN_NAMES, EMA_SUFFIX, RMSPROP_SUFFIXES, model_scope

__all__ = ['tf_graph_logits', 'keras_logits', 'load_official_variables', 'KERAS_VARIANTS']

BN_EPSILON = 1e-3  # official global_params.batch_norm_epsilon; Keras' BatchNormalization default too
KERAS_VARIANTS = {f'effnet_v1_b{n}': f'EfficientNetB{n}' for n in range(8)}  # keras.applications has no B8/L2
_BN_FIELDS = ('gamma', 'beta', 'moving_mean', 'moving_variance')


def _tensorflow():
    try:
        import tensorflow as tf
    except ImportError:
        raise RuntimeError('--verify needs TensorFlow: pip install "effnet-timm[test]"') from None
    return tf


class _Variables:
    """The checkpoint's variables below one scope, each checked against the shape the graph needs."""

    def __init__(self, variables: Mapping[str, np.ndarray], scope: str):
        self._variables, self._scope = variables, scope
        # TPU-trained checkpoints name BN layers `tpu_batch_normalization`, GPU-trained ones `batch_normalization`.
        self.bn = next((bn for bn in BN_NAMES if f'{scope}/stem/{bn}/gamma' in variables), None)
        if self.bn is None:
            raise CheckpointError(
                f"scope '{scope}': no stem batch norm variable ({' or '.join(f'stem/{bn}/gamma' for bn in BN_NAMES)})"
            )
        dense = variables.get(f'{scope}/head/dense/kernel')
        if dense is None or np.ndim(dense) != 2:
            raise CheckpointError(f"variable '{scope}/head/dense/kernel' is missing or not [channels, classes]")
        self.num_classes = int(np.shape(dense)[1])

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        full = f'{self._scope}/{name}'
        if full not in self._variables:
            raise CheckpointError(f"variable '{full}' is missing")
        value = np.asarray(self._variables[full], dtype=np.float32)
        if value.shape != shape:
            raise CheckpointError(f"variable '{full}': shape {list(value.shape)}, expected {list(shape)}")
        return value

    def conv(self, layer: str, k: int, cin: int, cout: int) -> np.ndarray:
        return self.get(f'{layer}/kernel', (k, k, cin, cout))

    def batch_norm(self, layer: str, channels: int) -> list[np.ndarray]:
        return [self.get(f'{layer}/{field}', (channels,)) for field in _BN_FIELDS]


def _block_layers(cfg: BlockConfig, bn: str) -> dict[str, str]:
    """Official layer names of one block by role. TF numbers layers of one type in creation order, so
    without an expand conv the depthwise BN takes the plain name and the project conv is `conv2d`."""
    p = f'blocks_{cfg.index}'
    if cfg.has_expand_conv:
        names = dict(
            expand=f'{p}/conv2d',
            expand_bn=f'{p}/{bn}',
            dw_bn=f'{p}/{bn}_1',
            project=f'{p}/conv2d_1',
            project_bn=f'{p}/{bn}_2',
        )
    else:
        names = dict(dw_bn=f'{p}/{bn}', project=f'{p}/conv2d', project_bn=f'{p}/{bn}_1')
    names.update(dw=f'{p}/depthwise_conv2d', se_reduce=f'{p}/se/conv2d', se_expand=f'{p}/se/conv2d_1')
    return names


def _as_batch(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f'images: shape {list(images.shape)}, expected a normalized NHWC batch [N, H, W, 3]')
    return images


# ---------------------------------------------------------------------------------------------------------
# The official graph in tf.nn ops


def tf_graph_logits(
    variables: Mapping[str, np.ndarray], scope: str, images: np.ndarray, width: float, depth: float
) -> np.ndarray:
    """Logits [N, classes] of the official EfficientNet graph at inference (BN on moving statistics,
    no dropout or drop-connect) for the network of this width/depth."""
    tf = _tensorflow()
    params = _Variables(variables, scope)
    bn = params.bn
    x = tf.constant(_as_batch(images))
    stem = stem_filters(width)
    x = tf.nn.silu(_batch_norm(tf, _conv(tf, x, params.conv('stem/conv2d', 3, 3, stem), 2), params, f'stem/{bn}', stem))
    blocks = block_table(width, depth)
    for cfg in blocks:
        x = _mbconv_block(tf, x, params, cfg)
    head = head_filters(width)
    x = _conv(tf, x, params.conv('head/conv2d', 1, blocks[-1].output_filters, head))
    x = tf.reduce_mean(tf.nn.silu(_batch_norm(tf, x, params, f'head/{bn}', head)), [1, 2])
    kernel = params.get('head/dense/kernel', (head, params.num_classes))
    bias = params.get('head/dense/bias', (params.num_classes,))
    return tf.nn.bias_add(tf.matmul(x, kernel), bias).numpy()


def _conv(tf, x, kernel: np.ndarray, stride: int = 1):
    return tf.nn.conv2d(x, kernel, strides=stride, padding='SAME')


def _batch_norm(tf, x, params: _Variables, layer: str, channels: int):
    gamma, beta, mean, variance = params.batch_norm(layer, channels)
    # The op the official graph runs: Keras BatchNormalization is fused for 4-D NHWC inputs.
    y, _, _ = tf.compat.v1.nn.fused_batch_norm(
        x, gamma, beta, mean=mean, variance=variance, epsilon=BN_EPSILON, is_training=False
    )
    return y


def _mbconv_block(tf, inputs, params: _Variables, cfg: BlockConfig):
    """`efficientnet_model.MBConvBlock.call` at inference."""
    names, mid, k = _block_layers(cfg, params.bn), cfg.expanded_filters, cfg.kernel_size
    x = inputs
    if cfg.has_expand_conv:
        x = _conv(tf, x, params.conv(names['expand'], 1, cfg.input_filters, mid))
        x = tf.nn.silu(_batch_norm(tf, x, params, names['expand_bn'], mid))
    dw = params.get(f'{names["dw"]}/depthwise_kernel', (k, k, mid, 1))
    x = tf.nn.depthwise_conv2d(x, dw, strides=[1, cfg.stride, cfg.stride, 1], padding='SAME')
    x = tf.nn.silu(_batch_norm(tf, x, params, names['dw_bn'], mid))
    x = _squeeze_excite(tf, x, params, names, mid, cfg.se_reduced_filters)
    x = _conv(tf, x, params.conv(names['project'], 1, mid, cfg.output_filters))
    x = _batch_norm(tf, x, params, names['project_bn'], cfg.output_filters)
    return x + inputs if cfg.has_residual else x


def _squeeze_excite(tf, x, params: _Variables, names: dict[str, str], channels: int, reduced: int):
    se = tf.reduce_mean(x, [1, 2], keepdims=True)
    se = tf.nn.bias_add(
        _conv(tf, se, params.conv(names['se_reduce'], 1, channels, reduced)),
        params.get(f'{names["se_reduce"]}/bias', (reduced,)),
    )
    se = tf.nn.bias_add(
        _conv(tf, tf.nn.silu(se), params.conv(names['se_expand'], 1, reduced, channels)),
        params.get(f'{names["se_expand"]}/bias', (channels,)),
    )
    return tf.sigmoid(se) * x


# ---------------------------------------------------------------------------------------------------------
# keras.applications.EfficientNetB0..B7


def keras_logits(variables: Mapping[str, np.ndarray], scope: str, images: np.ndarray, variant: str) -> np.ndarray:
    """Logits [N, classes] of Keras' own EfficientNet (B0-B7) carrying the official variables."""
    if variant not in KERAS_VARIANTS:
        raise ValueError(f"keras_logits: Keras has no '{variant}' (it has {', '.join(KERAS_VARIANTS)})")
    _tensorflow()  # the clear error when TensorFlow is missing; Keras needs it as its backend anyway
    import keras

    if keras.backend.backend() != 'tensorflow':
        raise RuntimeError(
            f"keras_logits needs the TensorFlow Keras backend, not '{keras.backend.backend()}' (unset KERAS_BACKEND)"
        )
    images = _as_batch(images)
    params = _Variables(variables, scope)
    spec = VARIANTS[variant]
    model = getattr(keras.applications, KERAS_VARIANTS[variant])(
        weights=None,
        include_top=True,
        classifier_activation=None,
        input_shape=images.shape[1:],
        classes=params.num_classes,
    )
    model = _without_preprocessing(keras, model)
    _assign(model, _keras_weights(params, spec.width, spec.depth))
    return np.asarray(model(images, training=False))


def _without_preprocessing(keras, model):
    """The network from the stem padding on: Keras' Rescaling(1/255) and Normalization in front of it
    would re-normalize inputs that are normalized already."""
    trimmed = keras.Model(model.get_layer('stem_conv_pad').input, model.output)
    leftovers = [
        layer.name
        for layer in trimmed.layers
        if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization))
    ]
    if leftovers:
        raise RuntimeError(f'Keras EfficientNet: preprocessing layers {leftovers} remain after the stem cut')
    return trimmed


def _keras_weights(params: _Variables, width: float, depth: float) -> dict[str, dict[str, np.ndarray]]:
    """Keras layer name → {Keras weight name: official value}."""

    def conv(layer: str, k: int, cin: int, cout: int) -> dict[str, np.ndarray]:
        return {'kernel': params.conv(layer, k, cin, cout)}

    def norm(layer: str, channels: int) -> dict[str, np.ndarray]:
        return dict(zip(_BN_FIELDS, params.batch_norm(layer, channels)))

    bn, stem, head = params.bn, stem_filters(width), head_filters(width)
    weights = {'stem_conv': conv('stem/conv2d', 3, 3, stem), 'stem_bn': norm(f'stem/{bn}', stem)}
    blocks = block_table(width, depth)
    for cfg in blocks:
        names, mid, se = _block_layers(cfg, bn), cfg.expanded_filters, cfg.se_reduced_filters
        # Keras letters the repeats of each stage: blocks_3 of B0 (stage 2, second block) is 'block3b_'.
        repeat = cfg.index - next(b.index for b in blocks if b.stage == cfg.stage)
        prefix = f'block{cfg.stage + 1}{chr(ord("a") + repeat)}_'
        if cfg.has_expand_conv:
            weights[f'{prefix}expand_conv'] = conv(names['expand'], 1, cfg.input_filters, mid)
            weights[f'{prefix}expand_bn'] = norm(names['expand_bn'], mid)
        k = cfg.kernel_size
        weights[f'{prefix}dwconv'] = {'kernel': params.get(f'{names["dw"]}/depthwise_kernel', (k, k, mid, 1))}
        weights[f'{prefix}bn'] = norm(names['dw_bn'], mid)
        weights[f'{prefix}se_reduce'] = {
            **conv(names['se_reduce'], 1, mid, se),
            'bias': params.get(f'{names["se_reduce"]}/bias', (se,)),
        }
        weights[f'{prefix}se_expand'] = {
            **conv(names['se_expand'], 1, se, mid),
            'bias': params.get(f'{names["se_expand"]}/bias', (mid,)),
        }
        weights[f'{prefix}project_conv'] = conv(names['project'], 1, mid, cfg.output_filters)
        weights[f'{prefix}project_bn'] = norm(names['project_bn'], cfg.output_filters)
    weights['top_conv'] = conv('head/conv2d', 1, blocks[-1].output_filters, head)
    weights['top_bn'] = norm(f'head/{bn}', head)
    weights['predictions'] = {
        'kernel': params.get('head/dense/kernel', (head, params.num_classes)),
        'bias': params.get('head/dense/bias', (params.num_classes,)),
    }
    return weights


def _assign(model, weights: dict[str, dict[str, np.ndarray]]) -> None:
    """Every Keras weight gets exactly one official value of its exact shape; nothing stays random."""
    layers = {layer.name: layer for layer in model.layers if layer.weights}
    unknown = sorted(set(weights) - set(layers))
    unfilled = sorted(set(layers) - set(weights))
    if unknown or unfilled:
        raise RuntimeError(
            f'Keras EfficientNet layers do not match the official network: '
            f'not in Keras {unknown[:3]}, not assigned {unfilled[:3]}'
        )
    for name, layer in layers.items():
        values = weights[name]
        if sorted(w.name for w in layer.weights) != sorted(values):
            raise RuntimeError(
                f"Keras layer '{name}' has weights {[w.name for w in layer.weights]}, expected {sorted(values)}"
            )
        for w in layer.weights:
            if tuple(w.shape) != values[w.name].shape:
                raise RuntimeError(
                    f"Keras weight '{w.path}': shape {list(w.shape)}, official value has {list(values[w.name].shape)}"
                )
            w.assign(values[w.name])


# ---------------------------------------------------------------------------------------------------------
# Reading a checkpoint with TensorFlow itself (the oracle path of the tests)


def load_official_variables(prefix: str | os.PathLike, ema: bool = True) -> tuple[dict[str, np.ndarray], str]:
    """The model variables of a checkpoint via `tf.train.load_checkpoint`, under their raw names, and
    the model scope. With `ema`, a variable's ExponentialMovingAverage shadow replaces it where present.
    `global_step` and RMSProp slots are dropped."""
    reader = _tensorflow().train.load_checkpoint(str(prefix))
    names = set(reader.get_variable_to_shape_map())
    variables = {}
    for name in sorted(names):
        if name == 'global_step' or name.endswith(RMSPROP_SUFFIXES) or name.endswith(EMA_SUFFIX):
            continue
        shadow = name + EMA_SUFFIX
        variables[name] = reader.get_tensor(shadow if ema and shadow in names else name)
    return variables, model_scope(variables)
