"""`pretrained=True` on first use and after: what each step of the resolver costs, measured for B0 against a loopback
bucket (tests/bucket_server.py) serving an official-format tarball packed from ../shared's official B0 checkpoint.

    python benchmarks/first_use_bench.py [--repeats 3] [--json]

Rows (each in a fresh subprocess, so imports and page cache are as a new user session has them, except that the
tarball and entry were just written): the first `create_model(..., pretrained=True)` (download, verify, convert,
cache, load), a later one (cache hit: the entry's sha256 is checked), and the peer: the same model loaded from the
same file named explicitly (`pretrained_cfg_overlay=dict(file=...)`, no resolver), plus `effnet-timm download` alone.
Imports (seconds of timm/torch, the same for every row) are not counted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests'))
B0 = REPO.parent / 'shared' / 'fixtures' / 'official' / 'efficientnet-b0'
NAME = 'effnet_v1_b0.aa_in1k'

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import timm, effnet_timm
t1 = time.perf_counter()
kwargs = dict(pretrained_cfg_overlay=dict(file=sys.argv[1])) if sys.argv[1] else {}
model = timm.create_model('effnet_v1_b0.aa_in1k', pretrained=True, **kwargs)
t2 = time.perf_counter()
print(json.dumps(dict(import_s=t1 - t0, create_s=t2 - t1)))
"""


def _tarball() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as tar:
        for name in ('checkpoint', 'model.ckpt.index', 'model.ckpt.data-00000-of-00001', 'model.ckpt.meta'):
            tar.add(B0 / name, arcname=f'efficientnet-b0/{name}')
    return buffer.getvalue()


def _child(env: dict, file: str = '') -> dict:
    proc = subprocess.run([sys.executable, '-c', CHILD, file], env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def _download(env: dict) -> float:
    """The fill time `effnet-timm download` reports (download + convert + cache; its imports not counted)."""
    proc = subprocess.run(
        [sys.executable, '-m', 'effnet_timm_cli', 'download', NAME, '--no-progress', '--json'],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout)[0]['seconds']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--json', action='store_true')
    args = parser.parse_args()
    from bucket_server import BucketServer
    from hub_server import HubServer

    data = _tarball()
    rows = {
        'first create_model (download + convert + load)': [],
        'later create_model (cache hit)': [],
        'create_model from the same file named explicitly': [],
        'effnet-timm download (its seconds column)': [],
    }
    with BucketServer() as bucket, HubServer('unused') as hub, tempfile.TemporaryDirectory() as tmp:
        bucket.files['/ckptsaug/efficientnet-b0.tar.gz'] = data
        env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'EFFNET_TIMM_'))}
        env.update(
            HF_ENDPOINT=hub.endpoint, HF_HOME=f'{tmp}/hf', EFFNET_TIMM_CKPT_ROOT=bucket.root, OMP_NUM_THREADS='1'
        )
        for i in range(args.repeats):
            env['EFFNET_TIMM_CACHE'] = f'{tmp}/cache-{i}'
            rows['first create_model (download + convert + load)'].append(_child(env)['create_s'])
            rows['later create_model (cache hit)'].append(_child(env)['create_s'])
            weights = f'{tmp}/cache-{i}/{NAME}/model.safetensors'
            rows['create_model from the same file named explicitly'].append(_child(env, weights)['create_s'])
            env['EFFNET_TIMM_CACHE'] = f'{tmp}/dl-{i}'
            rows['effnet-timm download (its seconds column)'].append(_download(env))
    medians = {k: statistics.median(v) for k, v in rows.items()}
    peer = medians['create_model from the same file named explicitly']
    if args.json:
        print(json.dumps(dict(tarball_mb=len(data) / 1e6, seconds=medians), indent=2))
        return
    print(f'B0, official-format tarball {len(data) / 1e6:.1f} MB on a loopback bucket; median of {args.repeats}')
    print(f'{"step":52s} {"seconds":>8s} {"vs explicit file":>17s}')
    for key, value in medians.items():
        print(f'{key:52s} {value:8.2f} {value / peer:16.2f}x')


if __name__ == '__main__':
    main()
