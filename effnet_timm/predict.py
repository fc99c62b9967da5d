"""Classify images with the official eval preprocessing: the library behind `effnet-timm predict`."""
from __future__ import annotations

import importlib.util
import io
import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config
from timm.models import split_model_name_tag

from .errors import InputError, PretrainedWeightsError, first_line
from .preprocessing import TfEvalTransform, create_tf_transform, decode_image
from .pretrained import TAGS

__all__ = ['CROPS', 'read_images', 'load_model', 'predict', 'format_predictions', 'split_known_name', 'known_tags',
           'mean_std_name']

CROPS = ('padding32', 'fraction')
MEAN_STD_NAMES = {
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)): 'imagenet',
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)): 'inception',
}


# ----------------------------------------------------------------------------- model names


def known_tags(arch: str) -> List[str]:
    """The pretrained tags of ``arch``, its default first."""
    return [tag for tag, spec in TAGS.items() if arch in spec.variants]  # default first, as registered


def split_known_name(name: str) -> Tuple[str, str]:
    """``(architecture, tag)`` of a registered effnet_timm model name; tag is '' when not given."""
    arch, tag = split_model_name_tag(name)
    known = timm.list_models('effnet_v1*')
    if arch not in known:
        raise InputError(f"unknown model '{name}' (known: {', '.join(known)})")
    if tag and tag not in known_tags(arch):
        raise InputError(f"{arch} has no pretrained tag '{tag}' (tags: {', '.join(known_tags(arch)) or 'none'})")
    return arch, tag


# ----------------------------------------------------------------------------- predict


def load_model(model_name: Optional[str], weights: Optional[Path]) -> torch.nn.Module:
    """The eval-mode model for ``--model`` / ``--weights`` (see the ``predict`` help)."""
    if weights is None:
        if model_name is None:
            raise InputError('give --model, --weights, or both')
        split_known_name(model_name)
        return timm.create_model(model_name, pretrained=True).eval()
    if weights.is_dir():
        return _load_folder(model_name, weights).eval()
    if not weights.is_file():
        raise InputError(f'{weights}: no such file or folder')
    if model_name is None:
        raise InputError(f'{weights}: a weights file needs --model (a converted folder does not)')
    split_known_name(model_name)
    return _create(model_name, weights).eval()


def _load_folder(model_name: Optional[str], folder: Path) -> torch.nn.Module:
    config = _folder_config(folder)
    if config.get('architecture') not in timm.list_models('effnet_v1*'):
        raise InputError(f"{folder}: holds '{config.get('architecture')}', not an effnet_timm model")
    if model_name is None:
        return _create(f'local-dir:{folder}', folder)
    arch, _ = split_known_name(model_name)
    if arch != config.get('architecture'):
        raise InputError(f"{folder} holds {config.get('architecture')}, not {arch}")
    # A tag brings its own preprocessing (e.g. AdvProp's mean/std) for a folder converted without one.
    return _create(model_name, folder / 'model.safetensors', **config.get('model_args', {}))


def _folder_config(folder: Path) -> Dict[str, Any]:
    path = folder / 'config.json'
    if not path.is_file():
        raise InputError(f'{folder}: no config.json (not a folder written by effnet-convert)')
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f'{path}: unreadable: {first_line(err)}') from None


def _create(model_name: str, weights: Path, **model_args: Any) -> torch.nn.Module:
    """``model_name`` with user-supplied weights: a file, or a folder when the name is ``local-dir:``."""
    if not model_name.startswith('local-dir:'):
        model_args['pretrained_cfg_overlay'] = dict(file=str(weights))
    try:
        return timm.create_model(model_name, pretrained=True, **model_args)
    except PretrainedWeightsError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        reason = first_line(err)
        if reason.startswith('Error(s) in loading state_dict'):  # the key lists below it run for pages
            reason = 'its tensors do not fit this architecture'
        raise InputError(f'{weights}: cannot load into {model_name}: {reason}') from None


def read_images(paths: Sequence[Path]) -> List[Tuple[str, bytes]]:
    """``(name, encoded bytes)`` of each image file; the bytes give the TF-exact JPEG decode."""
    images = []
    for path in paths:
        try:
            images.append((str(path), path.read_bytes()))
        except OSError as err:
            raise InputError(f'{path}: cannot read image: {err.strerror or first_line(err)}') from None
    return images


def _tf_transform(data_config: Dict[str, Any], crop: str) -> TfEvalTransform:
    with warnings.catch_warnings():
        # The crop is the user's explicit choice and the output states it; a config mismatch is expected.
        warnings.filterwarnings('ignore', message=r'crop=.* crops with crop_padding')
        return create_tf_transform(data_config, crop=crop)


def _tf_input(transform: TfEvalTransform, name: str, data: bytes) -> torch.Tensor:
    try:
        rgb = decode_image(data)
    except UnidentifiedImageError:  # its message names a BytesIO object, not the file
        raise InputError(f'{name}: cannot decode image: not a format Pillow reads') from None
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f'{name}: cannot decode image: {first_line(err)}') from None
    try:
        return transform(rgb)
    except ValueError as err:
        raise InputError(f'{name}: {first_line(err)}') from None


def _timm_input(transform: Any, data: bytes) -> torch.Tensor:
    # timm's datasets decode with Pillow; the TF pipeline has already proved the file decodes.
    with Image.open(io.BytesIO(data)) as img:
        return transform(img.convert('RGB'))


def _class_names(model: torch.nn.Module) -> Optional[ImageNetInfo]:
    subset = infer_imagenet_subset(model)
    return ImageNetInfo(subset) if subset else None


def _top_k(probs: torch.Tensor, k: int, labels: Optional[ImageNetInfo]) -> List[Dict[str, Any]]:
    values, indices = probs.topk(min(k, probs.numel()))
    rows = []
    for p, i in zip(values.tolist(), indices.tolist()):
        row = dict(index=i, probability=p)
        if labels is not None:
            row.update(synset=labels.index_to_label_name(i), name=labels.index_to_description(i))
        rows.append(row)
    return rows


def _compare(tf_x: torch.Tensor, timm_x: torch.Tensor, tf_top: List[dict], timm_top: List[dict]) -> Dict[str, Any]:
    diff = (tf_x - timm_x).abs()
    tf_idx, timm_idx = [r['index'] for r in tf_top], [r['index'] for r in timm_top]
    return dict(
        mean_abs_diff=diff.mean().item(),
        max_abs_diff=diff.max().item(),
        top1_same=tf_idx[0] == timm_idx[0],
        topk_same_order=tf_idx == timm_idx,
        topk_shared=len(set(tf_idx) & set(timm_idx)),
        top=timm_top,
    )


def predict(
        model: torch.nn.Module, images: Sequence[Tuple[str, bytes]], topk: int = 5, crop: str = 'padding32',
        compare_timm: bool = False,
) -> Dict[str, Any]:
    """Top-k of each ``(name, encoded bytes)`` image under the official preprocessing (optionally also timm's)."""
    data_config = resolve_data_config({}, model=model)
    tf_transform = _tf_transform(data_config, crop)
    timm_transform = create_transform(**data_config) if compare_timm else None
    labels = _class_names(model)
    results = []
    for name, data in images:
        batch = [_tf_input(tf_transform, name, data)]
        if timm_transform is not None:
            batch.append(_timm_input(timm_transform, data))
        with torch.inference_mode():
            probs = model(torch.stack(batch)).float().softmax(-1)
        entry = dict(image=name, top=_top_k(probs[0], topk, labels))
        if timm_transform is not None:
            entry['timm_preprocessing'] = _compare(batch[0], batch[1], entry['top'], _top_k(probs[1], topk, labels))
        results.append(entry)
    return dict(model=_model_summary(model), preprocessing=_preprocessing_summary(tf_transform, crop, data_config),
                images=results)


def _model_summary(model: torch.nn.Module) -> Dict[str, Any]:
    cfg = model.pretrained_cfg
    name = cfg.get('architecture', '?') + (f".{cfg['tag']}" if cfg.get('tag') else '')
    return dict(name=name, weights=str(cfg.get('file') or cfg.get('hf_hub_id') or ''),
                num_classes=model.num_classes)


def _preprocessing_summary(transform: TfEvalTransform, crop: str, data_config: Dict[str, Any]) -> Dict[str, Any]:
    return dict(
        input_size=transform.image_size,
        crop=crop,
        crop_padding=transform.crop_padding,
        crop_pct=transform.crop_pct,
        mean=list(transform.mean),
        std=list(transform.std),
        jpeg_decoder='simplejpeg' if importlib.util.find_spec('simplejpeg') else 'pillow',
        timm_crop_pct=data_config['crop_pct'],
    )


def format_predictions(result: Dict[str, Any]) -> str:
    pre = result['preprocessing']
    lines = [
        f"model       {result['model']['name']} ({result['model']['weights'] or 'no weights'})",
        f"preprocess  official TF eval: {pre['input_size']}x{pre['input_size']}, centre crop with "
        f"{pre['crop_padding']} px padding ({pre['crop']}, crop_pct {pre['crop_pct']:.4f}), TF1 bicubic, "
        f"mean/std {mean_std_name(pre['mean'], pre['std'])}, JPEG decoder {pre['jpeg_decoder']}",
    ]
    for entry in result['images']:
        lines += ['', entry['image'], '  rank  prob    class  name']
        lines += [f"  {rank:<4}  {r['probability']:.4f}  {r['index']:<5}  {r.get('name', '')}"
                  for rank, r in enumerate(entry['top'], 1)]
        if 'timm_preprocessing' in entry:
            lines.append(_format_comparison(entry['timm_preprocessing'], len(entry['top']), pre['timm_crop_pct']))
    return '\n'.join(lines)


def _format_comparison(cmp: Dict[str, Any], k: int, timm_crop_pct: float) -> str:
    new_top1 = cmp['top'][0]
    top1 = 'top-1 same' if cmp['top1_same'] else f"top-1 changed to {new_top1['index']} ({new_top1.get('name', '')})"
    if cmp['topk_same_order']:
        topk = f'top-{k} same'
    elif cmp['topk_shared'] == k:
        topk = f'top-{k} reordered'
    else:
        topk = f"top-{k} changed ({cmp['topk_shared']}/{k} shared)"
    return (f"  timm eval transform (PIL, crop_pct {timm_crop_pct}): |dx| mean {cmp['mean_abs_diff']:.4f} "
            f"max {cmp['max_abs_diff']:.4f}; {top1}; {topk}")


def mean_std_name(mean: Sequence[float], std: Sequence[float]) -> str:
    """'imagenet' / 'inception' for the two standard normalizations, else the values."""
    key = (tuple(round(m, 3) for m in mean), tuple(round(s, 3) for s in std))
    return MEAN_STD_NAMES.get(key) or f'{list(mean)}/{list(std)}'
