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
    'VARIANTS',
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


def stem_filters(width: float, divisor: int = 8) -> int:
    return round_filters(BASE_STEM_FILTERS, width, divisor)


def head_filters(width: float, divisor: int = 8) -> int:
    return round_filters(BASE_HEAD_FILTERS, width, divisor)


def block_table(width: float, depth: float, divisor: int = 8) -> list[BlockConfig]:
    """Every block of the scaled network, in the official (flat `blocks_N`) order."""
    rows: list[BlockConfig] = []
    for stage_idx, stage in enumerate(BASE_STAGES):
        in_filters = round_filters(stage.input_filters, width, divisor)
        out_filters = round_filters(stage.output_filters, width, divisor)
        for repeat in range(round_repeats(stage.repeats, depth)):
            # Later repeats of a stage take the stage output as input and never stride.
            block_in = in_filters if repeat == 0 else out_filters
            stride = stage.stride if repeat == 0 else 1
            rows.append(
                BlockConfig(
                    index=len(rows),
                    stage=stage_idx,
                    kernel_size=stage.kernel_size,
                    stride=stride,
                    input_filters=block_in,
                    expanded_filters=block_in * stage.expand_ratio,
                    output_filters=out_filters,
                    # SE width comes from the block *input* filters (tensorflow/tpu#616), not the expanded ones.
                    se_reduced_filters=max(1, int(block_in * stage.se_ratio)),
                    has_expand_conv=stage.expand_ratio != 1,
                    has_residual=stride == 1 and block_in == out_filters,
                )
            )
    return rows
