"""timm registry entries: `effnet_v1_b0` … `effnet_v1_b8`, `effnet_v1_l2`, the generic `effnet_v1`, and the other
official V1 families: `effnet_v1_lite0` … `lite4`, `effnet_v1_edgetpu_{s,m,l}`,
`effnet_v1_condconv_b0_{4e,8e,8e_depth}`.

timm names the registry module after this file (`effnet_v1`), so it must not share a name with a timm
module, and it reads `default_cfgs` while the entrypoints are being decorated: keep it above them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from .compat import resolve_pretrained_source
from .errors import PretrainedWeightsError, first_line
from .models.config import ALL_VARIANTS
from .models.efficientnet import EffNetV1
from .weights.cache import resolve_pretrained_file
from .weights.integrity import verify_folder
from .weights.tags import TAGS, default_cfg_table, pretrained_cfg

__all__ = ['PretrainedWeightsError', 'create_effnet_v1']

default_cfgs = generate_default_cfgs(
    {
        **default_cfg_table(),
        # Architecture only (no official weights): any width/depth, e.g. a scaled-down official checkpoint.
        'effnet_v1': pretrained_cfg('effnet_v1'),
    }
)


def _weights_source(cfg) -> str:
    """Where timm will load weights from, or '' if nowhere (timm would then silently keep random weights)."""
    load_from, location = resolve_pretrained_source(cfg.to_dict())
    if not load_from:
        return ''
    return load_from if load_from == 'state_dict' else f'{load_from} {location}'


def _explicit_source(cfg, overlay) -> bool:
    """A file, state dict, folder (`local-dir:`) or Hub repo (`hf-hub:`, an overlaid id/url) the user named."""
    overlay = overlay or {}
    return bool(
        cfg.state_dict is not None
        or cfg.file
        or cfg.source in ('hf-hub', 'local-dir')
        or any(overlay.get(k) for k in ('file', 'state_dict', 'url', 'hf_hub_id'))
    )


def _official_tag(variant: str, tag) -> bool:
    return tag in TAGS and variant in TAGS[tag].variants


def create_effnet_v1(variant: str, pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    """Build `variant` through timm's builder; a pretrained request that cannot be met fails in one line.

    Registered tags without an explicit weight file resolve through `weights.cache.resolve_pretrained_file`:
    our cache, the Hub repo only where its TAGS row pins a commit and sha256, then the official tarball (checked
    against its pin or X-Goog-Hash, converted and cached once).
    """
    if kwargs.get('features_only') and 'feature_cls' not in kwargs:
        kwargs['feature_cls'] = 'getter'  # uses forward_intermediates; respects out_indices
    if not pretrained:
        return build_model_with_cfg(EffNetV1, variant, pretrained, **kwargs)
    overlay = kwargs.get('pretrained_cfg_overlay')
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), overlay)
    name = f'{variant}.{cfg.tag}' if cfg.tag else variant
    if not _explicit_source(cfg, overlay) and _official_tag(variant, cfg.tag):
        path = resolve_pretrained_file(variant, cfg.tag, cfg.hf_hub_id, kwargs.get('cache_dir'))
        kwargs['pretrained_cfg_overlay'] = dict(overlay or {}, file=str(path))
        return build_model_with_cfg(EffNetV1, variant, pretrained, **kwargs)
    source = _weights_source(cfg)
    if not source:
        raise PretrainedWeightsError(
            f'{name}: no pretrained weights are defined; pick a tag ({", ".join(_tags_of(variant)) or "none"}) '
            f'or pass pretrained_cfg_overlay=dict(file=...) with a file made by effnet-convert'
        )
    if cfg.source == 'local-dir' and cfg.file:
        # Before reading the weights: a flipped byte loads strictly, a truncated file fails inside safetensors;
        # the size and sha256 recorded at conversion tell both in one line.
        verify_folder(Path(cfg.file))
    try:
        model = build_model_with_cfg(EffNetV1, variant, pretrained, **kwargs)
    except (OSError, ValueError, ConnectionError) as err:
        if not _is_download_error(err):
            raise
        raise PretrainedWeightsError(
            f'{name}: could not load pretrained weights from {source}: {first_line(err)}. '
            f'Convert an official checkpoint with `effnet-convert` and load it with '
            f'pretrained_cfg_overlay=dict(file=...)'
        ) from None
    return model


def _is_download_error(err: BaseException) -> bool:
    # huggingface_hub's lookup/download errors and a missing local file; not model/state-dict bugs.
    from huggingface_hub import errors as hub_errors

    hub_types = tuple(
        getattr(hub_errors, n)
        for n in (
            'EntryNotFoundError',
            'LocalEntryNotFoundError',
            'RepositoryNotFoundError',
            'RevisionNotFoundError',
            'HfHubHTTPError',
            'OfflineModeIsEnabled',
        )
        if hasattr(hub_errors, n)
    )
    return isinstance(err, hub_types) or isinstance(err, (FileNotFoundError, ConnectionError))


def _tags_of(variant: str) -> list:
    prefix = f'{variant}.'
    return [k[len(prefix) :] for k in default_cfgs if k.startswith(prefix)]


def _variant(variant: str, pretrained: bool, **kwargs: Any) -> EffNetV1:
    spec = ALL_VARIANTS[variant]
    kwargs.setdefault('drop_rate', spec.dropout)
    if spec.family != 'efficientnet':
        kwargs.update(family=spec.family, num_experts=spec.num_experts)
    return create_effnet_v1(variant, pretrained, width_coefficient=spec.width, depth_coefficient=spec.depth, **kwargs)


@register_model
def effnet_v1(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    """EfficientNet V1 at any `width_coefficient` / `depth_coefficient` (B0 by default)."""
    return create_effnet_v1('effnet_v1', pretrained, **kwargs)


@register_model
def effnet_v1_b0(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_b0', pretrained, **kwargs)


@register_model
def effnet_v1_b1(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_b1', pretrained, **kwargs)


@register_model
def effnet_v1_b2(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_b2', pretrained, **kwargs)


@register_model
def effnet_v1_b3(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_b3', pretrained, **kwargs)


@register_model
def effnet_v1_b4(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_b4', pretrained, **kwargs)


@register_model
def effnet_v1_b5(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_b5', pretrained, **kwargs)


@register_model
def effnet_v1_b6(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_b6', pretrained, **kwargs)


@register_model
def effnet_v1_b7(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_b7', pretrained, **kwargs)


@register_model
def effnet_v1_b8(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_b8', pretrained, **kwargs)


@register_model
def effnet_v1_l2(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_l2', pretrained, **kwargs)


@register_model
def effnet_v1_lite0(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_lite0', pretrained, **kwargs)


@register_model
def effnet_v1_lite1(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_lite1', pretrained, **kwargs)


@register_model
def effnet_v1_lite2(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_lite2', pretrained, **kwargs)


@register_model
def effnet_v1_lite3(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_lite3', pretrained, **kwargs)


@register_model
def effnet_v1_lite4(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_lite4', pretrained, **kwargs)


@register_model
def effnet_v1_edgetpu_s(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_edgetpu_s', pretrained, **kwargs)


@register_model
def effnet_v1_edgetpu_m(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_edgetpu_m', pretrained, **kwargs)


@register_model
def effnet_v1_edgetpu_l(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_edgetpu_l', pretrained, **kwargs)


@register_model
def effnet_v1_condconv_b0_4e(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_condconv_b0_4e', pretrained, **kwargs)


@register_model
def effnet_v1_condconv_b0_8e(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_condconv_b0_8e', pretrained, **kwargs)


@register_model
def effnet_v1_condconv_b0_8e_depth(pretrained: bool = False, **kwargs: Any) -> EffNetV1:
    return _variant('effnet_v1_condconv_b0_8e_depth', pretrained, **kwargs)
