"""Images/s of one DataLoader worker: the official TF eval preprocessing (effnet_timm) vs timm's eval transform.

    python benchmarks/bench_preprocessing.py [--varied 300 | --images DIR] [--sizes 224,300,600] [--repeats 7]
                                             [--markdown BENCHMARKS.md] [--json]

Each row is what one worker process does per image, from the encoded JPEG bytes to the normalized (3, S, S)
float32 tensor, on one thread (DataLoader workers run torch with one thread):
- `effnet_timm` : `create_tf_transform` (libjpeg-turbo fast-DCT decode via simplejpeg, TF centre crop, TF1 bicubic);
- `effnet_timm (Pillow decode)`: the same without simplejpeg (Pillow's accurate DCT);
- `effnet_timm, dense-matrix resize`: the simplejpeg pipeline with `resize_bicubic_tf1`'s dense matrix products
  (what the transform used before its banded resize; only with `--images`);
- `timm` : Pillow decode + `timm.data.create_transform` (resize shorter side with antialiased PIL bicubic, centre
  crop, to tensor, normalize), with the same crop_pct (size / (size + 32)).
Images (default `--varied 300`): 300 JPEGs made from the sample photos (the package's and ../shared's), each a
random crop (aspect 2:3 to 3:2) resized to sides between 200 and 1000 px and saved at quality 75-95, like
ImageNet-val's spread of sizes; nearly every image then has its own crop size, so the transform's per-size
resize-coefficient caches are mostly cold (ImageNet repeats its common sizes more). `--images DIR` takes your
own JPEGs instead. Each round is one pass of every pipeline over all images, interleaved; the ratio to timm is
taken per round and reported as the median with the interquartile range.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from effnet_timm.data import preprocessing as pp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import fmt_ratio, load_average, machine_header, quartiles, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / 'convert' / 'effnet_convert' / 'samples'
SHARED_PHOTOS = Path(os.environ.get('EFFNET_TIMM_SHARED') or REPO.parent / 'shared') / 'fixtures' / 'official'


def source_photos() -> list[bytes]:
    """The distinct sample photos: the package's and ../shared's official-fixture images."""
    paths = sorted(SAMPLES.glob('*.jpg')) + sorted(SHARED_PHOTOS.glob('**/images/*.jpg'))
    unique = {}
    for path in paths:
        data = path.read_bytes()
        unique.setdefault(hashlib.sha256(data).hexdigest(), data)
    return list(unique.values())


def varied_images(count: int, seed: int = 0) -> tuple[list[bytes], list[tuple[int, int]]]:
    """`count` JPEGs (bytes) of varied sizes made from the sample photos, and their (width, height)."""
    rng = random.Random(seed)
    photos = [Image.open(io.BytesIO(data)).convert('RGB') for data in source_photos()]
    images, dims = [], []
    for i in range(count):
        photo = photos[i % len(photos)]
        aspect = rng.uniform(2 / 3, 3 / 2)  # width / height
        w = rng.randint(200, 1000)
        h = min(1000, max(200, round(w / aspect)))
        # The largest crop of that aspect, shrunk at random and placed at random.
        pw, ph = photo.size
        cw, ch = (pw, round(pw * h / w)) if pw * h / w <= ph else (round(ph * w / h), ph)
        shrink = rng.uniform(0.6, 1.0)
        cw, ch = max(1, round(cw * shrink)), max(1, round(ch * shrink))
        left, top = rng.randint(0, pw - cw), rng.randint(0, ph - ch)
        img = photo.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format='JPEG', quality=rng.randint(75, 95))
        images.append(buf.getvalue())
        dims.append((w, h))
    return images, dims


def _transforms(size: int, dense: bool = True) -> dict[str, Callable[[bytes], torch.Tensor]]:
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
    if not dense:
        del rows['effnet_timm, dense-matrix resize']
    return rows


def _pass(fn: Callable[[bytes], torch.Tensor], images: list[bytes], min_s: float) -> float:
    """Images/s over whole passes through the images, at least min_s long."""
    n, start = 0, time.perf_counter()
    while True:
        for data in images:
            fn(data)
        n += len(images)
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return n / elapsed


def bench(images: list[bytes], sizes: list[int], repeats: int, min_s: float, dense: bool = True) -> list[dict]:
    results = []
    for size in sizes:
        fns = _transforms(size, dense)
        for fn in fns.values():  # warm-up: first-call allocations (and, for a small set, the caches)
            for data in images[:8]:
                fn(data)
        rounds: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for r in range(repeats):
            for i in range(len(names)):  # interleaved, the first pipeline rotating
                name = names[(i + r) % len(names)]
                rounds[name].append(_pass(fns[name], images, min_s))
        for name, rates in rounds.items():
            ratios = [a / b for a, b in zip(rates, rounds['timm'])]
            results.append(
                dict(
                    size=size,
                    pipeline=name,
                    img_s=round(statistics.median(rates), 1),
                    ratio_to_timm=round(quartiles(ratios)[1], 3),
                    ratio_quartiles=[round(q, 3) for q in quartiles(ratios)],
                    ratio_text=fmt_ratio(ratios),
                    min_img_s=round(min(rates), 1),
                    max_img_s=round(max(rates), 1),
                )
            )
    return results


GOAL = 1.5  # issue 18: the TF-exact pipeline at least 1.5x timm's PIL eval transform


def table(results: list[dict], description: str, args: argparse.Namespace, load_start: str) -> str:
    lines = [
        '## Input pipeline of `validate` (`benchmarks/bench_preprocessing.py`)',
        '',
        machine_header(f' Load average at the start: {load_start}.'),
        '',
        f'Command: `{args.command}`',
        '',
        f'{description}; one worker (1 thread), JPEG bytes to the normalized tensor; {args.repeats} interleaved '
        f'rounds, ratio to timm per round: median [interquartile range]. Goal: `effnet_timm` ≥ {GOAL}× timm.',
        '',
        '| size | pipeline | img/s (median) | vs timm | min–max img/s |',
        '|-----:|---|------:|--------:|--------------:|',
    ]
    for r in results:
        lines.append(
            f'| {r["size"]} | {r["pipeline"]} | {r["img_s"]} | {r["ratio_text"]} | {r["min_img_s"]}–{r["max_img_s"]} |'
        )
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--images', type=Path, help='a folder of JPEGs instead of the generated varied set')
    ap.add_argument('--varied', type=int, default=300, help='how many varied-size JPEGs to make (default 300)')
    ap.add_argument('--sizes', default='224,300,600', help='output sizes (default 224,300,600: B0, B3, B7)')
    ap.add_argument('--repeats', type=int, default=5, help='interleaved rounds per pipeline')
    ap.add_argument('--min-seconds', type=float, default=0.0, help='shortest pass (default: one pass)')
    ap.add_argument('--markdown', type=Path, help='write the table into this file (its bench_preprocessing section)')
    ap.add_argument('--json', action='store_true')
    args = ap.parse_args(argv)
    args.command = shlex.join(
        ['python', 'benchmarks/bench_preprocessing.py', *(sys.argv[1:] if argv is None else argv)]
    )
    torch.set_num_threads(1)
    load_start = load_average()
    if args.images is not None:
        paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in ('.jpg', '.jpeg'))
        if not paths:
            print(f'{args.images}: no JPEGs', file=sys.stderr)
            return 2
        images = [p.read_bytes() for p in paths]
        dims = [Image.open(p).size for p in paths]
        source = f'{len(images)} JPEGs from {args.images}'
    else:
        if args.varied < 1:
            ap.error('--varied must be at least 1')
        images, dims = varied_images(args.varied)
        source = f'{len(images)} varied JPEGs made from {len(source_photos())} sample photos'
    description = (
        f'{source} ({min(min(d) for d in dims)}–{max(max(d) for d in dims)} px, '
        f'{len(set(dims))} distinct sizes), simplejpeg {"yes" if pp.simplejpeg else "no"}'
    )
    results = bench(
        images, [int(s) for s in args.sizes.split(',')], args.repeats, args.min_seconds, args.images is not None
    )
    text = table(results, description, args, load_start)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(text)
    if args.markdown:
        write_section(args.markdown, 'bench_preprocessing', text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
