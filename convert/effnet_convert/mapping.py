"""Official TF variable names and layouts ↔ the effnet_timm state dict.

The table is generated from the same per-block channel table the model is built from, so it names
every official variable of any width/depth with its TF shape, its state-dict key and its layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from effnet_timm.models.config import (
    ALL_VARIANTS,
    FAMILIES,
    block_table,
    head_filters,
    stem_filters,
)

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
    layout: str  # 'conv' (HWIO), 'depthwise' (HWC1), 'dense' (IO), 'vector', or 'condconv' (experts x flat HWIO/HWC1)
    expert_shape: tuple[int, ...] = ()  # 'condconv': one expert's TF kernel shape (kh, kw, cin, cout) or (kh, kw, C, 1)


def to_torch_layout(array: np.ndarray, layout: str, expert_shape: tuple[int, ...] = ()) -> np.ndarray:
    """TF layout → PyTorch layout (contiguous)."""
    if layout in ('condconv', 'condconv_dw'):
        # [E, kh*kw*cin*cout] row-major HWIO (HWC1) -> [E, cout*cin*kh*kw] ([E, C*1*kh*kw]) as timm's CondConv2d
        experts = array.reshape(array.shape[0], *expert_shape)
        perm = (0, 3, 4, 1, 2) if layout == 'condconv_dw' else (0, 4, 3, 1, 2)
        return np.ascontiguousarray(experts.transpose(perm).reshape(array.shape[0], -1))
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


def _keras_name(base: str, count: int) -> str:
    return base if count == 0 else f'{base}_{count}'


def _condconv_block(tf: str, key: str, cfg, ordinal: int, bns: tuple[str, str, str]) -> list[Slot]:
    """A CondConv block's variables. Its CondConv layers are Keras layers, named by a graph-wide counter
    (3 `cond_conv2d` per block, the first an unused fused conv; 1 `depthwise_cond_conv2d`) under `model/`."""
    experts, mid, k = cfg.num_experts, cfg.expanded_filters, cfg.kernel_size
    cin, cout = cfg.input_filters, cfg.output_filters

    def cc(name: str, slot_key: str, shape: tuple[int, ...]) -> Slot:
        layout = 'condconv_dw' if name.endswith('depthwise_condconv_kernel') else 'condconv'
        return Slot(name, slot_key, (experts, int(np.prod(shape))), layout, shape)

    expand = _keras_name('cond_conv2d', 3 * ordinal + 1)
    project = _keras_name('cond_conv2d', 3 * ordinal + 2)
    depthwise = _keras_name('depthwise_cond_conv2d', ordinal)
    return [
        Slot(f'{tf}/dense/kernel', f'{key}.routing_fn.weight', (cin, experts), 'dense'),
        Slot(f'{tf}/dense/bias', f'{key}.routing_fn.bias', (experts,), 'vector'),
        cc(f'model/{tf}/{expand}/condconv_kernel', f'{key}.conv_pw.weight', (1, 1, cin, mid)),
        *_bn(f'{tf}/{bns[0]}', f'{key}.bn1', mid),
        cc(f'model/{tf}/{depthwise}/depthwise_condconv_kernel', f'{key}.conv_dw.weight', (k, k, mid, 1)),
        *_bn(f'{tf}/{bns[1]}', f'{key}.bn2', mid),
        *_se(tf, key, cfg, mid),
        cc(f'model/{tf}/{project}/condconv_kernel', f'{key}.conv_pwl.weight', (1, 1, mid, cout)),
        *_bn(f'{tf}/{bns[2]}', f'{key}.bn3', cout),
    ]


def _se(tf: str, key: str, cfg, mid: int) -> list[Slot]:
    if not cfg.has_se:
        return []
    se = cfg.se_reduced_filters
    return [
        _conv(f'{tf}/se/conv2d', f'{key}.se.conv_reduce', 1, mid, se),
        Slot(f'{tf}/se/conv2d/bias', f'{key}.se.conv_reduce.bias', (se,), 'vector'),
        _conv(f'{tf}/se/conv2d_1', f'{key}.se.conv_expand', 1, se, mid),
        Slot(f'{tf}/se/conv2d_1/bias', f'{key}.se.conv_expand.bias', (mid,), 'vector'),
    ]


def official_layout(
    width: float,
    depth: float,
    num_classes: int = 1000,
    bn: str = BN_NAMES[0],
    family: str = 'efficientnet',
    num_experts: int = 0,
) -> list[Slot]:
    """Every model variable of the official graph at this scale, in checkpoint-independent order."""
    bn0, bn1, bn2 = bn, f'{bn}_1', f'{bn}_2'
    stem, head = stem_filters(width, family=family), head_filters(width, family=family)
    slots = [_conv('stem/conv2d', 'conv_stem', 3, 3, stem), *_bn(f'stem/{bn0}', 'bn1', stem)]
    blocks = block_table(width, depth, family=family, num_experts=num_experts)
    condconv_ordinal = 0
    for cfg in blocks:
        tf, repeat = f'blocks_{cfg.index}', cfg.index - next(b.index for b in blocks if b.stage == cfg.stage)
        key = f'blocks.{cfg.stage}.{repeat}'
        mid, k = cfg.expanded_filters, cfg.kernel_size
        if cfg.fused:  # EdgeTPU's MBConvBlockWithoutDepthwise: conv2d (3x3, strided) → bn → conv2d_1 → bn_1
            slots += [
                _conv(f'{tf}/conv2d', f'{key}.conv_exp', 3, cfg.input_filters, mid),
                *_bn(f'{tf}/{bn0}', f'{key}.bn1', mid),
                _conv(f'{tf}/conv2d_1', f'{key}.conv_pwl', 1, mid, cfg.output_filters),
                *_bn(f'{tf}/{bn1}', f'{key}.bn2', cfg.output_filters),
            ]
            continue
        if cfg.condconv:
            slots += _condconv_block(tf, key, cfg, condconv_ordinal, (bn0, bn1, bn2))
            condconv_ordinal += 1
            continue
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
        slots += [
            Slot(f'{tf}/depthwise_conv2d/depthwise_kernel', f'{key}.conv_dw.weight', (k, k, mid, 1), 'depthwise'),
            *_bn(*dw_bn, mid),
            *_se(tf, key, cfg, mid),
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
    """What a checkpoint holds: the registered variant (or the generic one), its family and scale."""

    variant: str  # a registered official variant ('effnet_v1_b0', 'effnet_v1_lite0', ...), or 'effnet_v1'
    width: float
    depth: float
    num_classes: int
    scope: str
    bn: str
    family: str = 'efficientnet'
    num_experts: int = 0
    # layout name (below the scope) -> the checkpoint's own name, where they differ (CondConv's Keras numbering)
    aliases: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def model_args(self) -> dict[str, float]:
        args: dict[str, float] = {'num_classes': self.num_classes}
        if self.variant == 'effnet_v1':
            args.update(width_coefficient=self.width, depth_coefficient=self.depth)
            if self.family != 'efficientnet':
                args.update(family=self.family, num_experts=self.num_experts)
        return args

    def layout(self) -> list[Slot]:
        return official_layout(self.width, self.depth, self.num_classes, self.bn, self.family, self.num_experts)

    def tf_name(self, slot: Slot) -> str:
        """The full checkpoint name of a layout variable."""
        return f'{self.scope}/{self.aliases.get(slot.tf_name, slot.tf_name)}'


def model_scope(names: Iterable[str]) -> str:
    """The one top-level scope holding `stem/conv2d/kernel` (e.g. 'efficientnet-b0', 'edgetpunet-S')."""
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


_CONDCONV_NAME = re.compile(
    r'^(?:model/)?blocks_(\d+)/(depthwise_)?cond_conv2d(?:_(\d+))?/(?:depthwise_)?condconv_kernel$'
)


def _condconv_aliases(signature: dict[str, tuple[int, ...]], layout: list[Slot]) -> dict[str, str]:
    """Layout name -> checkpoint name for the CondConv kernels, matched per block and in creation order.

    The Keras layer counter in these names (`cond_conv2d_K`) depends on how the graph was built (and the
    `model/` prefix on the Keras version), so a block's kernels are matched by role: its plain CondConv
    kernels in increasing K are expand then project, and its one depthwise kernel. Shapes are checked
    strictly afterwards, like every other variable."""
    found: dict[tuple[str, bool], list[tuple[int, str]]] = {}
    for name in signature:
        match = _CONDCONV_NAME.match(name)
        if match:
            block, depthwise, count = match.group(1), bool(match.group(2)), int(match.group(3) or 0)
            found.setdefault((block, depthwise), []).append((count, name))
    wanted: dict[tuple[str, bool], list[str]] = {}
    for slot in layout:
        match = _CONDCONV_NAME.match(slot.tf_name)
        if match:
            wanted.setdefault((match.group(1), bool(match.group(2))), []).append(slot.tf_name)
    aliases = {}
    for group, names in wanted.items():
        have = [name for _, name in sorted(found.get(group, []))]
        if len(have) == len(names):
            aliases.update({want: got for want, got in zip(names, have) if want != got})
    return aliases


def _num_blocks(signature: dict[str, tuple[int, ...]]) -> int:
    return len(
        {n.split('/')[0] for n in signature if n.startswith('blocks_')}
        | {n.split('/')[1] for n in signature if n.startswith('model/blocks_')}
    )


def _detect_family(signature: dict[str, tuple[int, ...]]) -> tuple[str, int]:
    """(family, CondConv experts) from what only that family's builder makes."""
    experts = {s[0] for n, s in signature.items() if _CONDCONV_NAME.match(n)}
    if experts:
        if len(experts) != 1:
            raise CheckpointError(f'CondConv kernels with different numbers of experts: {sorted(experts)}')
        return 'condconv', experts.pop()
    kernel = signature.get('blocks_0/conv2d/kernel')
    if kernel is not None and kernel[0] == 3 and 'blocks_0/depthwise_conv2d/depthwise_kernel' not in signature:
        return 'edgetpu', 0  # a 3x3 expansion conv and no depthwise: MBConvBlockWithoutDepthwise
    if not any('/se/' in n for n in signature):
        return 'lite', 0
    return 'efficientnet', 0


def _layout_matches(
    signature: dict[str, tuple[int, ...]], width: float, depth: float, num_classes: int, bn: str, family, experts
) -> dict[str, str] | None:
    """The CondConv aliases if every variable of the layout is there with its shape and there are no further
    blocks, else None. Other extra variables are left for the converter to report by name."""
    slots = official_layout(width, depth, num_classes, bn, family, experts)
    aliases = _condconv_aliases(signature, slots)
    ok = all(signature.get(aliases.get(s.tf_name, s.tf_name)) == s.tf_shape for s in slots)
    blocks = len({s.tf_name.split('blocks_')[1].split('/')[0] for s in slots if 'blocks_' in s.tf_name})
    return aliases if ok and _num_blocks(signature) == blocks else None


def _grid(step: float, limit: float = 6.0) -> list[float]:
    n = round(1 / step)
    return [round(i / n, 2) for i in range(1, int(limit * n) + 1)]


def _candidate_scales(
    signature: dict[str, tuple[int, ...]], family: str = 'efficientnet'
) -> Iterable[tuple[float, float]]:
    """(width, depth) pairs whose stem, head and block count fit, coarse grids first, so the reported
    coefficients are the simplest ones that rebuild exactly this network."""
    stem = signature.get('stem/conv2d/kernel', (0,) * 4)[-1]
    head = signature.get('head/conv2d/kernel', (0,) * 4)[-1]
    num_blocks = _num_blocks(signature)
    experts = 1 if FAMILIES[family].condconv else 0
    seen = set()
    for step in (0.25, 0.1, 0.05):
        widths = [
            w for w in _grid(step) if stem_filters(w, family=family) == stem and head_filters(w, family=family) == head
        ]
        depths = [d for d in _grid(step) if len(block_table(1.0, d, family=family, num_experts=experts)) == num_blocks]
        for scale in ((w, d) for w in widths for d in depths):
            if scale not in seen:
                seen.add(scale)
                yield scale


def _family_variants(family: str, experts: int) -> dict:
    return {n: v for n, v in ALL_VARIANTS.items() if v.family == family and v.num_experts == experts}


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
    family, experts = _detect_family(signature)

    def matches(width: float, depth: float) -> dict[str, str] | None:
        return _layout_matches(signature, width, depth, num_classes, bn, family, experts)

    candidates = _family_variants(family, experts)
    found, aliases = None, None
    for name, spec in candidates.items():
        aliases = matches(spec.width, spec.depth)
        if aliases is not None:
            found = name
            break
    if variant is not None and variant != 'effnet_v1':
        if variant not in ALL_VARIANTS:
            raise CheckpointError(f"unknown variant '{variant}' (known: {', '.join(ALL_VARIANTS)})")
        if variant != found:
            spec = ALL_VARIANTS[variant]
            difference = _first_difference(
                signature, scope, spec.width, spec.depth, num_classes, bn, spec.family, spec.num_experts
            )
            raise CheckpointError(
                f'--variant {variant} disagrees with the checkpoint: its tensors are '
                f'{found or "no official variant"} ({_describe(signature, scope)}); first difference: {difference}'
            )
    if found:
        spec = ALL_VARIANTS[found]
        return Architecture(found, spec.width, spec.depth, num_classes, scope, bn, family, experts, aliases)
    for scale in _candidate_scales(signature, family):
        aliases = matches(*scale)
        if aliases is not None:
            return Architecture('effnet_v1', scale[0], scale[1], num_classes, scope, bn, family, experts, aliases)
    where = '' if family == 'efficientnet' else f' of the {family} family'
    raise CheckpointError(
        f"scope '{scope}': the tensors match no EfficientNet V1 layout{where} at any width/depth "
        f'({_describe(signature, scope)}){_closest(signature, scope, num_classes, bn, family, experts)}'
    )


def _first_difference(
    signature: dict[str, tuple[int, ...]],
    scope: str,
    width: float,
    depth: float,
    num_classes: int,
    bn: str,
    family: str = 'efficientnet',
    experts: int = 0,
) -> str:
    """The first variable of the layout that is missing or shaped otherwise, by its full name."""
    slots = official_layout(width, depth, num_classes, bn, family, experts)
    aliases = _condconv_aliases(signature, slots)
    for slot in slots:
        name = aliases.get(slot.tf_name, slot.tf_name)
        found = signature.get(name)
        if found is None:
            return f"tensor '{scope}/{name}' is missing"
        if found != slot.tf_shape:
            return f"tensor '{scope}/{name}' has shape {found}, expected {slot.tf_shape}"
    return f'{_num_blocks(signature)} blocks'


def _closest(
    signature: dict[str, tuple[int, ...]], scope: str, num_classes: int, bn: str, family: str, experts: int
) -> str:
    """'; as <layout>: <first difference>' for the layout whose stem, head and block count fit, if any:
    usually one variable is missing or damaged, and naming it beats naming the scale."""
    scales = list(_candidate_scales(signature, family))
    official = [(n, v) for n, v in _family_variants(family, experts).items() if (v.width, v.depth) in scales]
    if official:
        label, (width, depth) = official[0][0], (official[0][1].width, official[0][1].depth)
    elif scales:
        (width, depth) = scales[0]
        label = f'width {width}, depth {depth}'
    else:
        return ''
    return f'; as {label}: {_first_difference(signature, scope, width, depth, num_classes, bn, family, experts)}'


def _describe(signature: dict[str, tuple[int, ...]], scope: str) -> str:
    stem = signature.get('stem/conv2d/kernel', (0, 0, 0, '?'))[-1]
    head = signature.get('head/conv2d/kernel', (0, 0, 0, '?'))[-1]
    return f"scope '{scope}', stem {stem}, head {head}, {_num_blocks(signature)} blocks"
