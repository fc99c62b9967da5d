"""TensorFlow "SAME" convolutions.

TF pads a strided conv by `max(k_eff - s + (-x) % s, 0)` in total and puts the odd pixel *after* the
input, so a stride-2 conv on an even input is asymmetric (k=3: 0 before / 1 after; k=5: 1 / 2) while an
odd input is padded symmetrically. Stride-1 convs with odd kernels are always symmetric and use the
conv's own padding.

PyTorch convs only pad symmetrically, so the asymmetric case costs a copy either way; eager mode copies
the smaller tensor. timm's `Conv2dSame` pads the input (`F.pad`, very slow in channels_last). For a
strided conv whose output is smaller than its input (every depthwise one) the conv instead gets one
stride more of symmetric padding, which moves its window starts one stride earlier, so that dropping
its first output row/column leaves exactly TF's windows; the cropped view is then made dense again
(BatchNorm on a strided view takes a slow kernel). Only the stem, whose 3-channel input is smaller
than its output, pads the input. On B0's stride-2 layers (conv + BN + Swish, batch 8, 224 px,
channels_last) this measured 2x faster than pad-then-conv and ~20 % slower than symmetric padding.

torch.compile traces the same eager code; inductor then fuses the crop into the consumer, and B0
compiled runs as fast as timm's symmetric `efficientnet_b0` (timm's `tf_efficientnet_b0`, which pads,
measured 18 % slower). With dynamic shapes the crop specializes on each size's parity (a guard, and a
cheap recompile per new parity pattern). torch.export instead traces the padded form with TF's pad
before the input and `k_eff - 1` pixels in total: the pad amounts are an integer-modulo expression of
the size but the padded size is not, so there is no guard on parity (H and W stay free) and the size
expressions stay those of a symmetric conv. timm's `ceil`/`max` pad formula, by contrast, makes a
dynamic-shape recompile of B0 take minutes and blocks export with free H/W.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, register_notrace_module

from .recompute import attach_recipe

__all__ = ['tf_same_pad', 'Conv2dTfSame', 'create_conv', 'BatchNormSwish2d', 'batch_norm_swish_me']


def tf_same_pad(size: int, kernel_size: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """(before, after) padding TF 'SAME' applies along one spatial axis of length `size`."""
    effective_kernel = (kernel_size - 1) * dilation + 1
    total = max(effective_kernel - stride + (-size) % stride, 0)
    return total // 2, total - total // 2


def _cropped_padding(kernel_size: int, stride: int, dilation: int) -> List[Tuple[int, int]]:
    """For each `size % stride`: (symmetric conv padding, leading outputs to drop) equal to TF 'SAME'.

    The padding depends on the size only through `size % stride`. When it is asymmetric the after side
    has exactly one pixel more (`total - total // 2`), so padding `before + stride` on both sides and
    dropping one output covers it and yields exactly `ceil(size / stride)` outputs.
    """
    table = []
    for residue in range(stride):
        before, after = tf_same_pad(residue, kernel_size, stride, dilation)
        table.append((before, 0) if before == after else (before + stride, 1))
    return table


@register_notrace_module  # FX leaf: the padding depends on the traced input's shape
class Conv2dTfSame(nn.Conv2d):
    """Strided conv with TF 'SAME' padding at every input size, without copying the input."""

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int,
            stride: int,
            dilation: int = 1,
            groups: int = 1,
            bias: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=0,
            dilation=dilation, groups=groups, bias=bias)
        # Indexed by `size % stride`; kernel, stride and dilation are the same along H and W.
        self.same_padding: List[Tuple[int, int]] = _cropped_padding(kernel_size, stride, dilation)
        # Copy whichever is smaller: the padded input or the cropped output.
        self.pad_input = in_channels * stride * stride < out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exporting = False
        if not torch.jit.is_scripting():  # TorchScript cannot compile is_exporting
            exporting = torch.compiler.is_exporting()
        if self.pad_input or exporting:
            return self._conv(F.pad(x, self._same_pads(x)), (0, 0))
        pad_h, crop_h = self.same_padding[x.shape[-2] % self.stride[0]]
        pad_w, crop_w = self.same_padding[x.shape[-1] % self.stride[1]]
        x = self._conv(x, (pad_h, pad_w))
        if crop_h == 0 and crop_w == 0:
            return x
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return x[:, :, crop_h:, crop_w:].contiguous(memory_format=memory_format)

    def _same_pads(self, x: torch.Tensor) -> List[int]:
        """F.pad amounts (left, right, top, bottom) with TF's pads before and `k_eff - 1` in total.

        TF's total is `k_eff - 1` or less; padding up to `k_eff - 1` after only adds pixels no window
        reaches, and keeps the padded size `size + k_eff - 1` free of the size's parity. The output size
        is then the plain `(size - 1) // stride + 1`, so dynamic-shape tracing needs no guard on parity
        and its size expressions stay as simple as a symmetric conv's (cheap recompiles).
        """
        k_h = (self.kernel_size[0] - 1) * self.dilation[0]
        k_w = (self.kernel_size[1] - 1) * self.dilation[1]
        pad_top = tf_same_pad(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])[0]
        pad_left = tf_same_pad(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])[0]
        return [pad_left, k_w - pad_left, pad_top, k_h - pad_top]

    def _conv(self, x: torch.Tensor, padding: Tuple[int, int]) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


def create_conv(
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
) -> nn.Conv2d:
    """A conv with TF 'SAME' numerics; static symmetric padding wherever that is exact."""
    if stride == 1 and kernel_size % 2 == 1:
        return nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=1, padding=dilation * (kernel_size - 1) // 2,
            dilation=dilation, groups=groups, bias=bias)
    return Conv2dTfSame(in_channels, out_channels, kernel_size, stride, dilation, groups, bias)


def _affine_swish(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`silu(x * scale + shift)` per channel: a training BatchNorm + Swish with its statistics folded in."""
    return F.silu(_affine(x, scale, shift), inplace=True)


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    # In the statistics' precision, rounded to the input's dtype as BatchNorm does (mixed precision).
    return torch.addcmul(shift[:, None, None], x, scale[:, None, None]).to(x.dtype)


class _BatchNormSwishMe(torch.autograd.Function):
    """Training-mode BatchNorm followed by Swish, keeping only the BN input for backward.

    Autograd would also keep the normalized tensor (the Swish input): one more activation-sized tensor
    per BN layer. It is recomputed from the input and the saved batch statistics instead. The gradient
    kernels are autograd's own (`silu_backward`, `native_batch_norm_backward`). Also returns the batch
    statistics (not differentiable), from which the output itself can be recomputed.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                momentum: float, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        return F.silu(y, inplace=True), mean, invstd

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, *_: Any) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight, bias, mean, invstd = ctx.saved_tensors
        scale = invstd * weight
        y = _affine(x, scale, bias - mean * scale)
        # Elementwise, so the gradient can overwrite the recomputed input: one transient tensor, not two.
        grad_y = torch.ops.aten.silu_backward.grad_input(grad_out, y, grad_input=y)
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3]))
        return grad_x, grad_w, grad_b, None, None, None, None


def batch_norm_swish_me(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: Optional[torch.Tensor],
        running_var: Optional[torch.Tensor], momentum: float = 0.1, eps: float = 1e-5,
) -> torch.Tensor:
    """`silu(batch_norm(x, training=True))` that saves only `x` for backward (updates the running stats).

    The output carries a recipe (`effnet_timm.recompute`): under `recompute_activations()` the layers
    that read it keep `x` and two per-channel vectors instead of the output itself.
    """
    out, mean, invstd = _BatchNormSwishMe.apply(x, weight, bias, running_mean, running_var, momentum, eps)
    with torch.no_grad():
        scale = invstd * weight
        shift = bias - mean * scale
    return attach_recipe(out, _affine_swish, x, scale, shift)


class BatchNormSwish2d(BatchNormAct2d):
    """timm's `BatchNormAct2d` with Swish (same modules and state dict), memory-efficient when training.

    With batch statistics and autograd recording, BN + Swish run as one `torch.autograd.Function` that
    keeps one activation-sized tensor instead of two, and whose output the next layers recompute rather
    than keep (`effnet_timm.recompute`, active in `EffNetV1.forward_features`). Not under torch.compile,
    whose AOTAutograd partitioner already chooses what to recompute. The statistics and running-average
    rules are `BatchNormAct2d.forward`'s, restated because TorchScript cannot call `super().forward`.
    """

    def __init__(self, num_features: int, apply_act: bool = True, **kwargs: Any) -> None:
        super().__init__(num_features, apply_act=apply_act, act_layer=nn.SiLU, **kwargs)
        self.has_swish = apply_act
        self.memory_efficient = True  # False: plain autograd, no recomputation (e.g. to compare)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        momentum = self._momentum_for_this_step()
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are only passed where they are read or updated (BatchNorm2d's rule).
        keep = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep else None
        running_var = self.running_var if keep else None
        if not torch.jit.is_scripting():
            if self._use_memory_efficient(batch_stats):
                return batch_norm_swish_me(x, self.weight, self.bias, running_mean, running_var, momentum, self.eps)
        x = F.batch_norm(x, running_mean, running_var, self.weight, self.bias, batch_stats, momentum, self.eps)
        return self.act(self.drop(x))

    @torch.jit.unused
    def _use_memory_efficient(self, batch_stats: bool) -> bool:
        return (self.has_swish and self.memory_efficient and batch_stats and torch.is_grad_enabled()
                and not torch.compiler.is_compiling())

    def _momentum_for_this_step(self) -> float:
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average
                momentum = 1.0 / float(self.num_batches_tracked)
        return momentum
