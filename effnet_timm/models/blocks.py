"""The two shapes of the official MBConv block.

Module names follow timm's `DepthwiseSeparableConv` / `InvertedResidual`, so state dicts line up key for
key with timm's `tf_efficientnet_*` ports. Each Swish is its own module after its BatchNorm (`act1`,
`act2`, as in timm's blocks before `BatchNormAct2d`), so SyncBatchNorm converters cannot drop it
(`effnet_timm.models.recompute_layers`).

In-place inference: where nothing can observe the tensors a block makes between its convs, the block
writes BatchNorm, Swish, the SE scaling and the residual sum into the conv output it already holds, and
each conv then allocates the block's only new tensors. Allocating is most of the cost of these
elementwise steps on CPU (a fresh large tensor is fresh pages from the kernel), so this is what puts the
eager model ahead of timm's. `inplace_allowed` decides at run time; the result is the same bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import CondConv2d, DropPath

from ..compat import SqueezeExcite, global_module_hooks_registered
from .config import BlockConfig
from .layers import INPLACE_SAFE_CONVS, create_conv, pad_before
from .recompute import attach_recipe, recipe_of
from .recompute_layers import BatchNormRecompute2d, SwishRecompute

__all__ = [
    'DepthwiseSeparable',
    'InvertedResidual',
    'CondConvInvertedResidual',
    'FusedInvertedResidual',
    'SqueezeExciteRecompute',
    'conv_bn_act_',
    'create_block',
    'inplace_allowed',
    'unobserved_triple',
]

NormFactory = Callable[..., nn.Module]
ActFactory = Callable[[], nn.Module]


class SqueezeExciteRecompute(SqueezeExcite):
    """timm's `SqueezeExcite` (same modules and keys) whose output carries a recompute recipe.

    When its input can be recomputed (a recorded Swish output), so can `x * gate`: the projection conv
    then keeps neither for backward (`effnet_timm.models.recompute`). The recipe holds the gate itself (which
    the multiply keeps anyway), so a double backward differentiates through it.

    Its Swish is not in place (timm's is): a hook on `conv_reduce` keeps what it was given; the tensor is
    one number per channel, so this costs nothing.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(getattr(self.act1, 'inplace', None), bool):
            self.act1.inplace = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate(self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True)))))
        out = x * gate
        if not torch.jit.is_scripting():
            if not torch.compiler.is_compiling() and torch.is_grad_enabled() and recipe_of(x) is not None:
                attach_recipe(out, torch.mul, x, gate)
        return out


# --- in-place inference ---------------------------------------------------------------------------------

# Exact types (not subclasses, which may do anything) whose output is a tensor of their own that they keep
# no reference to, and whose forward the in-place path restates.
_NORM_TYPES = (BatchNormRecompute2d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Identity)
_ACT_TYPES = (SwishRecompute, nn.SiLU, nn.Identity)
_DROP_PATH_TYPES = (DropPath, nn.Identity)


def _global_hooks() -> bool:
    return global_module_hooks_registered()  # torch internals: effnet_timm/compat.py


def inplace_allowed(x: torch.Tensor) -> bool:
    """Whether a forward on `x` may overwrite the tensors it makes between convs (per-module checks aside).

    Not where autograd records (grad mode on: a tensor that requires grad may be saved for backward), not
    where a graph is recorded (torch.jit.trace, torch.compile, torch.export, FX: the graph keeps the
    plain ops), not for tensor subclasses, and not while any global module hook could be handed one of them.
    TorchScript never gets here (callers check `torch.jit.is_scripting()` first).
    """
    return (
        not torch.is_grad_enabled()
        and type(x) is torch.Tensor
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not _global_hooks()
    )


def _unobserved(m: nn.Module, types: tuple[type, ...]) -> bool:
    """`m` is one of `types` exactly and carries no hook that could be handed (or keep) its input or output."""
    return type(m) in types and not (
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
    )


def _unobserved_conv(m: nn.Module) -> bool:
    # nn.Conv2d, our TF-'SAME' conv and FusedConv2d (exact types) return a tensor no one else holds.
    return _unobserved(m, tuple(INPLACE_SAFE_CONVS))


def unobserved_triple(conv: nn.Module, bn: nn.Module, act: nn.Module) -> bool:
    """Whether `conv_bn_act_` may run on these modules: known types, no hooks."""
    return _unobserved_conv(conv) and _unobserved(bn, _NORM_TYPES) and _unobserved(act, _ACT_TYPES)


def conv_bn_act_(conv: nn.Module, bn: nn.Module, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`act(bn(conv(x)))` written into the conv's output; for callers that checked `inplace_allowed` and
    that `conv`, `bn`, `act` are unobserved. `x` itself is never written."""
    x = conv(x)
    if type(bn) is not nn.Identity:
        if _batch_norm_inplace_ok(bn, x):
            # Eval BatchNorm's own kernel, writing over its input: the same numbers as F.batch_norm.
            empty = x.new_empty(0)
            torch.ops.aten.native_batch_norm.out(
                x, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.0, bn.eps,
                out=x, save_mean=empty, save_invstd=empty.clone(),
            )  # fmt: skip
        else:
            x = bn(x)  # a new tensor, ours alone
    if type(act) is not nn.Identity:
        x = F.silu(x, inplace=True)
    return x


def _batch_norm_inplace_ok(bn: nn.Module, x: torch.Tensor) -> bool:
    # CPU eval with the running statistics, in the parameters' dtype (mixed-precision inputs take
    # F.batch_norm, which converts). CPU only: the kernel's same-index reads and writes are checked there.
    return (
        not bn.training
        and bn.running_mean is not None
        and bn.running_var is not None
        and x.device.type == 'cpu'
        and (bn.weight is None or bn.weight.dtype == x.dtype)
        and bn.running_mean.dtype == x.dtype
    )


_NO_ACT = nn.Identity()


def _se_(se: SqueezeExcite, x: torch.Tensor) -> torch.Tensor:
    """`se(x)` scaling `x` in place (its submodules are called as modules: their hooks see only the gate)."""
    return x.mul_(se.gate(se.conv_expand(se.act1(se.conv_reduce(x.mean((2, 3), keepdim=True))))))


def _se(cfg: BlockConfig, chs: int, se_act_layer: type) -> nn.Module:
    """The block's SE, or Identity where the family has none (Lite, EdgeTPU)."""
    if not cfg.has_se:
        return nn.Identity()
    return SqueezeExciteRecompute(chs, rd_channels=cfg.se_reduced_filters, act_layer=se_act_layer)


class DepthwiseSeparable(nn.Module):
    """Official block with expand_ratio 1: depthwise → BN+Swish → SE → project → BN."""

    def __init__(
        self,
        cfg: BlockConfig,
        norm_layer: NormFactory,
        act_layer: ActFactory,
        se_act_layer: type,
        dilation: int = 1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.has_residual = cfg.has_residual
        chs = cfg.input_filters
        self.conv_dw = create_conv(chs, chs, cfg.kernel_size, cfg.stride, dilation, groups=chs)
        self.bn1 = norm_layer(chs)
        self.act1 = act_layer()
        self.se = _se(cfg, chs, se_act_layer)
        self.conv_pw = create_conv(chs, cfg.output_filters, 1)
        self.bn2 = norm_layer(cfg.output_filters)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if inplace_allowed(x) and self._unobserved():
                return self._forward_inplace(x)
        shortcut = x
        x = self.act1(self.bn1(self.conv_dw(x)))
        x = self.se(x)
        x = self.bn2(self.conv_pw(x))
        if self.has_residual:
            x = self.drop_path(x) + shortcut
        return x

    @torch.jit.unused
    def _unobserved(self) -> bool:
        return (
            _unobserved_conv(self.conv_dw)
            and _unobserved(self.bn1, _NORM_TYPES)
            and _unobserved(self.act1, _ACT_TYPES)
            and _unobserved(self.se, (SqueezeExciteRecompute,))
            and _unobserved_conv(self.conv_pw)
            and _unobserved(self.bn2, _NORM_TYPES)
            and _unobserved(self.drop_path, _DROP_PATH_TYPES)
        )

    @torch.jit.unused
    def _forward_inplace(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = _se_(self.se, conv_bn_act_(self.conv_dw, self.bn1, self.act1, x))
        x = conv_bn_act_(self.conv_pw, self.bn2, _NO_ACT, x)
        if self.has_residual:
            x = self.drop_path(x).add_(shortcut)
        return x


class InvertedResidual(nn.Module):
    """Official block with expansion: expand → BN+Swish → depthwise → BN+Swish → SE → project → BN."""

    def __init__(
        self,
        cfg: BlockConfig,
        norm_layer: NormFactory,
        act_layer: ActFactory,
        se_act_layer: type,
        dilation: int = 1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.has_residual = cfg.has_residual
        mid = cfg.expanded_filters
        self.conv_pw = create_conv(cfg.input_filters, mid, 1)
        self.bn1 = norm_layer(mid)
        self.act1 = act_layer()
        self.conv_dw = create_conv(mid, mid, cfg.kernel_size, cfg.stride, dilation, groups=mid)
        self.bn2 = norm_layer(mid)
        self.act2 = act_layer()
        self.se = _se(cfg, mid, se_act_layer)
        self.conv_pwl = create_conv(mid, cfg.output_filters, 1)
        self.bn3 = norm_layer(cfg.output_filters)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if inplace_allowed(x) and self._unobserved():
                return self._forward_inplace(x)
        shortcut = x
        x = self.act1(self.bn1(self.conv_pw(x)))
        x = self.act2(self.bn2(self.conv_dw(x)))
        x = self.se(x)
        x = self.bn3(self.conv_pwl(x))
        if self.has_residual:
            x = self.drop_path(x) + shortcut
        return x

    @torch.jit.unused
    def _unobserved(self) -> bool:
        return (
            _unobserved_conv(self.conv_pw)
            and _unobserved(self.bn1, _NORM_TYPES)
            and _unobserved(self.act1, _ACT_TYPES)
            and _unobserved_conv(self.conv_dw)
            and _unobserved(self.bn2, _NORM_TYPES)
            and _unobserved(self.act2, _ACT_TYPES)
            and _unobserved(self.se, (SqueezeExciteRecompute,))
            and _unobserved_conv(self.conv_pwl)
            and _unobserved(self.bn3, _NORM_TYPES)
            and _unobserved(self.drop_path, _DROP_PATH_TYPES)
        )

    @torch.jit.unused
    def _forward_inplace(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = conv_bn_act_(self.conv_pw, self.bn1, self.act1, x)
        x = _se_(self.se, conv_bn_act_(self.conv_dw, self.bn2, self.act2, x))
        x = conv_bn_act_(self.conv_pwl, self.bn3, _NO_ACT, x)
        if self.has_residual:
            x = self.drop_path(x).add_(shortcut)  # DropPath returns its input, or (training) a new tensor
        return x


def create_block(
    cfg: BlockConfig,
    norm_layer: NormFactory,
    act_layer: ActFactory,
    se_act_layer: type,
    dilation: int = 1,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    if cfg.fused:
        block_cls = FusedInvertedResidual
    elif cfg.condconv:
        block_cls = CondConvInvertedResidual
    else:
        block_cls = InvertedResidual if cfg.has_expand_conv else DepthwiseSeparable
    return block_cls(cfg, norm_layer, act_layer, se_act_layer, dilation=dilation, drop_path_rate=drop_path_rate)


class FusedInvertedResidual(nn.Module):
    """EdgeTPU's `MBConvBlockWithoutDepthwise`: 3x3 expand (carries the stride) → BN+act → project → BN.

    Module names follow timm's `EdgeResidual` (`conv_exp`, `bn1`, `conv_pwl`, `bn2`). No SE. The official
    residual test compares the block's declared widths (`cfg.has_residual`)."""

    def __init__(
        self,
        cfg: BlockConfig,
        norm_layer: NormFactory,
        act_layer: ActFactory,
        se_act_layer: type,
        dilation: int = 1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.has_residual = cfg.has_residual
        mid = cfg.expanded_filters
        self.conv_exp = create_conv(cfg.input_filters, mid, 3, cfg.stride, dilation)
        self.bn1 = norm_layer(mid)
        self.act1 = act_layer()
        self.conv_pwl = create_conv(mid, cfg.output_filters, 1)
        self.bn2 = norm_layer(cfg.output_filters)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv_exp(x)))
        x = self.bn2(self.conv_pwl(x))
        if self.has_residual:
            x = self.drop_path(x) + shortcut
        return x


class CondConv2dTfSame(CondConv2d):
    """timm's `CondConv2d` (same parameters and expert layout) with `Conv2dTfSame`'s recorded-graph padding where
    it is strided: TF's pad before, `k_eff - 1` in total, so the padded size is free of the input's parity.
    The output is viewed straight from the batch-folded conv (its leading dim is 1), which leaves torch.export
    no guard on the spatial size (timm's `pad_same` and permute-then-view make some)."""

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.dynamic_padding:
            k_h = (self.kernel_size[0] - 1) * self.dilation[0]
            k_w = (self.kernel_size[1] - 1) * self.dilation[1]
            top = pad_before(x.shape[-2], k_h + 1, self.stride[0])
            left = pad_before(x.shape[-1], k_w + 1, self.stride[1])
            x = F.pad(x, [left, k_w - left, top, k_h - top])
            padding = (0, 0)
        batch, channels, height, width = x.shape
        weight = torch.matmul(routing_weights, self.weight)
        weight = weight.view((batch * self.out_channels, self.in_channels // self.groups) + self.kernel_size)
        folded = x.reshape(1, batch * channels, height, width)
        if not torch.jit.is_scripting():
            # The conv keeps this view for backward; as a recipe it does not pin a recomputable input.
            if not torch.compiler.is_compiling() and torch.is_grad_enabled() and recipe_of(x) is not None:
                attach_recipe(folded, torch.reshape, x, (1, batch * channels, height, width))
        out = F.conv2d(folded, weight, None, self.stride, padding, self.dilation, self.groups * batch)
        return out.view(batch, self.out_channels, out.shape[-2], out.shape[-1])


class CondConvInvertedResidual(nn.Module):
    """CondConv's MBConv: expand, depthwise and project convs whose kernels are per-example mixtures of
    `num_experts` kernels, weighted by `sigmoid(routing_fn(mean of the block input))`.

    timm's `CondConv2d` (expert `e` flattened as PyTorch's `[out, in/groups, kh, kw]`, 'same' padding:
    TF's at stride 2, symmetric otherwise); module names follow timm's `CondConvResidual`."""

    def __init__(
        self,
        cfg: BlockConfig,
        norm_layer: NormFactory,
        act_layer: ActFactory,
        se_act_layer: type,
        dilation: int = 1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.has_residual = cfg.has_residual
        experts, mid = cfg.num_experts, cfg.expanded_filters
        self.routing_fn = nn.Linear(cfg.input_filters, experts)
        self.conv_pw = CondConv2dTfSame(cfg.input_filters, mid, 1, padding='same', num_experts=experts)
        self.bn1 = norm_layer(mid)
        self.act1 = act_layer()
        self.conv_dw = CondConv2dTfSame(
            mid, mid, cfg.kernel_size, cfg.stride, padding='same', dilation=dilation, groups=mid, num_experts=experts
        )
        self.bn2 = norm_layer(mid)
        self.act2 = act_layer()
        self.se = _se(cfg, mid, se_act_layer)
        self.conv_pwl = CondConv2dTfSame(mid, cfg.output_filters, 1, padding='same', num_experts=experts)
        self.bn3 = norm_layer(cfg.output_filters)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        routing_weights = torch.sigmoid(self.routing_fn(x.mean((2, 3))))
        x = self.act1(self.bn1(self.conv_pw(x, routing_weights)))
        x = self.act2(self.bn2(self.conv_dw(x, routing_weights)))
        x = self.se(x)
        x = self.bn3(self.conv_pwl(x, routing_weights))
        if self.has_residual:
            x = self.drop_path(x) + shortcut
        return x
