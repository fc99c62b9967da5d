"""Classify images with the official eval preprocessing: the library behind `effnet-timm predict`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import UnidentifiedImageError
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config

from ..data.datasets import IMAGE_EXTENSIONS
from ..data.preprocessing import (
    ImageTooLargeError,
    TfEvalTransform,
    create_tf_transform,
    crop_pct_for,
    decode_image,
    open_image,
    read_image_file,
)
from ..errors import InputError, first_line
from .loading import load_model

__all__ = [
    'CROPS',
    'IMAGE_EXTENSIONS',
    'image_files',
    'load_model',
    'predict',
    'format_predictions',
    'mean_std_name',
    'tf_eval_transform',
    'timm_aligned_config',
]

CROPS = ('padding32', 'fraction')
ImageItem = Path | tuple[str, bytes]
MEAN_STD_NAMES = {
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)): 'imagenet',
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)): 'inception',
    ((0.498, 0.498, 0.498), (0.502, 0.502, 0.502)): '127/128',  # Lite, EdgeTPU, CondConv
}


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


# ----------------------------------------------------------------------------- predict


def tf_eval_transform(data_config: dict[str, Any], crop: str, interpolation: str | None = None) -> TfEvalTransform:
    """The official eval transform for a timm data config, with `crop` the user's explicit choice."""
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
    return dict(data_config, crop_pct=crop_pct_for(transform.image_size, transform.crop_padding, decimals=4))


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
    tf_transform = tf_eval_transform(data_config, crop, interpolation)
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
        jpeg_decoder='simplejpeg',
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
