"""Converter cost: seconds and peak RSS to convert B0 and a B7-sized checkpoint, with and without TensorFlow
imported in the converting process. Each measurement runs in a fresh subprocess (peak RSS is per process).

    python benchmarks/convert_bench.py [--json] [--repeats 3]

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
CHILD = r'''
import json, sys, time
import effnet_convert.converter as c   # imports torch/timm first (TF before timm crashes in some builds)
if sys.argv[3] == 'tf':
    import tensorflow
t = time.perf_counter()
c.convert(sys.argv[1], sys.argv[2], overwrite=True)
seconds = time.perf_counter() - t
hwm_kb = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print(json.dumps(dict(seconds=seconds, peak_rss_mb=hwm_kb / 1024)))
'''


def write_b7_checkpoint(folder: Path) -> Path:
    """A checkpoint with every variable the official B7 manifest lists (random values, EMA shadows too)."""
    import numpy as np
    import tensorflow as tf
    manifest = json.loads(B7_MANIFEST.read_text())
    rng = np.random.default_rng(0)
    tensors = {}
    for var in manifest['checkpoint']['variables']:
        shape = tuple(var['shape'])
        tensors[var['name']] = (np.int64(1) if var['name'] == 'global_step'
                                else rng.standard_normal(shape, dtype=np.float32) * 0.1 + 1.0)
    prefix = folder / 'model.ckpt'
    names = list(tensors)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[''] * len(names),
                      tensors=[tensors[n] for n in names])
    return prefix


def measure(source: Path, out: Path, mode: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    proc = subprocess.run([sys.executable, '-c', CHILD, str(source), str(out), mode],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--json', action='store_true', help='print the rows as JSON')
    parser.add_argument('--repeats', type=int, default=3, help='runs per row; the median is reported')
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        b7 = write_b7_checkpoint(tmp / 'b7')
        sources = [('B0 (official-format fixture)', B0 / 'model.ckpt'), ('B7-sized (random)', b7)]
        for label, source in sources:
            size_mb = sum(f.stat().st_size for f in source.parent.glob(source.name + '.*')) / 2 ** 20
            for mode in ('no-tf', 'tf'):
                runs = [measure(source, tmp / 'out', mode) for _ in range(args.repeats)]
                runs.sort(key=lambda r: r['seconds'])
                median = runs[len(runs) // 2]
                rows.append(dict(checkpoint=label, checkpoint_mb=round(size_mb, 1),
                                 tensorflow_imported=mode == 'tf', seconds=round(median['seconds'], 2),
                                 peak_rss_mb=round(max(r['peak_rss_mb'] for r in runs), 1)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f'{"checkpoint":<30} {"size MB":>8} {"TF imported":>11} {"seconds":>8} {"peak RSS MB":>12}')
    for r in rows:
        print(f'{r["checkpoint"]:<30} {r["checkpoint_mb"]:>8} {str(r["tensorflow_imported"]):>11} '
              f'{r["seconds"]:>8} {r["peak_rss_mb"]:>12}')


if __name__ == '__main__':
    main()
