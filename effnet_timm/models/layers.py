"""TensorFlow "SAME" convolutions.

TF pads a strided conv by `max(k_eff - s + (-x) % s, 0)` in total and puts the odd pixel *after* the
input, so a stride-2 conv on an even input is asymmetric (k=3: 0 before / 1 after; k=5: 1 / 2) while an
odd input is padded symmetrically. Stride-1 convs with odd kernels are always symmetric and use the
conv's own padding.

PyTorch convs only pad symmetrically, so the asymmetric case costs a copy either way; eager mode copies
the smaller tensor. Padding the input (timm's `Conv2dSame`, `F.pad`) is slow in channels_last. For a
strided conv whose output is smaller than its input (every depthwise one) the conv instead gets one
stride more of symmetric padding, which moves its window starts one stride earlier, so that dropping
its first output row/column leaves exactly TF's windows; the cropped view is then made dense again
(BatchNorm on a strided view takes a slow kernel). Only the stem, whose 3-channel input is smaller
than its output, pads the input. The README's Performance section has the measured cost of each form.

The crop depends on the size's parity, which a graph recorded at one size must not bake in:
- torch.compile traces the eager code and guards on the parity (a cheap recompile per new pattern).
- torch.export, torch.jit.trace and the legacy (TorchScript-based) ONNX exporter take the padded form
  with TF's pad before the input and `k_eff - 1` pixels in total. Its pad amounts are an integer-modulo
  expression of the size but the padded size is not, so export has no guard on parity (H and W stay
  free); under torch.jit.trace the sizes are tensors and the pads are recorded as tensor arithmetic, so
  a graph traced at one parity is exact at the other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

__all__ = ['INPLACE_SAFE_CONVS', 'tf_same_pad', 'Conv2dTfSame', 'create_conv']


def tf_same_pad(size: int, kernel_size: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding TF 'SAME' applies along one spatial axis of length `size`."""
    effective_kernel = (kernel_size - 1) * dilation + 1
    total = max(effective_kernel - stride + (-size) % stride, 0)
    return total // 2, total - total // 2


def pad_before(size: int, effective_kernel: int, stride: int) -> int:
    """TF's padding before the input (`tf_same_pad(...)[0]`), also for a traced size (a 0-dim tensor).

    Under torch.jit.trace `size` is a 0-dim tensor (typed `int` for TorchScript, which never sees one), and
    Python's `max` on it would record a constant; the tensor form records the arithmetic instead.
    """
    total = effective_kernel - stride + (-size) % stride
    if isinstance(total, torch.Tensor):
        return total.clamp(min=0) // 2
    return max(total, 0) // 2


def _cropped_padding(kernel_size: int, stride: int, dilation: int) -> list[tuple[int, int]]:
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
        **factory_kwargs: Any,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=0,
            dilation=dilation,
            groups=groups,
            bias=bias,
            **factory_kwargs,
        )
        # Indexed by `size % stride`; kernel, stride and dilation are the same along H and W.
        self.same_padding: list[tuple[int, int]] = _cropped_padding(kernel_size, stride, dilation)
        # Copy whichever is smaller: the padded input or the cropped output.
        self.pad_input = in_channels * stride * stride < out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recording = False
        if not torch.jit.is_scripting():  # TorchScript cannot compile is_exporting
            # A recorded graph must not bake in the example's parity (see the module docstring).
            recording = torch.compiler.is_exporting() or torch.jit.is_tracing()
        if self.pad_input or recording:
            return self._conv(F.pad(x, self._same_pads(x)), (0, 0))
        pad_h, crop_h = self.same_padding[x.shape[-2] % self.stride[0]]
        pad_w, crop_w = self.same_padding[x.shape[-1] % self.stride[1]]
        x = self._conv(x, (pad_h, pad_w))
        if crop_h == 0 and crop_w == 0:
            return x
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return x[:, :, crop_h:, crop_w:].contiguous(memory_format=memory_format)

    def _same_pads(self, x: torch.Tensor) -> list[int]:
        """F.pad amounts (left, right, top, bottom) with TF's pads before and `k_eff - 1` in total.

        TF's total is `k_eff - 1` or less; padding up to `k_eff - 1` after only adds pixels no window
        reaches, and keeps the padded size `size + k_eff - 1` free of the size's parity. The output size
        is then the plain `(size - 1) // stride + 1`, so dynamic-shape tracing needs no guard on parity
        and its size expressions stay as simple as a symmetric conv's (cheap recompiles).
        """
        k_h = (self.kernel_size[0] - 1) * self.dilation[0]
        k_w = (self.kernel_size[1] - 1) * self.dilation[1]
        pad_top = pad_before(x.shape[-2], k_h + 1, self.stride[0])
        pad_left = pad_before(x.shape[-1], k_w + 1, self.stride[1])
        return [pad_left, k_w - pad_left, pad_top, k_h - pad_top]

    def _conv(self, x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


# Conv types (exact, not subclasses: a subclass may keep its output) whose output is a new tensor that no one
# else holds, so in-place inference may write BatchNorm/activation into it. fusion.py adds FusedConv2d.
INPLACE_SAFE_CONVS: set[type] = {nn.Conv2d, Conv2dTfSame}


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
            in_channels,
            out_channels,
            kernel_size,
            stride=1,
            padding=dilation * (kernel_size - 1) // 2,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
    return Conv2dTfSame(in_channels, out_channels, kernel_size, stride, dilation, groups, bias)
