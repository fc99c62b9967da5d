"""TensorFlow "SAME" convolutions.

TF pads a strided conv by `max(k_eff - s + (-x) % s, 0)` in total and puts the odd pixel *after* the
input, so a stride-2 conv on an even input is asymmetric (k=3: 0 before / 1 after; k=5: 1 / 2) while an
odd input is padded symmetrically. Stride-1 convs with odd kernels are always symmetric and use the
conv's own padding.

timm's `Conv2dSame` computes the same total as `max((ceil(x/s) - 1) * s + k_eff - x, 0)`; that
`ceil`/`max` expression makes torch.compile's dynamic-shape recompiles very slow and blocks
`torch.export` with free H/W. The integer-modulo form below is the same number for every size
(checked against TF in the tests) and stays cheap to trace.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

__all__ = ['tf_same_pad', 'Conv2dTfSame', 'create_conv']


def tf_same_pad(size: int, kernel_size: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """(before, after) padding TF 'SAME' applies along one spatial axis of length `size`."""
    effective_kernel = (kernel_size - 1) * dilation + 1
    total = max(effective_kernel - stride + (-size) % stride, 0)
    return total // 2, total - total // 2


@register_notrace_module  # FX leaf: the pad depends on the traced input's shape
class Conv2dTfSame(nn.Conv2d):
    """Strided conv with TF 'SAME' padding resolved from the input size at every call."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_top, pad_bottom = tf_same_pad(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_left, pad_right = tf_same_pad(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if pad_top == pad_bottom and pad_left == pad_right:
            # Symmetric case (odd inputs): let the conv pad, no extra copy.
            return F.conv2d(
                x, self.weight, self.bias, self.stride, (pad_top, pad_left), self.dilation, self.groups)
        x = F.pad(x, (pad_left, pad_right, pad_top, pad_bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


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
