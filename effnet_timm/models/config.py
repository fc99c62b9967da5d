"""The official EfficientNet V1 architecture as data: variant table, scaling rules, per-block channel table.

Everything here follows tensorflow/tpu `models/official/efficientnet` (`efficientnet_builder.py`,
`efficientnet_model.py`). `block_table` yields rows with the same field names as the `blocks` table in
the official manifests (`params.blocks`), so the two can be compared field by field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    'VariantSpec',
    'StageSpec',
    'BlockConfig',
    'FamilySpec',
    'VARIANTS',
    'FAMILY_VARIANTS',
    'ALL_VARIANTS',
    'FAMILIES',
    'BASE_STAGES',
    'round_filters',
    'round_repeats',
    'block_table',
    'stem_filters',
    'head_filters',
]


@dataclass(frozen=True)
class VariantSpec:
    """Compound scaling of one official variant (`efficientnet_builder.efficientnet_params`)."""

    width: float
    depth: float
    resolution: int
    dropout: float
    official_name: str
    family: str = 'efficientnet'  # a key of FAMILIES
    num_experts: int = 0  # CondConv experts per CondConv layer (CondConv family only)


VARIANTS: dict[str, VariantSpec] = {
    'effnet_v1_b0': VariantSpec(1.0, 1.0, 224, 0.2, 'efficientnet-b0'),
    'effnet_v1_b1': VariantSpec(1.0, 1.1, 240, 0.2, 'efficientnet-b1'),
    'effnet_v1_b2': VariantSpec(1.1, 1.2, 260, 0.3, 'efficientnet-b2'),
    'effnet_v1_b3': VariantSpec(1.2, 1.4, 300, 0.3, 'efficientnet-b3'),
    'effnet_v1_b4': VariantSpec(1.4, 1.8, 380, 0.4, 'efficientnet-b4'),
    'effnet_v1_b5': VariantSpec(1.6, 2.2, 456, 0.4, 'efficientnet-b5'),
    'effnet_v1_b6': VariantSpec(1.8, 2.6, 528, 0.5, 'efficientnet-b6'),
    'effnet_v1_b7': VariantSpec(2.0, 3.1, 600, 0.5, 'efficientnet-b7'),
    'effnet_v1_b8': VariantSpec(2.2, 3.6, 672, 0.5, 'efficientnet-b8'),
    'effnet_v1_l2': VariantSpec(4.3, 5.3, 800, 0.5, 'efficientnet-l2'),
}


@dataclass(frozen=True)
class StageSpec:
    """One line of the official base network (`_DEFAULT_BLOCKS_ARGS`, e.g. 'r2_k3_s22_e6_i16_o24_se0.25')."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    input_filters: int
    output_filters: int
    se_ratio: float = 0.25
    fused: bool = False  # EdgeTPU `c1`: a 3x3 expansion conv carrying the stride, no depthwise, no SE
    id_skip: bool = True  # EdgeTPU's first stage is `noskip`
    condconv: bool = False  # CondConv `_cc`: expand, depthwise and project convs mix per-example experts


BASE_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)
BASE_STEM_FILTERS = 32
BASE_HEAD_FILTERS = 1280


@dataclass(frozen=True)
class BlockConfig:
    """One MBConv block, named like a row of the official channel table."""

    index: int
    stage: int
    kernel_size: int
    stride: int
    input_filters: int
    expanded_filters: int
    output_filters: int
    se_reduced_filters: int
    has_expand_conv: bool
    has_residual: bool
    # The other V1 families (defaults: the B-series block). `input_filters` is what the block receives;
    # the official builder computes the expansion width from the *declared* input (Lite's fixed stem
    # and EdgeTPU's wide stem feed block 0 more channels than its table row says).
    declared_input_filters: int = 0
    fused: bool = False
    id_skip: bool = True
    has_se: bool = True
    num_experts: int = 0  # > 0: a CondConv block

    @property
    def condconv(self) -> bool:
        return self.num_experts > 0


def round_filters(filters: float, width: float, divisor: int = 8, min_depth: int | None = None) -> int:
    """Official `round_filters`: scale, round to the divisor, never drop more than 10 %."""
    scaled = filters * width
    min_depth = min_depth or divisor
    rounded = max(min_depth, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Official `round_repeats`: always round depth up."""
    return int(math.ceil(depth * repeats))


def stem_filters(width: float, divisor: int = 8, family: str = 'efficientnet') -> int:
    if FAMILIES[family].fix_stem_head:
        return BASE_STEM_FILTERS
    return round_filters(BASE_STEM_FILTERS, width, divisor)


def head_filters(width: float, divisor: int = 8, family: str = 'efficientnet') -> int:
    if FAMILIES[family].fix_stem_head:
        return BASE_HEAD_FILTERS
    return round_filters(BASE_HEAD_FILTERS, width, divisor)


def block_table(
    width: float, depth: float, divisor: int = 8, family: str = 'efficientnet', num_experts: int = 0
) -> list[BlockConfig]:
    """Every block of the scaled network, in the official (flat `blocks_N`) order.

    `family` picks the base network and its rules (`FAMILIES`); `num_experts` sizes the CondConv blocks.
    """
    spec = FAMILIES[family]
    if spec.condconv and num_experts < 1:
        raise ValueError(f"family '{family}' needs num_experts >= 1, got {num_experts}")
    rows: list[BlockConfig] = []
    prev_out = stem_filters(width, divisor, family)
    last_stage = len(spec.stages) - 1
    for stage_idx, stage in enumerate(spec.stages):
        in_filters = round_filters(stage.input_filters, width, divisor)
        out_filters = round_filters(stage.output_filters, width, divisor)
        # Lite keeps the first and last stages' repeats (`fix_head_stem`).
        fixed = spec.fix_stem_head and stage_idx in (0, last_stage)
        repeats = stage.repeats if fixed else round_repeats(stage.repeats, depth)
        for repeat in range(repeats):
            # Later repeats of a stage take the stage output as input and never stride.
            declared_in = in_filters if repeat == 0 else out_filters
            block_in = prev_out  # what the previous layer delivers (differs from declared_in only at block 0)
            stride = stage.stride if repeat == 0 else 1
            expanded = declared_in * stage.expand_ratio if stage.expand_ratio != 1 else block_in
            # The fused block compares the declared widths, MBConvBlock the actual tensors' channels.
            skip_in = declared_in if stage.fused else block_in
            rows.append(
                BlockConfig(
                    index=len(rows),
                    stage=stage_idx,
                    kernel_size=stage.kernel_size,
                    stride=stride,
                    input_filters=block_in,
                    expanded_filters=expanded,
                    output_filters=out_filters,
                    # SE width comes from the block *input* filters (tensorflow/tpu#616), not the expanded ones.
                    se_reduced_filters=max(1, int(declared_in * stage.se_ratio)) if spec.use_se else 0,
                    has_expand_conv=stage.expand_ratio != 1,
                    has_residual=stage.id_skip and stride == 1 and skip_in == out_filters,
                    declared_input_filters=declared_in,
                    fused=stage.fused,
                    id_skip=stage.id_skip,
                    has_se=spec.use_se and not stage.fused,
                    num_experts=num_experts if stage.condconv else 0,
                )
            )
            prev_out = out_filters
    return rows


# --- the other official V1 families (tensorflow/tpu models/official/efficientnet/{lite,edgetpu,condconv}) ---


@dataclass(frozen=True)
class FamilySpec:
    """A family's builder rules: base network, activation, SE, stem/head scaling, classes."""

    stages: tuple[StageSpec, ...]
    activation: str  # 'swish', 'relu6' or 'relu' (GlobalParams.relu_fn: stem, blocks, head)
    use_se: bool = True
    fix_stem_head: bool = False  # Lite: stem 32 / head 1280 and the first and last stages' repeats unscaled
    num_classes: int = 1000  # EdgeTPU: 1001, logit 0 is a background class
    condconv: bool = False
    tiny_scope: str = 'efficientnet-tiny'  # scope of the width/depth 0.25 fixture made by this builder


EDGETPU_STAGES: tuple[StageSpec, ...] = (  # edgetpu/efficientnet_edgetpu_builder.py `blocks_args`
    StageSpec(1, 3, 1, 4, 24, 24, fused=True, id_skip=False),
    StageSpec(2, 3, 2, 8, 24, 32, fused=True),
    StageSpec(4, 3, 2, 8, 32, 48, fused=True),
    StageSpec(5, 5, 2, 8, 48, 96),
    StageSpec(4, 5, 1, 8, 96, 144),
    StageSpec(2, 5, 2, 8, 144, 192),
)
# condconv/efficientnet_condconv_builder.py: the B0 base with `_cc` on the last three stages.
CONDCONV_STAGES: tuple[StageSpec, ...] = BASE_STAGES[:4] + tuple(
    StageSpec(s.repeats, s.kernel_size, s.stride, s.expand_ratio, s.input_filters, s.output_filters, condconv=True)
    for s in BASE_STAGES[4:]
)

FAMILIES: dict[str, FamilySpec] = {
    'efficientnet': FamilySpec(BASE_STAGES, 'swish'),
    'lite': FamilySpec(BASE_STAGES, 'relu6', use_se=False, fix_stem_head=True, tiny_scope='efficientnet-lite-tiny'),
    'edgetpu': FamilySpec(
        EDGETPU_STAGES, 'relu', use_se=False, num_classes=1001, tiny_scope='efficientnet-edgetpu-tiny'
    ),
    'condconv': FamilySpec(CONDCONV_STAGES, 'swish', condconv=True, tiny_scope='efficientnet-condconv-tiny'),
}

FAMILY_VARIANTS: dict[str, VariantSpec] = {
    # lite/efficientnet_lite_builder.efficientnet_lite_params
    'effnet_v1_lite0': VariantSpec(1.0, 1.0, 224, 0.2, 'efficientnet-lite0', 'lite'),
    'effnet_v1_lite1': VariantSpec(1.0, 1.1, 240, 0.2, 'efficientnet-lite1', 'lite'),
    'effnet_v1_lite2': VariantSpec(1.1, 1.2, 260, 0.3, 'efficientnet-lite2', 'lite'),
    'effnet_v1_lite3': VariantSpec(1.2, 1.4, 280, 0.3, 'efficientnet-lite3', 'lite'),
    'effnet_v1_lite4': VariantSpec(1.4, 1.8, 300, 0.3, 'efficientnet-lite4', 'lite'),
    # edgetpu/efficientnet_edgetpu_builder.efficientnet_edgetpu_params
    'effnet_v1_edgetpu_s': VariantSpec(1.0, 1.0, 224, 0.2, 'efficientnet-edgetpu-S', 'edgetpu'),
    'effnet_v1_edgetpu_m': VariantSpec(1.0, 1.1, 240, 0.2, 'efficientnet-edgetpu-M', 'edgetpu'),
    'effnet_v1_edgetpu_l': VariantSpec(1.2, 1.4, 300, 0.3, 'efficientnet-edgetpu-L', 'edgetpu'),
    # condconv/efficientnet_condconv_builder.efficientnet_condconv_params
    'effnet_v1_condconv_b0_4e': VariantSpec(1.0, 1.0, 224, 0.25, 'efficientnet-condconv-b0-4e', 'condconv', 4),
    'effnet_v1_condconv_b0_8e': VariantSpec(1.0, 1.0, 224, 0.25, 'efficientnet-condconv-b0-8e', 'condconv', 8),
    'effnet_v1_condconv_b0_8e_depth': VariantSpec(
        1.0, 1.1, 224, 0.25, 'efficientnet-condconv-b0-8e-depth', 'condconv', 8
    ),
}
# `VARIANTS` stays the B-series (timm's `tf_efficientnet_*` twins, the Keras reference); every registered
# official network is in `ALL_VARIANTS`.
ALL_VARIANTS: dict[str, VariantSpec] = {**VARIANTS, **FAMILY_VARIANTS}
