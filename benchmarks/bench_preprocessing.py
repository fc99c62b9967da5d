"""Images/s of one DataLoader worker: the official TF eval preprocessing (effnet_timm) vs timm's eval transform.

    python benchmarks/bench_preprocessing.py [--images DIR] [--sizes 224,300,600] [--repeats 7] [--json]

Each row is what one worker process does per image, from the encoded JPEG bytes to the normalized (3, S, S)
float32 tensor, on one thread (DataLoader workers run torch with one thread):
- `effnet_timm` : `create_tf_transform` (libjpeg-turbo fast-DCT decode via simplejpeg, TF centre crop, TF1 bicubic);
- `effnet_timm (Pillow decode)`: the same without simplejpeg (Pillow's accurate DCT);
- `effnet_timm, dense-matrix resize`: the simplejpeg pipeline with `resize_bicubic_tf1`'s dense matrix products
  (what the transform used before its banded resize);
- `timm` : Pillow decode + `timm.data.create_transform` (resize shorter side with antialiased PIL bicubic, centre
  crop, to tensor, normalize), with the same crop_pct (size / (size + 32)).
The three are interleaved over `--repeats` rounds on the same images; the median round is reported, and the
ratio is to timm's in the same run. Default images: the sample photos (300-640 px JPEGs, ImageNet-like sizes);
`--images DIR` takes your own (e.g. some ImageNet-val JPEGs).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from effnet_timm.data import preprocessing as pp

SAMPLES = Path(__file__).resolve().parents[1] / 'convert' / 'effnet_convert' / 'samples'


def _transforms(size: int) -> dict[str, Callable[[bytes], torch.Tensor]]:
    cfg = dict(
        input_size=(3, size, size),
        crop_pct=size / (size + 32),
        interpolation='bicubic',
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    ours = pp.create_tf_transform(cfg, crop='padding32')
    ours_pillow = pp.create_tf_transform(cfg, crop='padding32', decoder='pillow')
    timm_transform = create_transform(**cfg)

    def timm_eval(data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as img:
            return timm_transform(img.convert('RGB'))

    def ours_dense(data: bytes) -> torch.Tensor:  # the dense-matrix resize the banded one replaced
        rgb = pp.decode_image(data)
        top, left, side, _ = ours.crop_window(rgb.shape[0], rgb.shape[1])
        x = pp.resize_bicubic_tf1(rgb[top : top + side, left : left + side].permute(2, 0, 1), size)
        return pp.normalize_0_255(x, ours.mean, ours.std)

    rows = {
        'effnet_timm': ours,
        'effnet_timm (Pillow decode)': ours_pillow,
        'effnet_timm, dense-matrix resize': ours_dense,
        'timm': timm_eval,
    }
    if pp.simplejpeg is None:
        del rows['effnet_timm']  # 'auto' would be Pillow: the row would be mislabelled
    return rows


def _round(fn: Callable[[bytes], torch.Tensor], images: list[bytes], min_s: float) -> float:
    """Images/s over whole passes through the images, at least min_s long."""
    n, start = 0, time.perf_counter()
    while True:
        for data in images:
            fn(data)
        n += len(images)
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return n / elapsed


def bench(images: list[bytes], sizes: list[int], repeats: int, min_s: float) -> list[dict]:
    results = []
    for size in sizes:
        fns = _transforms(size)
        for fn in fns.values():  # warm-up: caches (resize weights), first-call allocations
            for data in images:
                fn(data)
        rounds: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():  # interleaved: load changes on a shared machine hit every row alike
                rounds[name].append(_round(fn, images, min_s))
        timm_rate = statistics.median(rounds['timm'])
        for name, rates in rounds.items():
            rate = statistics.median(rates)
            results.append(
                dict(
                    size=size,
                    pipeline=name,
                    img_s=round(rate, 1),
                    ratio_to_timm=round(rate / timm_rate, 2),
                    min_img_s=round(min(rates), 1),
                    max_img_s=round(max(rates), 1),
                )
            )
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--images', type=Path, default=SAMPLES, help='a folder of JPEGs (default: the sample photos)')
    ap.add_argument('--sizes', default='224,300,600', help='output sizes (default 224,300,600: B0, B3, B7)')
    ap.add_argument('--repeats', type=int, default=7, help='interleaved rounds per pipeline (median reported)')
    ap.add_argument('--min-seconds', type=float, default=0.5, help='shortest round')
    ap.add_argument('--json', action='store_true')
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in ('.jpg', '.jpeg'))
    if not paths:
        print(f'{args.images}: no JPEGs', file=sys.stderr)
        return 2
    images = [p.read_bytes() for p in paths]
    dims = [Image.open(p).size for p in paths]
    results = bench(images, [int(s) for s in args.sizes.split(',')], args.repeats, args.min_seconds)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f'{len(images)} JPEGs from {args.images} ({min(min(d) for d in dims)}-{max(max(d) for d in dims)} px), '
        f'1 thread, torch {torch.__version__}, simplejpeg {"yes" if pp.simplejpeg else "no"}, '
        f'{os.cpu_count()} CPUs, median of {args.repeats} interleaved rounds'
    )
    print()
    print('| size | pipeline (one worker, JPEG bytes -> normalized tensor) | img/s | vs timm | min-max img/s |')
    print('|-----:|-----------------------------------------------------|------:|--------:|--------------:|')
    for r in results:
        print(
            f'| {r["size"]} | {r["pipeline"]} | {r["img_s"]} | {r["ratio_to_timm"]:.2f} | '
            f'{r["min_img_s"]}-{r["max_img_s"]} |'
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
