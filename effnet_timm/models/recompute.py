"""Training memory: keep the conv outputs for backward, recompute the elementwise tensors between them.

In an MBConv block five tensors of the expanded width are kept for backward by plain autograd (and
timm): each conv output (read by its BatchNorm's backward), each BatchNorm output (read by Swish's),
each Swish output (read by the next conv's or the SE multiply's) and the SE-scaled tensor (read by the
projection conv's). All but the conv outputs are cheap elementwise functions of a conv output and a few
per-channel numbers, so while `recompute_activations()` records, `BatchNormRecompute2d`, `SwishRecompute`
and `SqueezeExciteRecompute` attach a `Recompute` recipe to their outputs, and autograd saves the recipe
instead of the tensor (`torch.autograd.graph.saved_tensors_hooks`). Backward recomputes the tensor from
the conv output that is kept anyway: one extra elementwise pass per use, no extra kept memory.

A recipe is only ever a stand-in for the value it was made from:
- a tensor edited in place after its recipe was made (a forward hook's `out.mul_(mask)`) is saved as
  itself, as are tensors whose recipe sources were edited;
- a recipe source edited in place after the save fails backward, as plain autograd does;
- every tensor the hooks save as itself is checked for in-place edits at unpack, which autograd stops
  doing for tensors that pass through saved-tensor hooks;
- under `create_graph=True` (double backward) recipes recompute differentiably (see `recompute_layers`).

Gradient checkpointing (`checkpoint`, used by `EffNetV1.set_grad_checkpointing`) is the other way to save
memory: it re-runs whole blocks in backward. A training BatchNorm re-run there must not update its running
statistics a second time; `checkpoint` sets every BatchNorm's buffers aside while it recomputes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from ..compat import BatchNormBase, current_graph_task_id, saved_tensors_hooks_outer_active

__all__ = [
    'Recompute',
    'attach_recipe',
    'checkpoint',
    'in_backward',
    'recipe_of',
    'recompute_activations',
    'recording',
    'strip_recipe',
]

# Recipes live in a table keyed weakly by tensor identity, not on the tensors: a tensor a forward hook kept
# pickles (torch.save, weights-only torch.load) like any other and holds no recipe sources alive. The table
# exists while `recompute_activations()` records and is dropped when it ends (what autograd packed keeps its
# own reference to its recipe).
_state = threading.local()  # saved-tensor hooks are per thread too (DataParallel replicas run in threads)


def _recipes(create: bool = False) -> WeakIdKeyDictionary | None:
    table = getattr(_state, 'recipes', None)
    if table is None and create:
        table = _state.recipes = WeakIdKeyDictionary()
    return table


class Recompute:
    """How to recompute a tensor: `fn(*args)`, where recipe arguments are recomputed first.

    Backward may read one tensor several times (the SE input feeds both the multiply and, through the
    scaled tensor, the projection conv): with `cache`, the value is kept from its first recomputation
    until its last packed use, so it is recomputed once per backward. Without (a BatchNorm output, one
    cheap pass from the kept conv output), it is recomputed at each use rather than held between them.
    """

    __slots__ = ('fn', 'args', 'versions', 'version', 'cache', 'uses', 'value')

    def __init__(self, fn: Callable[..., torch.Tensor], version: int, *args: Any, cache: bool = True) -> None:
        self.fn = fn
        self.cache = cache
        self.args = args
        self.versions: list[int | None] = [a._version if isinstance(a, torch.Tensor) else None for a in args]
        self.version = version  # of the tensor this recipe stands for, when the recipe was made
        self.uses = 0
        self.value: torch.Tensor | None = None

    def sources_unchanged(self) -> bool:
        for arg, version in zip(self.args, self.versions):
            if isinstance(arg, Recompute):
                if not arg.sources_unchanged():
                    return False
            elif version is not None and arg._version != version:
                return False
        return True

    def retain(self) -> None:
        """One more read in backward (a pack, or a recipe built on this one being packed the first time)."""
        self.uses += 1
        if self.uses == 1:
            for arg in self.args:
                if isinstance(arg, Recompute):
                    arg.retain()

    def __call__(self) -> torch.Tensor:
        value = self.value
        if value is None:
            value = self.fn(*[self._arg(arg, version) for arg, version in zip(self.args, self.versions)])
        self.uses -= 1
        self.value = value if self.cache and self.uses > 0 else None
        return value

    @staticmethod
    def _arg(arg: Any, version: int | None) -> Any:
        if isinstance(arg, Recompute):
            return arg()
        if version is not None:
            _check_version(arg, version)
        return arg


def _check_version(t: torch.Tensor, version: int) -> None:
    # Autograd's own wording, so the error reads as the one plain autograd would raise here.
    if t._version != version:
        raise RuntimeError(
            f'effnet_timm: one of the variables needed for gradient computation has been modified by an '
            f'inplace operation: a tensor of shape {tuple(t.shape)} is at version {t._version}; expected '
            f'version {version} instead'
        )


def attach_recipe(out: torch.Tensor, fn: Callable[..., torch.Tensor], *args: Any, cache: bool = True) -> torch.Tensor:
    """Mark `out` as `fn(*args)`; tensor arguments that carry a current recipe are referenced by recipe."""
    args = tuple(_as_arg(a) for a in args)
    _recipes(create=True)[out] = Recompute(fn, out._version, *args, cache=cache)
    return out


def _as_arg(a: Any) -> Any:
    recipe = recipe_of(a)
    # A tensor edited since its recipe was made is its own source (it is kept for backward anyway).
    return recipe if recipe is not None and recipe.version == a._version else a


def recipe_of(t: Any) -> Recompute | None:
    table = _recipes()
    # Only real tensors (not FX proxies).
    return table.get(t) if table is not None and isinstance(t, torch.Tensor) else None


def strip_recipe(t: Any) -> Any:
    """Drop `t`'s recipe (outputs leaving the model carry none)."""
    if recipe_of(t) is not None:
        del _recipes()[t]
    return t


def recording() -> bool:
    """Whether recipes are wanted here: inside `recompute_activations()` with our hooks installed."""
    return getattr(_state, 'depth', 0) > 0


def _pack(t: torch.Tensor) -> Any:
    recipe = recipe_of(t)
    if recipe is not None and recipe.version == t._version and recipe.sources_unchanged():
        recipe.retain()
        return recipe
    # A detached alias: same storage and version counter, but no grad_fn, so an op that saves its own
    # output (sigmoid) does not make a reference cycle through its node.
    return t.detach(), t._version


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, Recompute):
        return packed()
    t, version = packed  # type: Tuple[torch.Tensor, int]
    _check_version(t, version)
    return t


@contextmanager
def recompute_activations() -> Iterator[None]:
    """Within this context, autograd saves recipes instead of the tensors that carry one.

    Does nothing under saved-tensor hooks of the caller's (e.g. `torch.autograd.graph.save_on_cpu()`):
    only the innermost hooks run, and recipes hold their sources where they are, so taking over would
    silently undo the caller's choice of what to keep where.
    """
    if _outer_hooks_active():
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        _state.depth = getattr(_state, 'depth', 0) + 1
        try:
            yield
        finally:
            _state.depth -= 1
            if _state.depth == 0:
                _state.recipes = None


def _outer_hooks_active() -> bool:
    return saved_tensors_hooks_outer_active()  # torch internals: effnet_timm/compat.py


# ----------------------------------------------------------------------------- gradient checkpointing

_BN_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


def checkpoint(module: nn.Module, *args: Any) -> Any:
    """`torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)` that leaves BatchNorm buffers as
    a plain step leaves them.

    The recomputation in backward re-runs every training-mode BatchNorm in `module`; torch's checkpoint would
    let each update its running mean/var and `num_batches_tracked` a second time (decay 0.99 becoming ~0.98).
    Here each `_BatchNorm` in `module` (ours, a converted `SyncBatchNorm`, any other) updates scratch copies
    of its buffers during the recomputation, with the same kernels and values, so outputs and gradients are
    those of the forward and the buffers keep the one update the forward made.
    """
    if torch.compiler.is_compiling():  # compile's own recomputation replays no buffer mutation
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return torch.utils.checkpoint.checkpoint(
        module, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), batch_norm_buffers_aside(module))
    )


@contextmanager
def batch_norm_buffers_aside(module: nn.Module) -> Iterator[None]:
    """While inside, every training BatchNorm in `module` reads and updates copies of its running statistics."""
    saved = []
    for m in module.modules():
        if isinstance(m, BatchNormBase) and m.training and m.track_running_stats:
            originals = {k: m._buffers[k] for k in _BN_BUFFERS if m._buffers.get(k) is not None}
            saved.append((m, originals))
            for k, t in originals.items():
                m._buffers[k] = t.detach().clone()
    try:
        yield
    finally:
        for m, originals in saved:
            m._buffers.update(originals)


def in_backward() -> bool:
    """Whether this thread is running a backward pass (where a training forward is a checkpoint recomputation)."""
    current = current_graph_task_id()  # torch internals: effnet_timm/compat.py
    return current is not None and current != -1
