"""ImageNet evaluation with the official preprocessing, in one process or under torchrun: the library behind
`effnet-timm validate`.

Distributed runs (``torchrun ... effnet-timm validate``) give rank r the images ``r, r + R, r + 2R, ...``: no
padding, so no image is counted twice, and the model is a plain replica with no collectives in its forward, so
ranks with one batch fewer cannot hang. After the loop the integer counts are all-reduced and every rank's
``(index, label, top-5)`` rows are gathered; rank 0 checks that each index arrived exactly once and that the
count equals the dataset's length before it reports anything.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from ..data.datasets import EvalDataset, ImageSource, open_imagenet_val
from ..data.preprocessing import check_image_pixels, max_image_pixels, open_image
from ..errors import InputError
from ..files import write_atomic
from ..weights.tags import TAGS
from .loading import load_model
from .outputs import check_output_file
from .predict import CROPS, mean_std_name, tf_eval_transform, timm_aligned_config

__all__ = [
    'AMP_DTYPES',
    'PREPROCESSINGS',
    'DistInfo',
    'Evaluation',
    'ShardSampler',
    'TimmEvalTransform',
    'init_distributed',
    'build_model',
    'eval_transform',
    'evaluate',
    'validate',
    'official_top1',
    'format_result',
    'check_output_path',
    'write_results',
    'write_per_image',
]

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
PREPROCESSINGS = ('tf', 'timm')
TOPK = 5
# A rank that waits longer than this in a collective gives up instead of hanging (torchrun also stops the
# others when one rank fails).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (one process: nothing to join), or use the
    one the caller already initialised, and pick the device: ``cuda:LOCAL_RANK`` on a GPU machine (nccl), else
    the CPU (gloo)."""
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if dist.is_available() and dist.is_initialized():  # the caller's group (a training script): join it as is
        info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)
        return info, _resolve_device(device, info)
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    info = DistInfo(int(os.environ.get('RANK', '0')), world_size, local_rank)
    dev = _resolve_device(device, info)
    if info.distributed and not dist.is_initialized():
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        if dev.type == 'cuda':
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=dev if dev.type == 'cuda' else None)
    return info, dev


def _resolve_device(device: str | None, info: DistInfo) -> torch.device:
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device}: not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise InputError(f'--device {device}: no CUDA device is available')
        if dev.index is None:  # one GPU per local rank
            dev = torch.device('cuda', info.local_rank % torch.cuda.device_count())
    return dev


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world_size, ...`` of ``range(length)``: every index on exactly one rank, none
    repeated (ranks differ by at most one sample)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


# ----------------------------------------------------------------------------- model and preprocessing


def build_model(model_name: str | None, weights: Path | None, info: DistInfo = DistInfo()) -> torch.nn.Module:
    """The eval-mode model (as ``predict``). With pretrained weights under torchrun, local rank 0 of each node
    fetches them first while the other ranks wait at a barrier, then read them from the cache it filled."""
    if weights is not None or not info.distributed:
        return load_model(model_name, weights)
    if info.local_rank == 0:
        model = load_model(model_name, weights)
        dist.barrier()
        return model
    dist.barrier()
    return load_model(model_name, weights)


class TimmEvalTransform:
    """timm's own eval transform on a Pillow decode (as timm's datasets do): for comparison only."""

    def __init__(self, data_config: dict[str, Any]) -> None:
        from timm.data import create_transform

        self.transform = create_transform(**data_config)
        self.crop_pct = data_config['crop_pct']
        self.max_pixels = max_image_pixels()

    def __call__(self, image: Any) -> torch.Tensor:
        if isinstance(image, Image.Image):
            check_image_pixels(image.width, image.height, self.max_pixels)
        else:
            image = open_image(image, self.max_pixels)  # refuses a decompression bomb from its header
        with image:
            return self.transform(image.convert('RGB'))


def eval_transform(
    model: torch.nn.Module,
    preprocessing: str = 'tf',
    crop: str = 'padding32',
    img_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> tuple[Callable, dict]:
    """The per-image transform and a description of it (for the report and the results file). ``img_size`` and
    ``crop_pct`` (timm's ``--img-size`` / ``--crop-pct``) override the model's size and the ``crop`` convention."""
    from timm.data import resolve_data_config

    if preprocessing not in PREPROCESSINGS:
        raise InputError(f'--preprocessing must be one of {PREPROCESSINGS}, got {preprocessing!r}')
    if crop not in CROPS:
        raise InputError(f'--crop must be one of {CROPS}, got {crop!r}')
    if img_size is not None and img_size < 1:
        raise InputError(f'--img-size must be >= 1, got {img_size}')
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise InputError(f'--crop-pct must be in (0, 1], got {crop_pct}')
    data_config = resolve_data_config({}, model=model)
    if img_size is not None:
        data_config['input_size'] = (data_config['input_size'][0], img_size, img_size)
    if crop_pct is not None:
        data_config['crop_pct'], crop = crop_pct, 'crop_pct'
    tf = tf_eval_transform(data_config, crop, interpolation)
    desc = dict(
        preprocessing=preprocessing,
        img_size=tf.image_size,
        crop=crop,
        interpolation=tf.interpolation,  # the model's official resize (Lite/EdgeTPU: bilinear)
        mean_std=mean_std_name(data_config['mean'], data_config['std']),
    )
    if preprocessing == 'tf':
        desc.update(crop_pct=round(tf.crop_pct, 4), crop_padding=tf.crop_padding)
        return tf, desc
    # timm's transform crops by crop_pct: the same crop convention (resize to size + padding, then crop).
    data_config = timm_aligned_config(data_config, tf)
    desc.update(crop_pct=data_config['crop_pct'], interpolation=data_config['interpolation'])
    return TimmEvalTransform(data_config), desc


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """What one (possibly distributed) pass over a dataset found; on rank 0, everything, elsewhere the counts."""

    num_images: int  # images classified (all ranks)
    top1: int
    top5: int
    seconds: float
    rows: np.ndarray  # (num_images, 2 + TOPK) int64: index, label, top-5 classes; sorted by index
    bad: list[str]  # one line per skipped file (with skip_bad)


def _loader(
    dataset: EvalDataset, info: DistInfo, batch_size: int, workers: int, device: torch.device
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), info.rank, info.world_size),
        num_workers=workers,
        pin_memory=device.type == 'cuda',
    )


def evaluate(
    model: torch.nn.Module,
    dataset: EvalDataset,
    *,
    batch_size: int = 64,
    workers: int = 4,
    device: torch.device = torch.device('cpu'),
    amp: str | None = None,
    channels_last: bool = False,
    skip_bad: bool = False,
    progress: bool = False,
    info: DistInfo = DistInfo(),
) -> Evaluation:
    """Classify every image of ``dataset`` (this rank's shard of it) and count top-1/top-5 hits exactly.

    A file that cannot be decoded raises :class:`InputError` naming it, or with ``skip_bad`` is left out of the
    counts and listed. Under torchrun every rank must call this; the counts are summed over ranks."""
    if amp is not None and amp not in AMP_DTYPES:
        raise InputError(f'--amp must be one of {tuple(AMP_DTYPES)}, got {amp!r}')
    model = model.to(device).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = _loader(dataset, info, batch_size, workers, device)
    rows: list[np.ndarray] = []
    bad: list[str] = []
    start = time.perf_counter()
    with _progress(len(loader.sampler), progress and info.is_main, info.world_size) as bar:
        for x, labels, indices, errors in loader:
            for error in (e for e in errors if e):
                if not skip_bad:
                    raise InputError(f'{error} (--skip-bad counts and lists such files instead of stopping)')
                bad.append(error)
            ok = torch.tensor([not e for e in errors])
            if not ok.all():  # only then: masking copies the (pinned) batch
                x, labels, indices = x[ok], labels[ok], indices[ok]
            if len(indices):
                if (labels < 0).any():
                    index = int(indices[labels < 0][0])
                    raise InputError(
                        f'{_name(dataset, index)}: has no label (the dataset must be labelled with '
                        'ImageNet-1k class indices)'
                    )
                rows.append(_classify(model, x, labels, indices, device, memory_format, amp))
            bar.update(len(errors))
    local = np.concatenate(rows) if rows else np.zeros((0, 2 + TOPK), np.int64)
    return _combine(local, bad, time.perf_counter() - start, len(dataset), info, device)


def _name(dataset: Any, index: int) -> str:
    source = dataset.source
    return os.path.join(source.root, source.name(index))


def _classify(
    model: torch.nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    device: torch.device,
    memory_format: torch.memory_format,
    amp: str | None,
) -> np.ndarray:
    x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
    with torch.inference_mode(), torch.autocast(device.type, dtype=AMP_DTYPES.get(amp), enabled=amp is not None):
        logits = model(x)
    top = logits.float().topk(min(TOPK, logits.shape[-1]), dim=-1).indices.cpu()
    if top.shape[1] < TOPK:  # fewer classes than k: pad with -1, never a class
        top = torch.cat([top, top.new_full((top.shape[0], TOPK - top.shape[1]), -1)], 1)
    return torch.cat([indices[:, None], labels[:, None], top], 1).numpy().astype(np.int64)


def _combine(
    local: np.ndarray, bad: list[str], seconds: float, length: int, info: DistInfo, device: torch.device
) -> Evaluation:
    hits1 = int((local[:, 2] == local[:, 1]).sum())
    hits5 = int((local[:, 2:] == local[:, 1:2]).any(1).sum())
    counts = torch.tensor([len(local), hits1, hits5, len(bad)], dtype=torch.int64)
    rows, bad_all = local, bad
    if info.distributed:
        counts = counts.to(device)
        dist.all_reduce(counts)  # integer sums: exact, whatever the shard sizes
        counts = counts.cpu()
        gathered: list[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, (local, bad))
        rows = np.concatenate([g[0] for g in gathered])
        bad_all = [line for g in gathered for line in g[1]]
        seconds_t = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(seconds_t, op=dist.ReduceOp.MAX)  # the run lasts as long as its slowest rank
        seconds = float(seconds_t.item())
    n, top1, top5, num_bad = (int(v) for v in counts)
    rows = rows[np.argsort(rows[:, 0], kind='stable')]
    # Every image exactly once: classified or listed as bad, never both, never twice, never missed.
    if n + num_bad != length or len(rows) != n or len(np.unique(rows[:, 0])) != n:
        raise RuntimeError(
            f'evaluation counted {n} images + {num_bad} bad of a dataset of {length} '
            f'({len(np.unique(rows[:, 0]))} distinct): a sharding bug, no result reported'
        )
    return Evaluation(n, top1, top5, seconds, rows, sorted(bad_all))


class _progress:
    """A tqdm bar on rank 0's shard (its total scaled to the whole run); nothing when disabled."""

    def __init__(self, shard_len: int, enabled: bool, world_size: int) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=shard_len * world_size,
                unit='img',
                file=sys.stderr,
                mininterval=1.0,
                dynamic_ncols=True,
                leave=False,
            )
        self.world_size = world_size

    def __enter__(self) -> _progress:
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n * self.world_size)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- the command


def official_top1(model: torch.nn.Module) -> float | None:
    """The tensorflow/tpu README's top-1 for the model's pretrained tag, if it has one."""
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    arch, tag = cfg.get('architecture'), cfg.get('tag')
    spec = TAGS.get(tag or '')
    if spec is None or arch not in spec.variants:
        return None
    return spec.official_top1[spec.variants.index(arch)]


def validate(
    data: Path | str,
    model_name: str | None = None,
    weights: Path | str | None = None,
    *,
    dataset: str = '',
    ground_truth: Path | str | None = None,
    batch_size: int = 64,
    workers: int = 4,
    crop: str = 'padding32',
    img_size: int | None = None,
    crop_pct: float | None = None,
    preprocessing: str = 'tf',
    amp: str | None = None,
    channels_last: bool = False,
    fuse: bool = False,
    limit: int | None = None,
    device: str | None = None,
    skip_bad: bool = False,
    progress: bool = False,
    interpolation: str | None = None,
) -> dict[str, Any] | None:
    """Evaluate a model on ImageNet-val at ``data`` (see ``effnet-timm validate --help``); joins torchrun's
    process group when launched by it, or uses the caller's (and leaves it initialised). Returns the result on
    rank 0 and ``None`` on the other ranks."""
    weights = None if weights is None else Path(weights)
    ground_truth = None if ground_truth is None else Path(ground_truth)
    source = open_imagenet_val(Path(data), dataset, ground_truth)  # before the model: a bad path fails at once
    own_group = not (dist.is_available() and dist.is_initialized())
    info, dev = init_distributed(device)
    try:
        model = build_model(model_name, weights, info)
        _check_classes(model, source)
        transform, pre = eval_transform(model, preprocessing, crop, img_size, crop_pct, interpolation)
        runtime = dict(
            amp=amp, channels_last=channels_last, fuse=fuse, param_count=sum(p.numel() for p in model.parameters())
        )  # before fusing folds BatchNorm away
        if fuse:
            from ..models.fusion import fuse as fuse_model

            model = fuse_model(model)
        eval_set = EvalDataset(source, transform, (3, pre['img_size'], pre['img_size']))
        if limit is not None:
            eval_set = _Limited(eval_set, limit)
        ev = evaluate(
            model,
            eval_set,
            batch_size=batch_size,
            workers=workers,
            device=dev,
            amp=amp,
            channels_last=channels_last,
            skip_bad=skip_bad,
            progress=progress,
            info=info,
        )
        if not info.is_main:
            return None
        protocol = dict(limit=limit, preprocessing=preprocessing, crop=pre['crop'], amp=amp, img_size=pre['img_size'])
        protocol['crop_pct'] = crop_pct
        return _result(model, source, ev, pre, info, dev, runtime, protocol)
    finally:
        if own_group and info.distributed and dist.is_initialized():
            dist.destroy_process_group()


class _Limited(torch.utils.data.Dataset):
    """The first ``limit`` images of a dataset."""

    def __init__(self, dataset: EvalDataset, limit: int) -> None:
        if limit < 1:
            raise InputError(f'--limit must be >= 1, got {limit}')
        self.dataset, self.length = dataset, min(limit, len(dataset))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    @property
    def source(self) -> ImageSource:
        return self.dataset.source


def _check_classes(model: torch.nn.Module, source: ImageSource) -> None:
    from ..data.datasets import OTHER_CLASSES, TimmSource

    own_labels = isinstance(source, TimmSource) and source.remap is None  # a timm dataset's own label space
    if model.num_classes != 1000 and not own_labels:
        raise InputError(
            f'the model has {model.num_classes} classes; ImageNet-val is labelled with the 1000 ImageNet-1k classes'
        )
    if model.num_classes == 1000 and own_labels:
        raise InputError(
            f'{source.root}: its labels ({source.label_summary()}) are not ImageNet-1k classes (WordNet synset ids '
            "or ImageNet-1k class names) and cannot be mapped to the model's 1000 outputs" + OTHER_CLASSES
        )


IMAGENET_VAL_IMAGES = 50_000
OFFICIAL_PROTOCOL = "the full 50,000-image split, TF preprocessing, the padding32 crop at the table's size, fp32"


def _official_deviations(model: torch.nn.Module, ev: Evaluation, protocol: dict[str, Any]) -> list[str]:
    """How this run differs from the protocol behind the README's top-1 (empty: the difference means something)."""
    from ..models.config import VARIANTS
    from ..weights.tags import GENERIC_RESOLUTION

    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    spec, arch = TAGS[cfg['tag']], cfg['architecture']  # official_top1 found both
    size = spec.input_size or (VARIANTS[arch].resolution if arch in VARIANTS else GENERIC_RESOLUTION)
    deviations = []
    if protocol['limit'] is not None:
        deviations.append(f'--limit {protocol["limit"]}')
    if ev.num_images != IMAGENET_VAL_IMAGES:
        deviations.append(f'{ev.num_images:,} of the {IMAGENET_VAL_IMAGES:,} images')
    if protocol['preprocessing'] != 'tf':
        deviations.append(f'--preprocessing {protocol["preprocessing"]}')
    if protocol['crop'] == 'crop_pct':
        deviations.append(f'--crop-pct {protocol.get("crop_pct")}')
    elif protocol['crop'] != 'padding32':
        deviations.append(f'--crop {protocol["crop"]}')
    if protocol['img_size'] != size:
        deviations.append(f'{protocol["img_size"]} px, not {size}')
    if protocol['amp'] is not None:
        deviations.append(f'--amp {protocol["amp"]}')
    return deviations


def _result(
    model: torch.nn.Module,
    source: ImageSource,
    ev: Evaluation,
    pre: dict[str, Any],
    info: DistInfo,
    dev: torch.device,
    runtime: dict[str, Any],
    protocol: dict[str, Any],
) -> dict[str, Any]:
    cfg = model.pretrained_cfg
    name = cfg.get('architecture', type(model).__name__) + (f'.{cfg["tag"]}' if cfg.get('tag') else '')
    if ev.num_images == 0:  # every file was skipped: an accuracy of nothing is no number at all
        raise InputError(f'{source.root}: no image could be decoded ({len(ev.bad)} skipped with --skip-bad)')
    top1, top5 = 100 * ev.top1 / ev.num_images, 100 * ev.top5 / ev.num_images
    official = official_top1(model)
    deviations = _official_deviations(model, ev, protocol) if official is not None else []
    names = [source.name(int(i)) for i in ev.rows[:, 0]]
    return dict(
        # timm validate.py's result keys first, with its rounding
        model=name,
        top1=round(top1, 4),
        top1_err=round(100 - top1, 4),
        top5=round(top5, 4),
        top5_err=round(100 - top5, 4),
        param_count=round(runtime['param_count'] / 1e6, 2),
        img_size=pre['img_size'],
        crop_pct=pre['crop_pct'],
        interpolation=pre['interpolation'],
        num_images=ev.num_images,
        top1_count=ev.top1,
        top5_count=ev.top5,
        official_top1=official,
        official_top1_diff=None if official is None or deviations else round(top1 - official, 4),
        official_protocol_deviations=deviations,
        images_per_s=round(ev.num_images / ev.seconds, 2) if ev.seconds > 0 else None,
        seconds=round(ev.seconds, 2),
        processes=info.world_size,
        device=dev.type,
        weights=str(cfg.get('file') or cfg.get('hf_hub_id') or ''),
        data=source.root,
        data_description=source.description,
        preprocessing=pre,
        runtime=runtime,
        skipped=ev.bad,
        per_image=[dict(path=p, label=int(r[1]), top5=[int(c) for c in r[2:]]) for p, r in zip(names, ev.rows)],
    )


TIMM_KEYS = (
    'model',
    'top1',
    'top1_err',
    'top5',
    'top5_err',
    'param_count',
    'img_size',
    'crop_pct',
    'interpolation',
    'num_images',
)


def format_result(result: dict[str, Any]) -> str:
    pre = result['preprocessing']
    if pre['preprocessing'] == 'tf':
        how = (
            f'official TF eval: {pre["img_size"]}x{pre["img_size"]}, centre crop with {pre["crop_padding"]} px '
            f'padding ({pre["crop"]}, crop_pct {pre["crop_pct"]:.4f}), TF1 {pre["interpolation"]}'
        )
    else:
        size, crop_pct = pre['img_size'], pre['crop_pct']
        how = f'timm eval transform: {size}x{size}, crop_pct {crop_pct}, PIL {pre["interpolation"]}'
    n = result['num_images']
    speed = (
        f'{result["images_per_s"]:,.1f} images/s ({result["processes"]} process'
        f'{"es" if result["processes"] > 1 else ""}, {result["device"]}, {result["seconds"]:.1f} s)'
    )
    lines = [
        f'model       {result["model"]} ({result["weights"] or "no weights"}), {result["param_count"]} M params',
        f'data        {result["data"]}: {result["data_description"]}',
        f'preprocess  {how}, mean/std {pre["mean_std"]}',
        f'top-1       {result["top1"]:.3f} %  ({result["top1_count"]:,} / {n:,})',
        f'top-5       {result["top5"]:.3f} %  ({result["top5_count"]:,} / {n:,})',
        f'speed       {speed}',
    ]
    if result['official_top1'] is not None and result['official_top1_diff'] is not None:
        lines.append(
            f'official    top-1 {result["official_top1"]:.1f} % (tensorflow/tpu README); '
            f'difference {result["official_top1_diff"]:+.3f} (the published protocol: {OFFICIAL_PROTOCOL})'
        )
    elif result['official_top1'] is not None:
        lines.append(
            f'official    top-1 {result["official_top1"]:.1f} % (tensorflow/tpu README) is for {OFFICIAL_PROTOCOL}; '
            f'no difference shown: this run has {", ".join(result["official_protocol_deviations"])}'
        )
    else:
        lines.append('official    no published top-1 for these weights (no pretrained tag)')
    if result['skipped']:
        lines.append(f'skipped     {len(result["skipped"])} undecodable file(s), not counted:')
        lines += [f'  {line}' for line in result['skipped']]
    return '\n'.join(lines)


def check_output_path(path: Path | None, suffixes: tuple[str, ...], option: str) -> None:
    """Refuse an output path before the run rather than after it (see :mod:`.outputs`)."""
    if path is None:
        return
    if path.suffix.lower() not in suffixes:
        raise InputError(f'{path}: {option} must end in {" or ".join(suffixes)}')
    if os.environ.get('RANK', '0') == '0':  # under torchrun only rank 0 writes (other nodes may lack the folder)
        check_output_file(path, option)


def write_results(result: dict[str, Any], path: Path) -> None:
    """timm's result keys (and ``num_images``) as JSON, or as a one-row CSV, by the file's suffix."""
    row = {k: result[k] for k in TIMM_KEYS}
    if path.suffix.lower() == '.csv':
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(row), lineterminator='\n')
        writer.writeheader()
        writer.writerow(row)
        _write_atomic(path, buf.getvalue())
    elif path.suffix.lower() == '.json':
        _write_atomic(path, json.dumps(row, indent=2) + '\n')
    else:
        raise InputError(f'{path}: --results-file must end in .json or .csv')


def write_per_image(result: dict[str, Any], path: Path) -> None:
    """One CSV row per image: path, label, top-5 class indices (diffable across runs and machines)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(['path', 'label'] + [f'top{k}' for k in range(1, TOPK + 1)])
    for entry in result['per_image']:
        writer.writerow([entry['path'], entry['label'], *entry['top5']])
    _write_atomic(path, buf.getvalue())


def _write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    check_output_file(path, path.name)  # checked before the run too; the folder may have changed since
    try:
        write_atomic(path, text)  # with the mode open() gives any new file under the umask
    except OSError as err:  # a full disk, a folder put in its way: one line, nothing half-written
        raise InputError(f'{path.parent}: cannot write {path.name} ({err.strerror or err})') from None
