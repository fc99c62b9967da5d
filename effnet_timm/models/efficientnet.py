"""EffNetV1: the official EfficientNet V1 graph with timm's model API."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier, get_device_dtype

from ..compat import efficientnet_init_weights, feature_take_indices
from .blocks import conv_bn_act_, create_block, inplace_allowed, unobserved_triple
from .config import FAMILIES, BlockConfig, block_table, head_filters, stem_filters
from .layers import create_conv
from .recompute import checkpoint, recompute_activations, strip_recipe
from .recompute_layers import BatchNormRecompute2d, ReLU6Recompute, ReLURecompute, SwishRecompute

__all__ = ['EffNetV1', 'BN_EPS_TF', 'BN_MOMENTUM_TF']

BN_EPS_TF = 1e-3
BN_MOMENTUM_TF = 0.01  # TF's decay 0.99 expressed as PyTorch momentum
STOCHASTIC_DEPTH_TF = 0.2  # official `survival_prob` 0.8 at the last block
_ACTIVATIONS = {'swish': SwishRecompute, 'relu6': ReLU6Recompute, 'relu': ReLURecompute}


class Stage(nn.Sequential):
    """A stage's blocks. With gradient checkpointing each block is checkpointed from inside the stage's own
    forward, so hooks on the stage (an FSDP2 unit gathering its parameters, a profiler) still run; timm's
    `checkpoint_seq(..., flatten=True)` calls the blocks past their stage."""

    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in self:
                x = checkpoint(block, x)  # leaves BatchNorm buffers as a plain step does
            return x
        for block in self:
            x = block(x)
        return x


class EffNetV1(nn.Module):
    """EfficientNet V1 for any width/depth coefficient, computing what tensorflow/tpu computes.

    `width_coefficient` / `depth_coefficient` scale the official base network exactly as
    `efficientnet_builder` does, so any official-format checkpoint (B0 … L2 or a custom scale) fits.
    `memory_efficient` (default True; `set_memory_efficient`) makes a training forward keep only the
    conv outputs for backward and recompute the tensors between them (`effnet_timm.models.recompute`).
    """

    def __init__(
        self,
        width_coefficient: float = 1.0,
        depth_coefficient: float = 1.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = 'avg',
        drop_rate: float = 0.2,
        drop_path_rate: float = STOCHASTIC_DEPTH_TF,
        output_stride: int = 32,
        depth_divisor: int = 8,
        bn_eps: float = BN_EPS_TF,
        bn_momentum: float = BN_MOMENTUM_TF,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        memory_efficient: bool = True,
        family: str = 'efficientnet',
        num_experts: int = 0,
    ) -> None:
        super().__init__()
        assert output_stride in (8, 16, 32), 'output_stride must be 8, 16 or 32'
        self.width_coefficient = width_coefficient
        self.depth_coefficient = depth_coefficient
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.memory_efficient = memory_efficient
        if family not in FAMILIES:
            raise ValueError(f"family '{family}' is not one of {', '.join(FAMILIES)}")
        self.family, self.num_experts = family, num_experts  # Lite/EdgeTPU/CondConv: `config.FAMILIES`
        # Swish (ReLU6 for Lite, ReLU for EdgeTPU), a module of its own after each BatchNorm (see recompute_layers)
        act_layer = _ACTIVATIONS[FAMILIES[family].activation]
        norm_layer = partial(BatchNormRecompute2d, eps=bn_eps, momentum=bn_momentum)

        # timm's device/dtype factory arguments: build in place (e.g. on 'meta' without allocating).
        with torch.device(device) if device is not None else nullcontext():
            self.block_cfgs: list[BlockConfig] = block_table(
                width_coefficient, depth_coefficient, depth_divisor, family, num_experts
            )
            stem_chs = stem_filters(width_coefficient, depth_divisor, family)
            self.conv_stem = create_conv(in_chans, stem_chs, 3, stride=2)
            self.bn1 = norm_layer(stem_chs)
            self.act1 = act_layer()

            self.blocks, self.feature_info = self._build_stages(norm_layer, act_layer, drop_path_rate, output_stride)
            self.stage_ends = [info['stage'] for info in self.feature_info]

            self.num_features = head_filters(width_coefficient, depth_divisor, family)
            self.conv_head = create_conv(self.block_cfgs[-1].output_filters, self.num_features, 1)
            self.bn2 = norm_layer(self.num_features)
            self.act2 = act_layer()
            self.global_pool, self.classifier = create_classifier(self.num_features, num_classes, pool_type=global_pool)
            self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

            efficientnet_init_weights(self)
        if dtype is not None:
            self.to(dtype=dtype)

    def _build_stages(
        self,
        norm_layer: Any,
        act_layer: Any,
        drop_path_rate: float,
        output_stride: int,
    ) -> tuple[nn.Sequential, list[dict[str, Any]]]:
        """Blocks nested as `blocks.<stage>.<repeat>`, and a feature level wherever the resolution halves next."""
        num_blocks = len(self.block_cfgs)
        stage_cfgs: list[list[BlockConfig]] = []
        for cfg in self.block_cfgs:
            if cfg.stage == len(stage_cfgs):
                stage_cfgs.append([])
            stage_cfgs[-1].append(cfg)

        stride, dilation = 2, 1  # after the stem
        stages: list[Stage] = []
        feature_info: list[dict[str, Any]] = []
        for stage_idx, cfgs in enumerate(stage_cfgs):
            blocks = []
            for cfg in cfgs:
                block_dilation = dilation
                if cfg.stride > 1 and stride * cfg.stride > output_stride:
                    # Keep the resolution and dilate the following convs instead (timm's output_stride).
                    dilation *= cfg.stride
                    cfg = replace(cfg, stride=1)
                else:
                    stride *= cfg.stride
                # Stochastic depth grows linearly with the block index, as `survival_prob` in TF.
                rate = drop_path_rate * cfg.index / num_blocks
                blocks.append(create_block(cfg, norm_layer, act_layer, nn.SiLU, block_dilation, rate))
            stages.append(Stage(*blocks))
            is_last = stage_idx + 1 == len(stage_cfgs)
            if is_last or stage_cfgs[stage_idx + 1][0].stride > 1:
                feature_info.append(
                    dict(
                        num_chs=cfgs[-1].output_filters,
                        reduction=stride,
                        module=f'blocks.{stage_idx}',
                        stage=stage_idx + 1,
                    )
                )
        return nn.Sequential(*stages), feature_info

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r'^conv_stem|bn1|act1',
            blocks=[
                (r'^blocks\.(\d+)' if coarse else r'^blocks\.(\d+)\.(\d+)', None),
                (r'conv_head|bn2|act2', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.blocks:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_memory_efficient(self, enable: bool = True) -> None:
        """Training keeps only conv outputs for backward (True, the default) or what plain autograd keeps."""
        self.memory_efficient = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.classifier = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **get_device_dtype(self)
        )
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = 'NCHW',
        intermediates_only: bool = False,
        extra_blocks: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Features at the `feature_info` levels (strides 2, 4, 8, 16, 32), optionally with the final map.

        Args as timm's EfficientNet: with `extra_blocks`, `indices` count the stem (0) and every stage
        (1..7) instead of the `feature_info` levels, as generic timm callers expect.
        """
        if not torch.jit.is_scripting():
            if self._recomputes_activations():  # features_only models train through here
                with recompute_activations():
                    out = self._forward_intermediates(
                        x, indices, stop_early, output_fmt, intermediates_only, extra_blocks
                    )
                if intermediates_only:
                    return [strip_recipe(t) for t in out]
                return strip_recipe(out[0]), [strip_recipe(t) for t in out[1]]
        return self._forward_intermediates(x, indices, stop_early, output_fmt, intermediates_only, extra_blocks)

    def _forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None,
        stop_early: bool,
        output_fmt: str,
        intermediates_only: bool,
        extra_blocks: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        assert output_fmt == 'NCHW', 'Output format must be NCHW.'
        if extra_blocks:  # 0: the stem, 1..: each stage
            take_stages, last_stage = feature_take_indices(len(self.blocks) + 1, indices)
        else:
            take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
            take_stages = [self.stage_ends[i] for i in take_indices]
            last_stage = self.stage_ends[max_index]

        x = self._stem(x)
        intermediates = [x] if 0 in take_stages else []
        stages = self.blocks[:last_stage] if stop_early and not torch.jit.is_scripting() else self.blocks
        stage_idx = 0
        for stage_idx, stage in enumerate(stages, start=1):
            x = stage(x)  # checkpoints its blocks itself when enabled
            if stage_idx in take_stages:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if stage_idx == len(self.blocks):
            x = self._head(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop what the requested feature levels do not need."""
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        num_chs = self.feature_info[max_index]['num_chs']
        last_stage = self.stage_ends[max_index]
        prune_end = prune_norm or prune_head or last_stage < len(self.blocks)
        self.blocks = self.blocks[:last_stage]
        if prune_end:
            # The head conv is sized for the final stage, so it goes with any truncation.
            self.conv_head = nn.Identity()
            self.bn2 = nn.Identity()
            self.act2 = nn.Identity()
            self.num_features = self.head_hidden_size = num_chs
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self._recomputes_activations():
                with recompute_activations():
                    return strip_recipe(self._forward_features(x))
        return self._forward_features(x)

    def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)
        x = self.blocks(x)  # each stage checkpoints its blocks itself when enabled
        return self._head(x)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if inplace_allowed(x) and self._unobserved(self.conv_stem, self.bn1, self.act1):
                return conv_bn_act_(self.conv_stem, self.bn1, self.act1, x)
        return self.act1(self.bn1(self.conv_stem(x)))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if inplace_allowed(x) and self._unobserved(self.conv_head, self.bn2, self.act2):
                return conv_bn_act_(self.conv_head, self.bn2, self.act2, x)
        return self.act2(self.bn2(self.conv_head(x)))

    @torch.jit.unused
    def _unobserved(self, conv: nn.Module, bn: nn.Module, act: nn.Module) -> bool:
        return unobserved_triple(conv, bn, act)

    @torch.jit.unused
    def _recomputes_activations(self) -> bool:
        # Checkpointing keeps only block inputs already; compile's partitioner picks its own recomputation.
        return (
            self.memory_efficient
            and self.training
            and torch.is_grad_enabled()
            and not self.grad_checkpointing
            and not torch.compiler.is_compiling()
        )

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
