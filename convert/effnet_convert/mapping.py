"""Official TF variable names and layouts ↔ the effnet_timm state dict.

The table is generated from the same per-block channel table the model is built from, so it names
every official variable of any width/depth with its TF shape, its state-dict key and its layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from effnet_timm.models.config import BASE_STAGES, VARIANTS, block_table, head_filters, round_repeats, stem_filters

from .errors import CheckpointError

EMA_SUFFIX = '/ExponentialMovingAverage'
RMSPROP_SUFFIXES = ('/RMSProp', '/RMSProp_1')
BN_NAMES = ('tpu_batch_normalization', 'batch_normalization')  # TPU-trained / GPU-trained checkpoints
_BN_FIELDS = (
    ('gamma', 'weight'),
    ('beta', 'bias'),
    ('moving_mean', 'running_mean'),
    ('moving_variance', 'running_var'),
)


@dataclass(frozen=True)
class Slot:
    """One official variable: where it goes in the state dict and how its layout changes."""

    tf_name: str  # below the model scope, e.g. 'blocks_3/depthwise_conv2d/depthwise_kernel'
    key: str  # effnet_timm state-dict key
    tf_shape: tuple[int, ...]
    layout: str  # 'conv' (HWIO), 'depthwise' (HWC1), 'dense' (IO) or 'vector'


def to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """TF layout → PyTorch layout (contiguous)."""
    if layout == 'conv':  # [kh, kw, in, out] -> [out, in, kh, kw]
        array = array.transpose(3, 2, 0, 1)
    elif layout == 'depthwise':  # [kh, kw, C, 1] -> [C, 1, kh, kw]; a reshape would scramble channels
        array = array.transpose(2, 3, 0, 1)
    elif layout == 'dense':  # [in, out] -> [out, in]
        array = array.T
    return np.ascontiguousarray(array)


def _conv(tf_name: str, key: str, k: int, cin: int, cout: int) -> Slot:
    return Slot(f'{tf_name}/kernel', f'{key}.weight', (k, k, cin, cout), 'conv')


def _bn(tf_name: str, key: str, chs: int) -> list[Slot]:
    return [Slot(f'{tf_name}/{tf_field}', f'{key}.{field}', (chs,), 'vector') for tf_field, field in _BN_FIELDS]


def official_layout(width: float, depth: float, num_classes: int = 1000, bn: str = BN_NAMES[0]) -> list[Slot]:
    """Every model variable of the official graph at this scale, in checkpoint-independent order."""
    bn0, bn1, bn2 = bn, f'{bn}_1', f'{bn}_2'
    stem, head = stem_filters(width), head_filters(width)
    slots = [_conv('stem/conv2d', 'conv_stem', 3, 3, stem), *_bn(f'stem/{bn0}', 'bn1', stem)]
    blocks = block_table(width, depth)
    for cfg in blocks:
        tf, repeat = f'blocks_{cfg.index}', cfg.index - next(b.index for b in blocks if b.stage == cfg.stage)
        key = f'blocks.{cfg.stage}.{repeat}'
        mid, k = cfg.expanded_filters, cfg.kernel_size
        # Layer names are numbered in creation order, so `conv2d` is the expand conv only when there is one.
        if cfg.has_expand_conv:
            slots += [
                _conv(f'{tf}/conv2d', f'{key}.conv_pw', 1, cfg.input_filters, mid),
                *_bn(f'{tf}/{bn0}', f'{key}.bn1', mid),
            ]
            dw_bn, project, project_bn = (f'{tf}/{bn1}', f'{key}.bn2'), f'{tf}/conv2d_1', (f'{tf}/{bn2}', f'{key}.bn3')
            project_key = f'{key}.conv_pwl'
        else:
            dw_bn, project, project_bn = (f'{tf}/{bn0}', f'{key}.bn1'), f'{tf}/conv2d', (f'{tf}/{bn1}', f'{key}.bn2')
            project_key = f'{key}.conv_pw'
        se = cfg.se_reduced_filters
        slots += [
            Slot(f'{tf}/depthwise_conv2d/depthwise_kernel', f'{key}.conv_dw.weight', (k, k, mid, 1), 'depthwise'),
            *_bn(*dw_bn, mid),
            _conv(f'{tf}/se/conv2d', f'{key}.se.conv_reduce', 1, mid, se),
            Slot(f'{tf}/se/conv2d/bias', f'{key}.se.conv_reduce.bias', (se,), 'vector'),
            _conv(f'{tf}/se/conv2d_1', f'{key}.se.conv_expand', 1, se, mid),
            Slot(f'{tf}/se/conv2d_1/bias', f'{key}.se.conv_expand.bias', (mid,), 'vector'),
            _conv(project, project_key, 1, mid, cfg.output_filters),
            *_bn(*project_bn, cfg.output_filters),
        ]
    slots += [
        _conv('head/conv2d', 'conv_head', 1, blocks[-1].output_filters, head),
        *_bn(f'head/{bn0}', 'bn2', head),
        Slot('head/dense/kernel', 'classifier.weight', (head, num_classes), 'dense'),
        Slot('head/dense/bias', 'classifier.bias', (num_classes,), 'vector'),
    ]
    return slots


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint holds: the registered variant (or the generic one) and its scale."""

    variant: str  # 'effnet_v1_bN' / 'effnet_v1_l2', or 'effnet_v1' for another scale
    width: float
    depth: float
    num_classes: int
    scope: str
    bn: str

    @property
    def model_args(self) -> dict[str, float]:
        args: dict[str, float] = {'num_classes': self.num_classes}
        if self.variant == 'effnet_v1':
            args.update(width_coefficient=self.width, depth_coefficient=self.depth)
        return args


def model_scope(names: Iterable[str]) -> str:
    """The one top-level scope holding `stem/conv2d/kernel` (e.g. 'efficientnet-b0')."""
    scopes = sorted({n[: -len('/stem/conv2d/kernel')] for n in names if n.endswith('/stem/conv2d/kernel')})
    if len(scopes) != 1:
        found = ', '.join(scopes) or 'none'
        raise CheckpointError(f'expected one EfficientNet scope with a stem/conv2d/kernel variable, found {found}')
    return scopes[0]


def _shape_signature(shapes: dict[str, tuple[int, ...]], scope: str) -> dict[str, tuple[int, ...]]:
    prefix = scope + '/'
    return {
        n[len(prefix) :]: s
        for n, s in shapes.items()
        if n.startswith(prefix) and not n.endswith(EMA_SUFFIX) and not n.endswith(RMSPROP_SUFFIXES)
    }


def _num_blocks(signature: dict[str, tuple[int, ...]]) -> int:
    return len({n.split('/')[0] for n in signature if n.startswith('blocks_')})


def _layout_matches(
    signature: dict[str, tuple[int, ...]], width: float, depth: float, num_classes: int, bn: str
) -> bool:
    """Every variable of the layout is there with its shape, and there are no further blocks. Other extra
    variables are left for the converter to report by name."""
    slots = official_layout(width, depth, num_classes, bn)
    return all(signature.get(s.tf_name) == s.tf_shape for s in slots) and _num_blocks(signature) == sum(
        s.tf_name.endswith('depthwise_kernel') for s in slots
    )


def _grid(step: float, limit: float = 6.0) -> list[float]:
    n = round(1 / step)
    return [round(i / n, 2) for i in range(1, int(limit * n) + 1)]


def _candidate_scales(signature: dict[str, tuple[int, ...]]) -> Iterable[tuple[float, float]]:
    """(width, depth) pairs whose stem, head and block count fit, coarse grids first, so the reported
    coefficients are the simplest ones that rebuild exactly this network."""
    stem = signature.get('stem/conv2d/kernel', (0,) * 4)[-1]
    head = signature.get('head/conv2d/kernel', (0,) * 4)[-1]
    num_blocks = _num_blocks(signature)
    seen = set()
    for step in (0.25, 0.1, 0.05):
        widths = [w for w in _grid(step) if stem_filters(w) == stem and head_filters(w) == head]
        depths = [d for d in _grid(step) if sum(round_repeats(s.repeats, d) for s in BASE_STAGES) == num_blocks]
        for scale in ((w, d) for w in widths for d in depths):
            if scale not in seen:
                seen.add(scale)
                yield scale


def detect_architecture(shapes: dict[str, tuple[int, ...]], variant: str | None = None) -> Architecture:
    """Which network the checkpoint's variables describe, from their names and shapes alone.

    `variant` (a user's claim) must agree with what the tensors say.
    """
    scope = model_scope(shapes)
    signature = _shape_signature(shapes, scope)
    bn = next((b for b in BN_NAMES if f'stem/{b}/gamma' in signature), None)
    if bn is None or 'head/dense/kernel' not in signature:
        raise CheckpointError(
            f"scope '{scope}': no stem batch norm or head/dense/kernel; not an EfficientNet checkpoint"
        )
    num_classes = signature['head/dense/kernel'][1]

    def matches(width: float, depth: float) -> bool:
        return _layout_matches(signature, width, depth, num_classes, bn)

    found = next((name for name, spec in VARIANTS.items() if matches(spec.width, spec.depth)), None)
    if variant is not None and variant != 'effnet_v1':
        if variant not in VARIANTS:
            raise CheckpointError(f"unknown variant '{variant}' (known: {', '.join(VARIANTS)})")
        if variant != found:
            spec = VARIANTS[variant]
            difference = _first_difference(signature, scope, spec.width, spec.depth, num_classes, bn)
            raise CheckpointError(
                f'--variant {variant} disagrees with the checkpoint: its tensors are '
                f'{found or "no official variant"} ({_describe(signature, scope)}); first difference: {difference}'
            )
    if found:
        spec = VARIANTS[found]
        return Architecture(found, spec.width, spec.depth, num_classes, scope, bn)
    scale = next((s for s in _candidate_scales(signature) if matches(*s)), None)
    if scale is None:
        raise CheckpointError(
            f"scope '{scope}': the tensors match no EfficientNet V1 layout at any width/depth "
            f'({_describe(signature, scope)}){_closest(signature, scope, num_classes, bn)}'
        )
    return Architecture('effnet_v1', scale[0], scale[1], num_classes, scope, bn)


def _first_difference(
    signature: dict[str, tuple[int, ...]], scope: str, width: float, depth: float, num_classes: int, bn: str
) -> str:
    """The first variable of the layout that is missing or shaped otherwise, by its full name."""
    for slot in official_layout(width, depth, num_classes, bn):
        found = signature.get(slot.tf_name)
        if found is None:
            return f"tensor '{scope}/{slot.tf_name}' is missing"
        if found != slot.tf_shape:
            return f"tensor '{scope}/{slot.tf_name}' has shape {found}, expected {slot.tf_shape}"
    return f'{_num_blocks(signature)} blocks'


def _closest(signature: dict[str, tuple[int, ...]], scope: str, num_classes: int, bn: str) -> str:
    """'; as <layout>: <first difference>' for the layout whose stem, head and block count fit, if any:
    usually one variable is missing or damaged, and naming it beats naming the scale."""
    scales = list(_candidate_scales(signature))
    official = [(n, v) for n, v in VARIANTS.items() if (v.width, v.depth) in scales]
    if official:
        label, (width, depth) = official[0][0], (official[0][1].width, official[0][1].depth)
    elif scales:
        (width, depth) = scales[0]
        label = f'width {width}, depth {depth}'
    else:
        return ''
    return f'; as {label}: {_first_difference(signature, scope, width, depth, num_classes, bn)}'


def _describe(signature: dict[str, tuple[int, ...]], scope: str) -> str:
    stem = signature.get('stem/conv2d/kernel', (0, 0, 0, '?'))[-1]
    head = signature.get('head/conv2d/kernel', (0, 0, 0, '?'))[-1]
    return f"scope '{scope}', stem {stem}, head {head}, {_num_blocks(signature)} blocks"
