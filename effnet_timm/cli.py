"""`effnet-timm`: classify photos with the official preprocessing (`predict`), list the variants (`info`)."""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config
from timm.models import split_model_name_tag

from .effnet_v1 import PretrainedWeightsError
from .preprocessing import TfEvalTransform, create_tf_transform, decode_image
from .pretrained import TAGS, pretrained_cfg

__all__ = ['main', 'read_images', 'load_model', 'predict', 'format_predictions', 'variant_info', 'format_info']

PROG = 'effnet-timm'
CROPS = ('padding32', 'fraction')
MEAN_STD_NAMES = {
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)): 'imagenet',
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)): 'inception',
}


class CliError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------- arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description='Official TensorFlow EfficientNet V1 in timm: classify photos, list the variants.')
    commands = parser.add_subparsers(dest='command', required=True)

    p = commands.add_parser(
        'predict', help='top-k ImageNet classes of photos, with the official eval preprocessing',
        description='Print the top-k ImageNet classes of each image, preprocessed as the official TF eval does.')
    p.add_argument('images', nargs='+', type=Path, metavar='IMAGE', help='JPEG, PNG, ... files')
    p.add_argument('--model', help='effnet_v1_bN[.tag] (optional with a --weights folder: read from its config.json)')
    p.add_argument('--weights', type=Path, metavar='FILE|DIR',
                   help='a folder written by effnet-convert, or a model.safetensors file (needs --model); '
                        'default: the pretrained weights of the --model tag')
    p.add_argument('--topk', type=_positive_int, default=5, metavar='K', help='classes shown per image (default 5)')
    p.add_argument('--crop', choices=CROPS, default='padding32',
                   help='centre crop: 32 px padding as behind the published accuracies (default), or the '
                        'current official code\'s 0.875 fraction')
    p.add_argument('--compare-timm-preprocessing', action='store_true',
                   help="also run timm's own eval transform (PIL) and report how inputs and top-k differ")
    p.add_argument('--json', action='store_true', help='machine-readable output')
    p.set_defaults(run=_run_predict)

    i = commands.add_parser('info', help='parameters, GMACs, preprocessing and pretrained tags of the variants',
                            description='Parameters, GMACs, preprocessing and pretrained tags of every variant.')
    i.add_argument('model', nargs='?', metavar='MODEL', help='one variant, effnet_v1_bN[.tag] (default: all)')
    i.add_argument('--json', action='store_true', help='machine-readable output')
    i.set_defaults(run=_run_info)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (CliError, PretrainedWeightsError) as err:
        print(f'{PROG}: error: {err}', file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- model names


def _known_tags(arch: str) -> List[str]:
    return [tag for tag, spec in TAGS.items() if arch in spec.variants]  # default first, as registered


def _split_known_name(name: str) -> Tuple[str, str]:
    """``(architecture, tag)`` of a registered effnet_timm model name; tag is '' when not given."""
    arch, tag = split_model_name_tag(name)
    known = timm.list_models('effnet_v1*')
    if arch not in known:
        raise CliError(f"unknown model '{name}' (known: {', '.join(known)})")
    if tag and tag not in _known_tags(arch):
        raise CliError(f"{arch} has no pretrained tag '{tag}' (tags: {', '.join(_known_tags(arch)) or 'none'})")
    return arch, tag


# ----------------------------------------------------------------------------- predict


def load_model(model_name: Optional[str], weights: Optional[Path]) -> torch.nn.Module:
    """The eval-mode model for ``--model`` / ``--weights`` (see the ``predict`` help)."""
    if weights is None:
        if model_name is None:
            raise CliError('give --model, --weights, or both')
        _split_known_name(model_name)
        return timm.create_model(model_name, pretrained=True).eval()
    if weights.is_dir():
        return _load_folder(model_name, weights).eval()
    if not weights.is_file():
        raise CliError(f'{weights}: no such file or folder')
    if model_name is None:
        raise CliError(f'{weights}: a weights file needs --model (a converted folder does not)')
    _split_known_name(model_name)
    return _create(model_name, weights).eval()


def _load_folder(model_name: Optional[str], folder: Path) -> torch.nn.Module:
    config = _folder_config(folder)
    if config.get('architecture') not in timm.list_models('effnet_v1*'):
        raise CliError(f"{folder}: holds '{config.get('architecture')}', not an effnet_timm model")
    if model_name is None:
        return _create(f'local-dir:{folder}', folder)
    arch, _ = _split_known_name(model_name)
    if arch != config.get('architecture'):
        raise CliError(f"{folder} holds {config.get('architecture')}, not {arch}")
    # A tag brings its own preprocessing (e.g. AdvProp's mean/std) for a folder converted without one.
    return _create(model_name, folder / 'model.safetensors', **config.get('model_args', {}))


def _folder_config(folder: Path) -> Dict[str, Any]:
    path = folder / 'config.json'
    if not path.is_file():
        raise CliError(f'{folder}: no config.json (not a folder written by effnet-convert)')
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CliError(f'{path}: unreadable: {_first_line(err)}') from None


def _create(model_name: str, weights: Path, **model_args: Any) -> torch.nn.Module:
    """``model_name`` with user-supplied weights: a file, or a folder when the name is ``local-dir:``."""
    if not model_name.startswith('local-dir:'):
        model_args['pretrained_cfg_overlay'] = dict(file=str(weights))
    try:
        return timm.create_model(model_name, pretrained=True, **model_args)
    except PretrainedWeightsError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        reason = _first_line(err)
        if reason.startswith('Error(s) in loading state_dict'):  # the key lists below it run for pages
            reason = 'its tensors do not fit this architecture'
        raise CliError(f'{weights}: cannot load into {model_name}: {reason}') from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def read_images(paths: Sequence[Path]) -> List[Tuple[str, bytes]]:
    """``(name, encoded bytes)`` of each image file; the bytes give the TF-exact JPEG decode."""
    images = []
    for path in paths:
        try:
            images.append((str(path), path.read_bytes()))
        except OSError as err:
            raise CliError(f'{path}: cannot read image: {err.strerror or _first_line(err)}') from None
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
        raise CliError(f'{name}: cannot decode image: not a format Pillow reads') from None
    except (OSError, ValueError, RuntimeError) as err:
        raise CliError(f'{name}: cannot decode image: {_first_line(err)}') from None
    try:
        return transform(rgb)
    except ValueError as err:
        raise CliError(f'{name}: {_first_line(err)}') from None


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


def _run_predict(args: argparse.Namespace) -> int:
    images = read_images(args.images)  # before the model is built: a mistyped path fails at once
    model = load_model(args.model, args.weights)
    result = predict(model, images, args.topk, args.crop, args.compare_timm_preprocessing)
    print(json.dumps(result, indent=2) if args.json else format_predictions(result))
    return 0


def format_predictions(result: Dict[str, Any]) -> str:
    pre = result['preprocessing']
    lines = [
        f"model       {result['model']['name']} ({result['model']['weights'] or 'no weights'})",
        f"preprocess  official TF eval: {pre['input_size']}x{pre['input_size']}, centre crop with "
        f"{pre['crop_padding']} px padding ({pre['crop']}, crop_pct {pre['crop_pct']:.4f}), TF1 bicubic, "
        f"mean/std {_mean_std_name(pre['mean'], pre['std'])}, JPEG decoder {pre['jpeg_decoder']}",
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


def _mean_std_name(mean: Sequence[float], std: Sequence[float]) -> str:
    key = (tuple(round(m, 3) for m in mean), tuple(round(s, 3) for s in std))
    return MEAN_STD_NAMES.get(key) or f'{list(mean)}/{list(std)}'


# ----------------------------------------------------------------------------- info


def variant_info(name: str) -> Dict[str, Any]:
    """Size, cost and preprocessing of a variant at its native size (or of ``variant.tag`` at the tag's)."""
    from .complexity import count_params_and_macs  # builds models on the meta device

    arch, tag = _split_known_name(name)
    cfg = pretrained_cfg(arch, tag or None)
    size = cfg['input_size'][-1]
    params, macs = count_params_and_macs(arch, size)
    tags = [tag] if tag else _known_tags(arch)
    return dict(
        model=name, params=params, gmacs=macs / 1e9, input_size=size, crop_pct=cfg['crop_pct'],
        mean=list(cfg['mean']), std=list(cfg['std']),
        tags=[_tag_info(arch, t) for t in tags],
    )


def _tag_info(arch: str, tag: str) -> Dict[str, Any]:
    cfg = pretrained_cfg(arch, tag)
    return dict(tag=tag, input_size=cfg['input_size'][-1], mean=list(cfg['mean']), std=list(cfg['std']),
                hf_hub_id=cfg['hf_hub_id'])


def _run_info(args: argparse.Namespace) -> int:
    names = [args.model] if args.model else timm.list_models('effnet_v1*')
    rows = [variant_info(name) for name in names]
    print(json.dumps(rows, indent=2) if args.json else format_info(rows))
    return 0


def format_info(rows: List[Dict[str, Any]]) -> str:
    header = ('model', 'params', 'GMACs', 'input', 'crop_pct', 'mean/std', 'pretrained tags (default first)')
    table = [header] + [_info_cells(row) for row in rows]
    widths = [max(len(cells[c]) for cells in table) for c in range(len(header) - 1)]
    right = {1, 2, 3}  # numbers
    lines = []
    for cells in table:
        padded = [cell.rjust(w) if c in right else cell.ljust(w) for c, (cell, w) in enumerate(zip(cells, widths))]
        lines.append('  '.join(padded + [cells[-1]]).rstrip())
    lines += [
        '',
        'GMACs: multiply-accumulates of the convolutions and classifier for one image at the input size',
        '(torch.utils.flop_counter FLOPs / 2). *: the tag has its own mean/std (AdvProp: 0.5, inputs in [-1, 1]);',
        '@N: evaluated at N px. effnet_v1 is the generic width/depth architecture, shown at B0 scale.',
    ]
    return '\n'.join(lines)


def _info_cells(row: Dict[str, Any]) -> Tuple[str, ...]:
    return (
        row['model'], f"{row['params']:,}", f"{row['gmacs']:.3f}", str(row['input_size']), f"{row['crop_pct']:.3f}",
        _mean_std_name(row['mean'], row['std']),
        ', '.join(_tag_label(t, row) for t in row['tags']) or 'none',
    )


def _tag_label(tag: Dict[str, Any], row: Dict[str, Any]) -> str:
    label = tag['tag']
    if (tag['mean'], tag['std']) != (row['mean'], row['std']):
        label += '*'
    if tag['input_size'] != row['input_size']:
        label += f"@{tag['input_size']}"
    return label


if __name__ == '__main__':
    sys.exit(main())
