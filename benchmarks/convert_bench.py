"""Converter cost: seconds and peak RSS to convert B0 and a B7-sized checkpoint, with and without TensorFlow
imported in the converting process, and the cost of `effnet_timm.weights.integrity.verify_folder` (size + sha256 of
model.safetensors, what a loader pays to detect damaged weights) on each converted folder. Each measurement
runs in a fresh subprocess (peak RSS is per process).

    python benchmarks/convert_bench.py [--json] [--repeats 3] [--verify-only]

Needs TensorFlow once, to write the random B7 checkpoint (and for the "TF imported" rows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
B0 = REPO.parent / 'shared' / 'fixtures' / 'official' / 'efficientnet-b0'
B7_MANIFEST = REPO.parent / 'shared' / 'fixtures' / 'official' / 'manifests' / 'efficientnet-b7.json'

# Run in the child: convert, then report wall time and this process's peak RSS.
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would include this (large) parent's pages.
CHILD = r"""
import json, sys, time
import effnet_convert.converter as c   # imports torch/timm first (TF before timm crashes in some builds)
if sys.argv[3] == 'tf':
    import tensorflow
t = time.perf_counter()
c.convert(sys.argv[1], sys.argv[2], overwrite=True)
seconds = time.perf_counter() - t
hwm_kb = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print(json.dumps(dict(seconds=seconds, peak_rss_mb=hwm_kb / 1024)))
"""


# verify_folder right after the conversion wrote the file (page cache warm, as when a loader follows a
# conversion or a download); the hashing rate is the figure that carries to other sizes.
VERIFY_CHILD = r"""
import json, sys, time
from pathlib import Path
from effnet_timm.weights.integrity import verify_folder
folder = Path(sys.argv[1])
size = (folder / 'model.safetensors').stat().st_size
verify_folder(folder)  # one untimed pass: the file is read from the page cache in every timed one
t = time.perf_counter()
verify_folder(folder)
seconds = time.perf_counter() - t
# The peer: what loading these weights costs anyway (safetensors into CPU tensors, same warm cache).
from safetensors.torch import load_file
load_file(str(folder / 'model.safetensors'))
t = time.perf_counter()
load_file(str(folder / 'model.safetensors'))
load_seconds = time.perf_counter() - t
print(json.dumps(dict(seconds=seconds, load_seconds=load_seconds, file_mb=size / 2 ** 20)))
"""


def write_b7_checkpoint(folder: Path) -> Path:
    """A checkpoint with every variable the official B7 manifest lists (random values, EMA shadows too)."""
    import numpy as np
    import tensorflow as tf

    manifest = json.loads(B7_MANIFEST.read_text())
    rng = np.random.default_rng(0)
    tensors = {}
    for var in manifest['checkpoint']['variables']:
        shape = tuple(var['shape'])
        tensors[var['name']] = (
            np.int64(1) if var['name'] == 'global_step' else rng.standard_normal(shape, dtype=np.float32) * 0.1 + 1.0
        )
    prefix = folder / 'model.ckpt'
    names = list(tensors)
    tf.raw_ops.SaveV2(
        prefix=str(prefix), tensor_names=names, shape_and_slices=[''] * len(names), tensors=[tensors[n] for n in names]
    )
    return prefix


def measure(source: Path, out: Path, mode: str) -> dict:
    return _child(CHILD, str(source), str(out), mode)


def measure_verify(folder: Path) -> dict:
    return _child(VERIFY_CHILD, str(folder))


def _child(code: str, *args: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    proc = subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(runs: list) -> dict:
    runs = sorted(runs, key=lambda r: r['seconds'])
    return runs[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--json', action='store_true', help='print the rows as JSON')
    parser.add_argument('--repeats', type=int, default=3, help='runs per row; the median is reported')
    parser.add_argument(
        '--verify-only', action='store_true', help='convert each checkpoint once and time only verify_folder'
    )
    args = parser.parse_args()
    rows, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        b7 = write_b7_checkpoint(tmp / 'b7')
        sources = [('B0 (official-format fixture)', B0 / 'model.ckpt'), ('B7-sized (random)', b7)]
        for label, source in sources:
            size_mb = sum(f.stat().st_size for f in source.parent.glob(source.name + '.*')) / 2**20
            for mode in ('no-tf',) if args.verify_only else ('no-tf', 'tf'):
                runs = [measure(source, tmp / 'out', mode) for _ in range(1 if args.verify_only else args.repeats)]
                if not args.verify_only:
                    rows.append(
                        dict(
                            checkpoint=label,
                            checkpoint_mb=round(size_mb, 1),
                            tensorflow_imported=mode == 'tf',
                            seconds=round(_median(runs)['seconds'], 2),
                            peak_rss_mb=round(max(r['peak_rss_mb'] for r in runs), 1),
                        )
                    )
            median = _median([measure_verify(tmp / 'out') for _ in range(args.repeats)])
            checks.append(
                dict(
                    checkpoint=label,
                    file_mb=round(median['file_mb'], 1),
                    seconds=round(median['seconds'], 3),
                    mb_per_s=round(median['file_mb'] / median['seconds']),
                    load_seconds=round(median['load_seconds'], 3),
                    vs_load=round(median['seconds'] / median['load_seconds'], 2),
                )
            )
    if args.json:
        print(json.dumps(dict(convert=rows, verify_folder=checks), indent=2))
        return
    if rows:
        print(f'{"checkpoint":<30} {"size MB":>8} {"TF imported":>11} {"seconds":>8} {"peak RSS MB":>12}')
        for r in rows:
            print(
                f'{r["checkpoint"]:<30} {r["checkpoint_mb"]:>8} {str(r["tensorflow_imported"]):>11} '
                f'{r["seconds"]:>8} {r["peak_rss_mb"]:>12}'
            )
        print()
    print(
        f'{"verify_folder (size + sha256)":<30} {"file MB":>8} {"seconds":>8} {"MB/s":>8} '
        f'{"load_file s":>11} {"vs load":>8}'
    )
    for c in checks:
        print(
            f'{c["checkpoint"]:<30} {c["file_mb"]:>8} {c["seconds"]:>8} {c["mb_per_s"]:>8} '
            f'{c["load_seconds"]:>11} {c["vs_load"]:>8}'
        )


if __name__ == '__main__':
    main()
