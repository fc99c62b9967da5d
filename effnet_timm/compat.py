"""Every private timm and torch API effnet_timm uses, in one place, with the versions it was tested on.

Private names (a leading underscore, or a `_module`) may change in any release, so the rest of the package
imports them from here only, and pyproject.toml bounds timm and torch above the tested releases. When an
upgrade removes one, `import effnet_timm` fails here with one line naming it (tests/test_compat.py checks
each entry), instead of deep in a model build. Optional torch internals degrade to the plain path instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = [
    'BatchNormBase',
    'PRIVATE_APIS',
    'TESTED_VERSIONS',
    'SqueezeExcite',
    'convolution_pointwise',
    'current_graph_task_id',
    'efficientnet_init_weights',
    'feature_take_indices',
    'global_module_hooks_registered',
    'mkldnn_convolution_pointwise',
    'resolve_pretrained_source',
    'save_config_for_hf',
    'saved_tensors_hooks_outer_active',
    'verify_batch_size',
]

# The releases these were last checked on (pyproject.toml: timm<1.1, torch<2.15).
TESTED_VERSIONS = {'timm': '1.0.31', 'torch': '2.14.1'}


class PrivateApi(NamedTuple):
    module: str
    name: str
    required: bool  # False: effnet_timm falls back to a public path without it
    why: str


PRIVATE_APIS = (
    PrivateApi('timm.models._builder', '_resolve_pretrained_source', True, 'which source timm would load weights from'),
    PrivateApi('timm.models._efficientnet_builder', 'efficientnet_init_weights', True, "timm's EfficientNet init"),
    PrivateApi('timm.models._efficientnet_blocks', 'SqueezeExcite', True, 'the SE block (same modules and keys)'),
    PrivateApi('timm.models._features', 'feature_take_indices', True, 'forward_intermediates index rules'),
    PrivateApi('timm.models._hub', 'save_config_for_hf', True, 'the config.json timm reads back'),
    PrivateApi('torch.ops.mkldnn', '_convolution_pointwise', False, 'the fused conv + Swish CPU kernel (fuse)'),
    PrivateApi(
        'torch._C._autograd', '_top_saved_tensors_default_hooks', False, 'nesting under saved-tensor hooks (recompute)'
    ),
    PrivateApi(
        'torch._C._autograd', '_saved_tensors_hooks_is_enabled', False, 'nesting under saved-tensor hooks (recompute)'
    ),
    *(
        PrivateApi('torch.nn.modules.module', f'_global_{kind}', True, 'in-place inference only without global hooks')
        for kind in ('forward_hooks', 'forward_pre_hooks', 'backward_hooks', 'backward_pre_hooks')
    ),
    PrivateApi('torch._C', '_current_graph_task_id', False, 'whether a backward runs (checkpoint recomputation)'),
    PrivateApi('torch.nn.modules.batchnorm', '_BatchNorm', True, 'every BatchNorm kind (fuse, checkpoint buffers)'),
    PrivateApi('torch.nn.functional', '_verify_batch_size', True, "plain BatchNorm's one-value-per-channel check"),
)


def lookup(api: PrivateApi) -> Any:
    """The object `api` names, or None when this timm/torch lacks it."""
    if api.module == 'torch.ops.mkldnn':
        return getattr(torch.ops.mkldnn, api.name, None) if torch.backends.mkldnn.is_available() else None
    try:
        module = importlib.import_module(api.module)
    except ImportError:  # a C extension's submodule (torch._C._autograd): walk the attributes instead
        module = importlib.import_module(api.module.split('.')[0])
        for part in api.module.split('.')[1:]:
            module = getattr(module, part, None)
    return getattr(module, api.name, None)


def _require(module: str, name: str) -> Any:
    api = next(a for a in PRIVATE_APIS if (a.module, a.name) == (module, name))
    found = lookup(api)
    if found is None:
        import timm

        raise ImportError(
            f'effnet_timm needs {module}.{name} ({api.why}), absent from timm {timm.__version__} / torch '
            f'{torch.__version__}; tested with timm {TESTED_VERSIONS["timm"]}, torch {TESTED_VERSIONS["torch"]}: '
            f'install those (see effnet_timm/compat.py)'
        )
    return found


resolve_pretrained_source: Callable[[dict[str, Any]], tuple[str, Any]] = _require(
    'timm.models._builder', '_resolve_pretrained_source'
)
efficientnet_init_weights: Callable[..., None] = _require(
    'timm.models._efficientnet_builder', 'efficientnet_init_weights'
)
SqueezeExcite: type[torch.nn.Module] = _require('timm.models._efficientnet_blocks', 'SqueezeExcite')
feature_take_indices: Callable[..., tuple[list[int], int]] = _require('timm.models._features', 'feature_take_indices')
save_config_for_hf: Callable[..., None] = _require('timm.models._hub', 'save_config_for_hf')
BatchNormBase: type[torch.nn.Module] = _require('torch.nn.modules.batchnorm', '_BatchNorm')
verify_batch_size: Callable[[torch.Size], None] = _require('torch.nn.functional', '_verify_batch_size')


def mkldnn_convolution_pointwise() -> Callable[..., torch.Tensor] | None:
    """oneDNN's fused convolution + pointwise op on CPU, or None (then `fuse` runs conv, then Swish)."""
    return lookup(PRIVATE_APIS[5])


def convolution_pointwise(*args: Any) -> torch.Tensor:
    """`torch.ops.mkldnn._convolution_pointwise(*args)`, where `mkldnn_convolution_pointwise()` is not None."""
    return torch.ops.mkldnn._convolution_pointwise(*args)


def current_graph_task_id() -> int | None:
    """The id of the backward pass this thread runs (-1 outside one), or None when this torch cannot say."""
    current = getattr(torch._C, '_current_graph_task_id', None)
    return None if current is None else current()


def global_module_hooks_registered() -> bool:
    """Whether any global module hook is registered (`torch.nn.modules.module.register_module_forward_hook`...)."""
    from torch.nn.modules import module

    return bool(
        module._global_forward_hooks
        or module._global_forward_pre_hooks
        or module._global_backward_hooks
        or module._global_backward_pre_hooks
    )


def saved_tensors_hooks_outer_active() -> bool:
    """Whether saved-tensor hooks are disabled here or another pair is installed (then recompute stays out of
    the way). False when this torch has neither probe."""
    autograd = torch._C._autograd
    enabled = getattr(autograd, '_saved_tensors_hooks_is_enabled', None)
    if enabled is not None and not enabled():
        return True  # hooks are disabled here (and pushing ours would raise)
    top = getattr(autograd, '_top_saved_tensors_default_hooks', None)
    return top is not None and top(False) is not None
