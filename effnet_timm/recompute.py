"""Training memory: keep the conv outputs for backward, recompute the elementwise tensors between them.

In an MBConv block five tensors of the expanded width are kept for backward by plain autograd (and
timm): each conv output (read by its BatchNorm's backward), each BatchNorm output (read by Swish's),
each Swish output (read by the next conv's or the SE multiply's) and the SE-scaled tensor (read by the
projection conv's). All but the conv outputs are cheap elementwise functions of a conv output and a few
per-channel numbers, so `BatchNormSwish2d` and `SqueezeExciteRecompute` attach a `Recompute` recipe to
their outputs, and while `recompute_activations()` is active autograd saves the recipe instead of the
tensor (`torch.autograd.graph.saved_tensors_hooks`). Backward recomputes the tensor from the conv output
that is kept anyway: one extra elementwise pass per use, no extra kept memory.

Recipes hold only tensors that are kept for backward anyway (conv outputs) and per-channel vectors, and
check at backward that none of them was modified in place since the forward.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional
from contextlib import contextmanager

import torch

__all__ = ['Recompute', 'attach_recipe', 'recipe_of', 'recompute_activations']

_RECIPE_ATTR = '_effnet_recompute'


class Recompute:
    """How to recompute a tensor: `fn(*args)`, where recipe arguments are recomputed first.

    Backward may read one tensor several times (the SE input feeds both the multiply and, through the
    scaled tensor, the projection conv): the value is kept from its first recomputation until its last
    packed use, so each tensor is recomputed once per backward.
    """

    __slots__ = ('fn', 'args', 'versions', 'uses', 'value')

    def __init__(self, fn: Callable[..., torch.Tensor], *args: Any) -> None:
        self.fn = fn
        self.args = args
        self.versions: List[Optional[int]] = [a._version if isinstance(a, torch.Tensor) else None for a in args]
        self.uses = 0
        self.value: Optional[torch.Tensor] = None

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
        self.value = value if self.uses > 0 else None
        return value

    @staticmethod
    def _arg(arg: Any, version: Optional[int]) -> Any:
        if isinstance(arg, Recompute):
            return arg()
        if version is not None and arg._version != version:
            raise RuntimeError(
                f'effnet_timm: a tensor of shape {tuple(arg.shape)} that backward recomputes from was '
                f'modified in place after the forward (version {version} -> {arg._version})')
        return arg


def attach_recipe(out: torch.Tensor, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Mark `out` as `fn(*args)`; tensor arguments that carry a recipe are referenced by recipe."""
    args = tuple(recipe_of(a) or a if isinstance(a, torch.Tensor) else a for a in args)
    setattr(out, _RECIPE_ATTR, Recompute(fn, *args))
    return out


def recipe_of(t: torch.Tensor) -> Optional[Recompute]:
    # Only real tensors: an FX proxy would answer any attribute with a new graph node.
    return getattr(t, _RECIPE_ATTR, None) if isinstance(t, torch.Tensor) else None


def _pack(t: torch.Tensor) -> Any:
    recipe = recipe_of(t)
    if recipe is None:
        return t
    recipe.retain()
    return recipe


def _unpack(packed: Any) -> torch.Tensor:
    return packed() if isinstance(packed, Recompute) else packed


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
        yield


def _outer_hooks_active() -> bool:
    autograd = torch._C._autograd
    if hasattr(autograd, '_saved_tensors_hooks_is_enabled') and not autograd._saved_tensors_hooks_is_enabled():
        return True  # hooks are disabled here (and pushing ours would raise)
    top = getattr(autograd, '_top_saved_tensors_default_hooks', None)  # private, present since torch 1.10
    return top is not None and top(False) is not None
