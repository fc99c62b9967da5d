"""BatchNorm and Swish as two modules, whose training outputs can be recomputed in backward.

The official block is conv → BatchNorm → Swish. timm folds the Swish into the norm module
(`BatchNormAct2d`); here they stay two modules, because SyncBatchNorm converters replace every
`_BatchNorm` they find with a plain `SyncBatchNorm` (torch's drops anything the module did besides
normalising), so an activation inside the norm module would silently vanish. State-dict keys are the
same either way (`bn1.weight`, `bn1.running_mean`, ...; Swish has no state), so timm's
`tf_efficientnet_*` weights load strictly.

Training memory (`effnet_timm.models.recompute`): while `recompute_activations()` records, a training-mode
`BatchNormRecompute2d` marks its output as an affine function of its input (the conv output, which its
own backward keeps anyway) and the batch statistics, and `SwishRecompute` marks its output as the Swish
of that. Autograd then keeps recipes instead of those two tensors. A converted `SyncBatchNorm` attaches
no recipe, and a Swish after it then keeps its input as plain autograd does: exact, without the saving.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compat import verify_batch_size
from .recompute import attach_recipe, in_backward, recipe_of, recording

__all__ = ['BatchNormRecompute2d', 'SwishRecompute', 'ReLURecompute', 'ReLU6Recompute']


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    # In the statistics' precision, rounded to the input's dtype as BatchNorm does (mixed precision).
    return torch.addcmul(shift[:, None, None], x, scale[:, None, None]).to(x.dtype)


def _recompute_batch_norm(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """A training BatchNorm's output, from its input and the batch statistics folded into scale/shift.

    With grad mode on in backward (`create_graph=True`: double backward, gradient penalties) the value
    must also be differentiable as the forward was, through the batch statistics: recompute it as a
    batch norm of `x` then.
    """
    if torch.is_grad_enabled():
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    return _affine(x, scale, shift)


def batch_norm_with_recipe(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """`F.batch_norm(x, training=True)` whose output carries a recipe (`effnet_timm.models.recompute`)."""
    # F.batch_norm's check ("Expected more than 1 value per channel when training"): the kernel would write NaN
    # into running_var instead.
    verify_batch_size(x.size())
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
    with torch.no_grad():
        scale = invstd * weight
        shift = bias - mean * scale
    # Not cached in backward: recomputing is one pass, holding it from the Swish output's recomputation
    # (the next conv's backward) to the Swish's own backward would keep one more tensor alive.
    return attach_recipe(y, _recompute_batch_norm, x, scale, shift, weight, bias, eps, cache=False)


class BatchNormRecompute2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training output can be recomputed from its input in backward.

    Only the output's bookkeeping differs; the statistics and running-average rules are
    `_BatchNorm.forward`'s, restated because TorchScript cannot call `super().forward`. A training forward run
    inside backward is a gradient checkpoint's recomputation (torch's, timm's `checkpoint_seq`): it updates
    copies of the running statistics, so the buffers hold the one update of a plain step.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):  # not an FX proxy (its dim() is a graph node, not an int)
            self._check_input_dim(x)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are only passed where they are read or updated (BatchNorm2d's rule).
        keep = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep else None
        running_var = self.running_var if keep else None
        recomputing = False
        if not torch.jit.is_scripting():
            recomputing = self._recomputing_in_backward()
        if recomputing and running_mean is not None and running_var is not None:
            # A checkpoint re-running this forward in backward (torch's or timm's own): the forward already
            # updated the statistics once, as a plain step does; the same kernel updates copies here.
            running_mean, running_var = running_mean.clone(), running_var.clone()
        momentum = self._momentum_for_this_step(count=not recomputing)
        if not torch.jit.is_scripting():
            if batch_stats and self._records_recipe(x):
                return batch_norm_with_recipe(x, self.weight, self.bias, running_mean, running_var, momentum, self.eps)
        return F.batch_norm(x, running_mean, running_var, self.weight, self.bias, batch_stats, momentum, self.eps)

    @torch.jit.unused
    def _records_recipe(self, x: torch.Tensor) -> bool:
        # Not under torch.compile, whose partitioner chooses what to recompute itself; not for FX proxies.
        return (
            not torch.compiler.is_compiling()
            and self.affine
            and isinstance(x, torch.Tensor)
            and recording()
            and torch.is_grad_enabled()
        )

    @torch.jit.unused
    def _recomputing_in_backward(self) -> bool:
        return self.training and self.track_running_stats and not torch.compiler.is_compiling() and in_backward()

    def _momentum_for_this_step(self, count: bool = True) -> float:
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            if count:
                self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average
                momentum = 1.0 / float(self.num_batches_tracked)
        return momentum


class SwishRecompute(nn.SiLU):
    """`nn.SiLU` (Swish) whose output carries a recipe when its input does.

    Not in place by default: the BatchNorm output it reads is what a forward hook on `bnN` was given and
    may have kept."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self._records_recipe(x):
                return attach_recipe(F.silu(x), F.silu, x)
        # In place only where autograd records nothing (it would keep a copy of the input first).
        return F.silu(x, inplace=self.inplace and not torch.is_grad_enabled())

    @torch.jit.unused
    def _records_recipe(self, x: torch.Tensor) -> bool:
        return not torch.compiler.is_compiling() and torch.is_grad_enabled() and recipe_of(x) is not None


class ReLURecompute(nn.ReLU):
    """`nn.ReLU` (EdgeTPU) whose output carries a recipe when its input does, like `SwishRecompute`.

    While recording it is computed as `F.threshold(x, 0, 0)` (the same values and gradients, zero at 0): its
    backward keeps the input, a BatchNorm output with a recipe, where ReLU's keeps its own output, which gets
    its recipe only after the op has saved it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not torch.compiler.is_compiling() and torch.is_grad_enabled() and recipe_of(x) is not None:
                return attach_recipe(F.threshold(x, 0.0, 0.0), F.relu, x)
        return F.relu(x)


class ReLU6Recompute(nn.ReLU6):
    """`nn.ReLU6` (Lite) whose output carries a recipe when its input does, like `SwishRecompute`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not torch.compiler.is_compiling() and torch.is_grad_enabled() and recipe_of(x) is not None:
                return attach_recipe(F.relu6(x), F.relu6, x)
        return F.relu6(x)
