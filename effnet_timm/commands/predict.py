"""Classify images with the official eval preprocessing: the library behind `effnet-timm predict`."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config
from timm.models import PretrainedCfg, split_model_name_tag

from ..data.datasets import IMAGE_EXTENSIONS
from ..data.preprocessing import (
    ImageTooLargeError,
    TfEvalTransform,
    create_tf_transform,
    decode_image,
    open_image,
    read_image_file,
)
from ..errors import InputError, first_line
from ..weights.integrity import verify_folder
from ..weights.tags import TAGS, pretrained_cfg

__all__ = [
    'CROPS',
    'IMAGE_EXTENSIONS',
    'image_files',
    'read_images',
    'load_model',
    'predict',
    'format_predictions',
    'split_known_name',
    'known_tags',
    'mean_std_name',
    'timm_aligned_config',
]

CROPS = ('padding32', 'fraction')
ImageItem = Path | tuple[str, bytes]
MEAN_STD_NAMES = {
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)): 'imagenet',
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)): 'inception',
    ((0.498, 0.498, 0.498), (0.502, 0.502, 0.502)): '127/128',  # Lite, EdgeTPU, CondConv
}


# ----------------------------------------------------------------------------- model names


def known_tags(arch: str) -> list[str]:
    """The pretrained tags of ``arch``, its default first."""
    return [tag for tag, spec in TAGS.items() if arch in spec.variants]  # default first, as registered


def split_known_name(name: str) -> tuple[str, str]:
    """``(architecture, tag)`` of a registered effnet_timm model name; tag is '' when not given."""
    arch, tag = split_model_name_tag(name)
    known = timm.list_models('effnet_v1*')
    if arch not in known:
        raise InputError(f"unknown model '{name}' (known: {', '.join(known)})")
    if tag and tag not in known_tags(arch):
        raise InputError(f"{arch} has no pretrained tag '{tag}' (tags: {', '.join(known_tags(arch)) or 'none'})")
    return arch, tag


# ----------------------------------------------------------------------------- weights


def load_model(model_name: str | None, weights: Path | None) -> torch.nn.Module:
    """The eval-mode model for ``--model`` / ``--weights`` (see the ``predict`` help).

    User weights are a folder written by effnet-convert or a safetensors file. What the conversion recorded
    wins over the registry: the folder's config.json sets the architecture arguments and the preprocessing
    (input size, crop, mean/std), the file's metadata sets the variant and the tag. A ``--model`` that
    contradicts them is an error; a ``--model`` tag on weights converted without one brings its mean/std.
    A ``model.safetensors`` beside a ``config.json`` is read as that folder. Recorded file digests are
    checked before the weights are read.
    """
    if weights is None:
        if model_name is None:
            raise InputError('give --model, --weights, or both')
        split_known_name(model_name)
        return timm.create_model(model_name, pretrained=True).eval()
    file, folder = _weights_paths(weights)
    config = _folder_config(folder) if folder is not None else None
    if folder is not None:
        verify_folder(folder)  # a flipped byte must not become silently different logits
    metadata = _safetensors_metadata(file)
    arch, tag = _resolve_name(model_name, weights, file, config, metadata)
    model_args = config.get('model_args', {}) if config is not None else _metadata_model_args(arch, metadata)
    cfg = _weights_cfg(arch, tag, config, file, user_tag=not metadata.get('tag'))
    try:
        model = timm.create_model(arch, pretrained=False, pretrained_cfg=cfg, **model_args)
    except (TypeError, ValueError) as err:
        raise InputError(
            f'{_config_or_file(folder, file)}: cannot build {arch} from {model_args}: {first_line(err)}'
        ) from None
    _load_weights(model, file, arch)
    return model.eval()


def _config_or_file(folder: Path | None, file: Path) -> Path:
    return folder / 'config.json' if folder is not None else file


def _weights_paths(weights: Path) -> tuple[Path, Path | None]:
    """(the safetensors file, its converted folder or None)."""
    if weights.is_dir():
        if not (weights / 'config.json').is_file():
            raise InputError(f'{weights}: no config.json (not a folder written by effnet-convert)')
        file = weights / 'model.safetensors'
        if not file.is_file():
            raise InputError(f'{weights}: no model.safetensors (not a folder written by effnet-convert)')
        return file, weights
    if not weights.is_file():
        raise InputError(f'{weights}: no such file or folder')
    if weights.name == 'model.safetensors' and (weights.parent / 'config.json').is_file():
        return weights, weights.parent
    return weights, None


def _folder_config(folder: Path) -> dict[str, Any]:
    path = folder / 'config.json'
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f'{path}: unreadable: {first_line(err)}') from None
    if not isinstance(config, dict):
        raise InputError(f'{path}: not a timm config (a JSON object)')
    if config.get('architecture') not in timm.list_models('effnet_v1*'):
        raise InputError(f"{folder}: holds '{config.get('architecture')}', not an effnet_timm model")
    return config


def _safetensors_metadata(file: Path) -> dict[str, str]:
    try:
        with safe_open(str(file), framework='pt') as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(
            f'{file}: not a safetensors file ({first_line(err)}); --weights takes the '
            f'model.safetensors written by effnet-convert, or its folder'
        ) from None


def _resolve_name(
    model_name: str | None, weights: Path, file: Path, config: dict[str, Any] | None, metadata: dict[str, str]
) -> tuple[str, str]:
    """(architecture, tag) from --model checked against what the conversion recorded."""
    recorded_arch = (config or {}).get('architecture') or metadata.get('variant') or None
    recorded_tag = metadata.get('tag') or ''
    if model_name is None:
        if recorded_arch is None:
            raise InputError(f'{file}: records no architecture (not written by effnet-convert): give --model')
        arch, tag = split_known_name(recorded_arch)
    else:
        arch, tag = split_known_name(model_name)
        if recorded_arch is not None and arch != recorded_arch:
            raise InputError(f'{weights} holds {recorded_arch}, not {arch}')
    if tag and recorded_tag and tag != recorded_tag:
        raise InputError(f'{file} was converted with --tag {recorded_tag}, but --model asks for tag {tag}')
    tag = tag or recorded_tag
    if tag and tag not in known_tags(arch):
        raise InputError(
            f"{file}: recorded tag '{tag}' is not a tag of {arch} (tags: {', '.join(known_tags(arch)) or 'none'})"
        )
    return arch, tag


def _metadata_model_args(arch: str, metadata: dict[str, str]) -> dict[str, Any]:
    # The generic architecture needs its scale; a named variant fixes it.
    if arch != 'effnet_v1' or not metadata.get('width_coefficient'):
        return {}
    try:
        return dict(
            width_coefficient=float(metadata['width_coefficient']),
            depth_coefficient=float(metadata['depth_coefficient']),
        )
    except (KeyError, ValueError):
        raise InputError(
            f'safetensors metadata: width/depth coefficients {metadata.get("width_coefficient")!r}/'
            f'{metadata.get("depth_coefficient")!r} are not numbers'
        ) from None


_CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(PretrainedCfg))
_NORMALIZATION = ('mean', 'std')


def _weights_cfg(arch: str, tag: str, config: dict[str, Any] | None, file: Path, user_tag: bool) -> dict[str, Any]:
    """The pretrained cfg of user weights: the tag's (or the architecture's), then the folder's config.json."""
    cfg = pretrained_cfg(arch, tag or None)
    if config is not None:
        folder_cfg = {k: v for k, v in (config.get('pretrained_cfg') or {}).items() if k in _CFG_FIELDS}
        if tag and user_tag:  # converted without a tag: the --model tag brings its normalization
            folder_cfg = {k: v for k, v in folder_cfg.items() if k not in _NORMALIZATION}
        cfg.update(folder_cfg)
    for key in ('hf_hub_id', 'url', 'hf_hub_filename', 'state_dict'):
        cfg.pop(key, None)  # these weights, never the Hub's
    cfg.update(architecture=arch, tag=tag or None, file=str(file))
    return cfg


def _apply_label_offset(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's `label_offset` convention (as its `load_pretrained`): the file has `offset` leading classes the
    model does not (EdgeTPU's background logit), which are dropped."""
    offset = (getattr(model, 'pretrained_cfg', None) or {}).get('label_offset') or 0
    weight = state.get('classifier.weight')
    if offset and weight is not None and weight.shape[0] == model.num_classes + offset:
        state = dict(state, **{k: state[k][offset:] for k in ('classifier.weight', 'classifier.bias')})
    return state


def _load_weights(model: torch.nn.Module, file: Path, arch: str) -> None:
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f'{file}: unreadable: {first_line(err)}') from None
    state = _apply_label_offset(state, model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    found = {k: tuple(v.shape) for k, v in state.items() if not k.endswith('num_batches_tracked')}
    problems = [f'{k} missing' for k in expected if k not in found]
    problems += [f'{k} unexpected' for k in found if k not in expected]
    problems += [
        f'{k} is {list(found[k])}, the model has {list(shape)}'
        for k, shape in expected.items()
        if k in found and found[k] != shape
    ]
    if problems:
        more = f' (+{len(problems) - 1} more)' if len(problems) > 1 else ''
        raise InputError(f'{file}: its tensors do not fit {arch}: {problems[0]}{more}')
    model.load_state_dict(state, strict=False)  # keys were checked above; BN counters are not stored


# ----------------------------------------------------------------------------- images


def image_files(paths: Sequence[Path]) -> list[Path]:
    """The image files named: files as given, folders as their image files (``IMAGE_EXTENSIONS``), sorted."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith('.') and p.is_file()
            )
            if not found:
                raise InputError(f'{path}: a folder with no image files ({" ".join(IMAGE_EXTENSIONS)})')
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f'{path}: cannot read image: no such file or folder')
    return files


def read_images(paths: Sequence[Path]) -> list[tuple[str, bytes]]:
    """``(name, encoded bytes)`` of each image file (folders expanded); the bytes give the TF-exact decode."""
    images = []
    for path in image_files(paths):
        try:
            images.append((str(path), read_image_file(path)))
        except ImageTooLargeError as err:
            raise InputError(f'{path}: {first_line(err)}') from None
        except OSError as err:
            raise InputError(f'{path}: cannot read image: {err.strerror or first_line(err)}') from None
    return images


# ----------------------------------------------------------------------------- predict


def _tf_transform(data_config: dict[str, Any], crop: str, interpolation: str | None = None) -> TfEvalTransform:
    with warnings.catch_warnings():
        # The crop is the user's explicit choice and the output (or report) states it; a config mismatch is expected.
        warnings.filterwarnings('ignore', message=r'crop=.* crops with crop_padding')
        # interpolation None: the model's own (TF1 bicubic; bilinear for Lite/EdgeTPU, as their main.py).
        return create_tf_transform(data_config, crop=crop, interpolation=interpolation)


def timm_aligned_config(data_config: dict[str, Any], transform: TfEvalTransform) -> dict[str, Any]:
    """``data_config`` with the crop_pct (4 decimals) for which timm's eval transform resizes to the
    ``image_size + crop_padding`` that ``transform`` crops with, so that comparing the two isolates the
    resize and decoder differences from the crop convention. Rounding size/(size + padding) to nearest can
    land a pixel short in timm's ``floor(size / crop_pct)`` (e.g. 0.9494 at 600 gives 631, not 632)."""
    size, target = transform.image_size, transform.image_size + transform.crop_padding
    k = size * 10000 // target  # size / target cut to 4 decimals, in exact integer arithmetic
    while math.floor(size / (k / 10000)) < target:  # float division may still fall short
        k -= 1
    if math.floor(size / (k / 10000)) != target:
        raise ValueError(f'no 4-decimal crop_pct makes timm resize {size} px to {target} px')
    return dict(data_config, crop_pct=k / 10000)


def _tf_input(transform: TfEvalTransform, data: bytes) -> torch.Tensor:
    try:
        rgb = decode_image(data, max_pixels=transform.max_pixels)
    except ImageTooLargeError as err:
        raise InputError(f'image refused: {first_line(err)}') from None
    except UnidentifiedImageError:  # its message names a BytesIO object, not the file
        raise InputError('cannot decode image: not a format Pillow reads') from None
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f'cannot decode image: {first_line(err)}') from None
    try:
        return transform(rgb)
    except ValueError as err:
        raise InputError(first_line(err)) from None


def _timm_input(transform: Any, data: bytes) -> torch.Tensor:
    # timm's datasets decode with Pillow, which may refuse a file the TF pipeline's decoder read.
    try:
        with open_image(data) as img:
            return transform(img.convert('RGB'))
    except (OSError, ValueError, UnidentifiedImageError) as err:
        raise InputError(f'timm preprocessing: Pillow cannot decode the image: {first_line(err)}') from None


def _image_bytes(image: ImageItem) -> tuple[str, bytes]:
    if not isinstance(image, Path):
        return image
    try:
        return str(image), read_image_file(image)
    except ImageTooLargeError as err:
        raise InputError(f'image refused: {first_line(err)}') from None
    except OSError as err:
        raise InputError(f'cannot read image: {err.strerror or first_line(err)}') from None


def _class_names(model: torch.nn.Module) -> ImageNetInfo | None:
    subset = infer_imagenet_subset(model)
    return ImageNetInfo(subset) if subset else None


def _top_k(probs: torch.Tensor, k: int, labels: ImageNetInfo | None) -> list[dict[str, Any]]:
    values, indices = probs.topk(min(k, probs.numel()))
    rows = []
    for p, i in zip(values.tolist(), indices.tolist()):
        row = dict(index=i, probability=p)
        if labels is not None:
            row.update(synset=labels.index_to_label_name(i), name=labels.index_to_description(i))
        rows.append(row)
    return rows


def _compare(tf_x: torch.Tensor, timm_x: torch.Tensor, tf_top: list[dict], timm_top: list[dict]) -> dict[str, Any]:
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
    model: torch.nn.Module,
    images: Sequence[ImageItem],
    topk: int = 5,
    crop: str = 'padding32',
    compare_timm: bool = False,
    interpolation: str | None = None,
) -> dict[str, Any]:
    """Top-k of each image (a path, or ``(name, encoded bytes)``) under the official preprocessing
    (optionally also timm's). An image that cannot be read or decoded gets an ``error`` entry instead of
    ``top``, and the others are still classified; ``failed`` counts those entries."""
    data_config = resolve_data_config({}, model=model)
    tf_transform = _tf_transform(data_config, crop, interpolation)
    if compare_timm:  # timm's transform with the same crop, so that the comparison shows resize and decoder
        data_config = timm_aligned_config(data_config, tf_transform)
    timm_transform = create_transform(**data_config) if compare_timm else None
    labels = _class_names(model)
    results = []
    for image in images:
        name = str(image) if isinstance(image, Path) else image[0]
        try:
            _, data = _image_bytes(image)
            batch = [_tf_input(tf_transform, data)]
            if timm_transform is not None:
                batch.append(_timm_input(timm_transform, data))
        except InputError as err:
            results.append(dict(image=name, error=first_line(err)))
            continue
        with torch.inference_mode():
            probs = model(torch.stack(batch)).float().softmax(-1)
        entry = dict(image=name, top=_top_k(probs[0], topk, labels))
        if timm_transform is not None:
            entry['timm_preprocessing'] = _compare(batch[0], batch[1], entry['top'], _top_k(probs[1], topk, labels))
        results.append(entry)
    return dict(
        model=_model_summary(model),
        preprocessing=_preprocessing_summary(tf_transform, crop, data_config),
        images=results,
        failed=sum('error' in entry for entry in results),
    )


def _model_summary(model: torch.nn.Module) -> dict[str, Any]:
    cfg = model.pretrained_cfg
    name = cfg.get('architecture', '?') + (f'.{cfg["tag"]}' if cfg.get('tag') else '')
    return dict(name=name, weights=str(cfg.get('file') or cfg.get('hf_hub_id') or ''), num_classes=model.num_classes)


def _preprocessing_summary(transform: TfEvalTransform, crop: str, data_config: dict[str, Any]) -> dict[str, Any]:
    return dict(
        input_size=transform.image_size,
        crop=crop,
        crop_padding=transform.crop_padding,
        crop_pct=transform.crop_pct,
        mean=list(transform.mean),
        std=list(transform.std),
        interpolation=transform.interpolation,
        jpeg_decoder='simplejpeg' if importlib.util.find_spec('simplejpeg') else 'pillow',
        timm_crop_pct=data_config['crop_pct'],
    )


def format_predictions(result: dict[str, Any]) -> str:
    pre = result['preprocessing']
    resize = pre.get('interpolation', 'bicubic')
    lines = [
        f'model       {result["model"]["name"]} ({result["model"]["weights"] or "no weights"})',
        f'preprocess  official TF eval: {pre["input_size"]}x{pre["input_size"]}, centre crop with '
        f'{pre["crop_padding"]} px padding ({pre["crop"]}, crop_pct {pre["crop_pct"]:.4f}), TF1 {resize}, '
        f'mean/std {mean_std_name(pre["mean"], pre["std"])}, JPEG decoder {pre["jpeg_decoder"]}',
    ]
    for entry in result['images']:
        if 'error' in entry:
            lines += ['', entry['image'], f'  error: {entry["error"]}']
            continue
        lines += ['', entry['image'], '  rank  prob    class  name']
        lines += [
            f'  {rank:<4}  {r["probability"]:.4f}  {r["index"]:<5}  {r.get("name", "")}'
            for rank, r in enumerate(entry['top'], 1)
        ]
        if 'timm_preprocessing' in entry:
            lines.append(_format_comparison(entry['timm_preprocessing'], len(entry['top']), pre['timm_crop_pct']))
    return '\n'.join(lines)


def _format_comparison(cmp: dict[str, Any], k: int, timm_crop_pct: float) -> str:
    new_top1 = cmp['top'][0]
    top1 = 'top-1 same' if cmp['top1_same'] else f'top-1 changed to {new_top1["index"]} ({new_top1.get("name", "")})'
    if cmp['topk_same_order']:
        topk = f'top-{k} same'
    elif cmp['topk_shared'] == k:
        topk = f'top-{k} reordered'
    else:
        topk = f'top-{k} changed ({cmp["topk_shared"]}/{k} shared)'
    return (
        f'  timm eval transform (PIL, crop_pct {timm_crop_pct}): |dx| mean {cmp["mean_abs_diff"]:.4f} '
        f'max {cmp["max_abs_diff"]:.4f}; {top1}; {topk}'
    )


def mean_std_name(mean: Sequence[float], std: Sequence[float]) -> str:
    """'imagenet' / 'inception' for the two standard normalizations, else the values."""
    key = (tuple(round(m, 3) for m in mean), tuple(round(s, 3) for s in std))
    return MEAN_STD_NAMES.get(key) or f'{list(mean)}/{list(std)}'
