"""Fused inference: every BatchNorm folded into its conv, Swish applied by the conv kernel.

    from effnet_timm.models.fusion import fuse
    model = fuse(timm.create_model('effnet_v1_b0', pretrained=True))
    model = model.to(memory_format=torch.channels_last)   # fastest on CPU

The result is the same `EffNetV1` (forward, forward_features, forward_head, forward_intermediates,
reset_classifier, feature_info) with BatchNorm-free blocks; it is for inference only (no BatchNorm
left to train, and the fused CPU kernel has no autograd). Folding changes only float rounding (folded
in float64, rounded once to each conv's dtype; the model's dtype and device are kept). A model whose
BatchNorms were converted to SyncBatchNorm folds the same way.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compat import BatchNormBase, convolution_pointwise, mkldnn_convolution_pointwise
from .blocks import DepthwiseSeparable, FusedInvertedResidual, InvertedResidual
from .efficientnet import EffNetV1
from .layers import INPLACE_SAFE_CONVS, Conv2dTfSame

__all__ = ['fuse', 'FusedConv2d']

# (conv, the BatchNorm after it, the Swish after that or None), per module type.
_CONV_BN_ACT = {
    EffNetV1: (('conv_stem', 'bn1', 'act1'), ('conv_head', 'bn2', 'act2')),
    DepthwiseSeparable: (('conv_dw', 'bn1', 'act1'), ('conv_pw', 'bn2', None)),
    InvertedResidual: (('conv_pw', 'bn1', 'act1'), ('conv_dw', 'bn2', 'act2'), ('conv_pwl', 'bn3', None)),
    FusedInvertedResidual: (('conv_exp', 'bn1', 'act1'), ('conv_pwl', 'bn2', None)),
    # CondConv blocks keep their BatchNorms: their kernels are mixed per example.
}


def _mkldnn_fusion_available() -> bool:
    return mkldnn_convolution_pointwise() is not None


class FusedConv2d(Conv2dTfSame):
    """Conv + folded BatchNorm (as the bias) + optional Swish, with TF 'SAME' padding.

    Every conv of the network is TF 'SAME' (stride-1 odd kernels are its symmetric case), so one class
    covers them all. On CPU in fp32 the conv runs as oneDNN's fused conv + post-op kernel (the one
    inductor uses for the same fusion): Swish costs no extra pass over the output, and the 1x1 convs
    skip the layout copies of PyTorch's default CPU path for channels_last (README: Performance).
    """

    def __init__(self, conv: nn.Conv2d, bn: BatchNormBase, swish: bool) -> None:
        assert conv.kernel_size[0] == conv.kernel_size[1] and conv.stride[0] == conv.stride[1]
        # The conv's own dtype and device (a bf16/fp16/fp64 or CUDA model stays one).
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            conv.stride[0],
            conv.dilation[0],
            conv.groups,
            bias=True,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        self.pad_input = bool(getattr(conv, 'pad_input', False))
        self.swish = swish
        self.fused_kernel = _mkldnn_fusion_available()
        weight, bias = _fold_batch_norm(conv, bn)
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)
        self.to(memory_format=_memory_format(conv.weight))

    def _conv(self, x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
        if self._use_fused_kernel(x):
            return convolution_pointwise(
                x,
                self.weight,
                self.bias,
                list(padding),
                list(self.stride),
                list(self.dilation),
                self.groups,
                'swish' if self.swish else 'none',
                [],
                '',
            )
        x = F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        return F.silu(x, inplace=True) if self.swish else x

    def _use_fused_kernel(self, x: torch.Tensor) -> bool:
        # Only in eager CPU fp32 inference: the op has no autograd and is not for export graphs. Not under
        # autocast either, which it ignores: F.conv2d then computes in the autocast dtype, as unfused.
        if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        return (
            self.fused_kernel
            and x.device.type == 'cpu'
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled('cpu')
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        )


INPLACE_SAFE_CONVS.add(FusedConv2d)  # its output is a new tensor of its own, as Conv2dTfSame's


def _memory_format(weight: torch.Tensor) -> torch.memory_format:
    channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _fold_batch_norm(conv: nn.Conv2d, bn: BatchNormBase) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias that compute `bn(conv(x))` with the running statistics (in float64, then
    rounded once to the conv's dtype)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = bn.bias.double() - bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    weight = conv.weight.double() * scale[:, None, None, None]
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


def _fuse_triple(parent: nn.Module, conv_name: str, bn_name: str, act_name: str | None) -> None:
    conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
    # Any BatchNorm, SyncBatchNorm included; not a pruned head (Identity) or an already fused conv.
    if not isinstance(bn, BatchNormBase):
        return
    assert bn.track_running_stats and bn.running_mean is not None, f'{bn_name}: no running statistics to fold'
    act = getattr(parent, act_name) if act_name else None
    swish = isinstance(act, nn.SiLU)
    keep_act = isinstance(act, (nn.ReLU, nn.ReLU6))  # Lite, EdgeTPU: stays a module after the fused conv
    assert act is None or swish or keep_act, f'{act_name}: unexpected activation {type(act).__name__}'
    setattr(parent, conv_name, FusedConv2d(conv, bn, swish))
    setattr(parent, bn_name, nn.Identity())
    if act_name and not keep_act:
        setattr(parent, act_name, nn.Identity())


ModelT = TypeVar('ModelT', bound=nn.Module)


@torch.no_grad()
def fuse(model: ModelT) -> ModelT:
    """An eval-mode copy of `model` with each BatchNorm (and its Swish) folded into the preceding conv.

    `model` is an `EffNetV1` or anything holding one (e.g. timm's `features_only` wrapper); the copy has
    the same class and API. State-dict keys differ (no `bn*` entries, conv biases added) and parameters
    are frozen (the fused kernel is inference-only). The input model is left untouched.
    """
    fused = copy.deepcopy(model).eval().requires_grad_(False)
    triples = [(m, names) for m in fused.modules() for names in _CONV_BN_ACT.get(type(m), ())]
    assert triples, f'{type(model).__name__} holds no EffNetV1 to fuse'
    for module, names in triples:
        _fuse_triple(module, *names)
    return fused
