"""Inference speed, training-step cost and compile time: effnet_v1 vs timm's and torchvision's EfficientNets.

    python benchmarks/bench_inference.py [--json] [--threads 1] [--repeats 8] [--inductor]
                                         [--device cpu|cuda] [--precisions fp32,bf16,fp16]

Three tables, fp32 on CPU (on CUDA, when present: fp32 plus bf16 and fp16 autocast rows, and training
memory from `torch.cuda.max_memory_allocated` instead of RSS):
1. img/s (median over interleaved runs, same input) of our `effnet_v1_bN`, timm `tf_efficientnet_bN`
   (same TF numerics), timm `efficientnet_bN` (symmetric padding: the speed ceiling) and torchvision's,
   for B0 and B3, in eager NCHW, eager channels_last, our fused mode (channels_last) and, with
   `--inductor`, torch.compile (B0). Ratios are to timm `tf_efficientnet_bN` in the same memory format;
   max |dlogit| is to our eager NCHW logits (the timm models get our weights: same state-dict keys).
2. One training step (forward + backward + SGD) in a fresh subprocess per model: step time and peak
   RSS, plus the RSS the step added over the process after set-up (imports and model are ~0.4 GB).
3. torch.compile(fullgraph=True) time at a first and a second input size (backend 'eager': Dynamo
   capture and dynamic-shape reasoning, which is where the TF padding formula costs), one subprocess
   per model with a time limit.

Threads default to 1: on a shared 2-core machine two OpenMP threads wait on each other whenever the
other core is busy, which measured 4-5x slower and far noisier than one thread.
Inductor (`--inductor`, B0 only) compiles B0 in ~2 minutes per model on such a machine, so it is opt-in.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import timm
import torch
import torchvision

import effnet_timm  # noqa: F401  (registers effnet_v1_*)
from effnet_timm.models.fusion import fuse

VARIANTS = (('b0', 8, 224), ('b3', 2, 300))  # (variant, batch, size)
TRAIN = ('b0', 8, 224)
COMPILE_SIZES = (128, 160)
COMPILE_TIMEOUT_S = 60
CHANNELS_LAST = torch.channels_last


@dataclass
class Row:
    variant: str
    model: str
    mode: str
    precision: str
    batch: int
    size: int
    times: list[float] = field(default_factory=list)
    img_s: float = 0.0
    ratio_to_timm_tf: float | None = None
    max_abs_dlogit: float | None = None
    reference_max_abs_logit: float = 0.0


def _names(variant: str) -> dict[str, str]:
    return {
        'ours': f'effnet_v1_{variant}',
        'timm_tf': f'tf_efficientnet_{variant}',
        'timm_sym': f'efficientnet_{variant}',
        'torchvision': f'torchvision efficientnet_{variant}',
    }


def _trained_like_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with non-trivial BatchNorm statistics, so logits are O(1-10) and differences show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.25, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 3 / m.in_features**0.5, generator=g)
    return model


def _models(variant: str) -> dict[str, torch.nn.Module]:
    names = _names(variant)
    ours = _trained_like_(timm.create_model(names['ours'])).eval()
    models = {'ours': ours}
    for key in ('timm_tf', 'timm_sym'):
        models[key] = timm.create_model(names[key]).eval()
        models[key].load_state_dict(ours.state_dict())
    models['torchvision'] = getattr(torchvision.models, f'efficientnet_{variant}')().eval()
    return models


def _channels_last_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to(memory_format=CHANNELS_LAST)


def _compiled(model: torch.nn.Module) -> Callable:
    return torch.compile(model, fullgraph=True)


AUTOCAST = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def bench_inference(repeats: int, inductor: bool, device: torch.device, precisions: list[str]) -> list[Row]:
    rows: list[Row] = []
    for variant, batch, size in VARIANTS:
        models = {k: m.to(device) for k, m in _models(variant).items()}
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
        x_cl = x.contiguous(memory_format=CHANNELS_LAST)
        runs: dict[tuple, tuple] = {}
        for key, model in models.items():
            runs[(key, 'eager NCHW')] = (model, x)
            runs[(key, 'eager channels_last')] = (_channels_last_copy(model), x_cl)
        runs[('ours', 'fused channels_last')] = (fuse(models['ours']).to(memory_format=CHANNELS_LAST), x_cl)
        if inductor and variant == 'b0':
            for key in ('ours', 'timm_tf', 'timm_sym'):
                runs[(key, 'compiled channels_last')] = (_compiled(runs[(key, 'eager channels_last')][0]), x_cl)
        rows += _time_interleaved(variant, batch, size, runs, repeats, device, precisions)
    return rows


def _time_interleaved(
    variant: str,
    batch: int,
    size: int,
    runs: dict[tuple, tuple],
    repeats: int,
    device: torch.device,
    precisions: list[str],
) -> list[Row]:
    names = _names(variant)
    cases = {(key, precision): run for key, run in runs.items() for precision in precisions}
    rows = {(key, p): Row(variant, names[key[0]], key[1], p, batch, size) for key, p in cases}
    outputs = {}

    def call(case: tuple) -> torch.Tensor:
        model, inp = cases[case]
        precision = case[1]
        with torch.autocast(device.type, dtype=AUTOCAST.get(precision), enabled=precision in AUTOCAST):
            return model(inp)

    with torch.inference_mode():
        for case in cases:  # warm-up (and compile), and the logits
            outputs[case] = call(case).float()
        for _ in range(repeats):
            for case in cases:
                _synchronize(device)
                start = time.perf_counter()
                call(case)
                _synchronize(device)
                rows[case].times.append(time.perf_counter() - start)
    reference = outputs[(('ours', 'eager NCHW'), precisions[0])]
    for (key, precision), row in rows.items():
        row.reference_max_abs_logit = reference.abs().max().item()
        row.img_s = batch / statistics.median(row.times)
        if key[0] != 'torchvision':  # torchvision has its own weights
            row.max_abs_dlogit = (outputs[(key, precision)] - reference).abs().max().item()
        base_mode = 'eager NCHW' if key[1] == 'eager NCHW' else 'eager channels_last'
        base = rows.get((('timm_tf', key[1]), precision)) or rows[(('timm_tf', base_mode), precision)]
        row.ratio_to_timm_tf = row.img_s / (batch / statistics.median(base.times))
    return list(rows.values())


# --- training step, one fresh process per model ------------------------------------------------------

TRAIN_CHILD = r"""
import json, re, statistics, sys, time
import torch, timm
import effnet_timm
name, batch, size, threads, option = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
device, precision = torch.device(sys.argv[6]), sys.argv[7]
autocast = torch.autocast(device.type, dtype={'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision),
                          enabled=precision != 'fp32')
STEPS = 5  # the first (allocator warm-up) is not timed
torch.set_num_threads(threads)
torch.manual_seed(0)
model = timm.create_model(name, drop_rate=0.2, drop_path_rate=0.2).train().to(device)
if option == 'checkpointing':
    model.set_grad_checkpointing()
if option == 'plain_autograd':
    model.set_memory_efficient(False)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 1000, (batch,), device=device)
scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')

def kib(key):
    return int(re.search(key + r':\s+(\d+)', open('/proc/self/status').read()).group(1)) * 1024

def memory():  # (current, peak) bytes: allocated by the CUDA caching allocator, or RSS on CPU
    if device.type == 'cuda':
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    return kib('VmRSS'), kib('VmHWM')  # per address space (ru_maxrss counts the parent's)

setup, setup_peak = memory()
if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
else:
    open('/proc/self/clear_refs', 'w').write('5')  # restart VmHWM: the peak of the steps alone
times = []
for step in range(STEPS):
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with autocast:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    times.append(time.perf_counter() - start)
steps_peak = memory()[1]
print(json.dumps(dict(step_s=statistics.median(times[1:]), process_peak=max(setup_peak, steps_peak),
                      setup_rss=setup, step_peak=steps_peak - setup)))
"""


def bench_training(threads: int, device: torch.device, precisions: list[str]) -> list[dict]:
    """On CPU each config runs under glibc's default malloc (what users get: freed heap memory stays
    resident, so RSS overstates live tensors) and with a 128 KiB mmap threshold (every tensor is its own
    mapping, returned on free: RSS follows live tensors); step time is taken from the default-malloc runs.
    On CUDA memory is the caching allocator's peak of allocated bytes, once per precision."""
    variant, batch, size = TRAIN
    names = _names(variant)
    configs = [('ours', 'default'), ('ours', 'checkpointing'), ('ours', 'plain_autograd'), ('timm_tf', 'default')]
    if device.type == 'cuda':
        memories = [(f'cuda {p}', {}, p) for p in precisions]
    else:
        memories = [('default' if p == 'fp32' else f'default {p}', {}, p) for p in precisions]
        memories.append(('mmap 128K', {'MALLOC_MMAP_THRESHOLD_': '131072'}, precisions[0]))
    rows = []
    for malloc, env, precision in memories:
        for key, option in configs:
            out = subprocess.run(
                [
                    sys.executable,
                    '-c',
                    TRAIN_CHILD,
                    names[key],
                    str(batch),
                    str(size),
                    str(threads),
                    option,
                    str(device),
                    precision,
                ],
                capture_output=True,
                text=True,
                check=True,
                env=dict(os.environ, **env),
            )
            rows.append(
                dict(
                    model=names[key],
                    option=option,
                    malloc=malloc,
                    batch=batch,
                    size=size,
                    **json.loads(out.stdout.strip().splitlines()[-1]),
                )
            )
    for r in rows:
        ref = next(t for t in rows if t['model'] == names['timm_tf'] and t['malloc'] == r['malloc'])
        r['step_ratio'] = r['step_s'] / ref['step_s']
        r['process_peak_ratio'] = r['process_peak'] / ref['process_peak']
        r['step_peak_ratio'] = r['step_peak'] / ref['step_peak']
    return rows


# --- compile time, one fresh process per model --------------------------------------------------------

COMPILE_CHILD = r"""
import json, sys, time
import torch, timm
import effnet_timm
name, sizes = sys.argv[1], [int(s) for s in sys.argv[2].split(',')]
model = timm.create_model(name).eval()
compiled = torch.compile(model, fullgraph=True, backend='eager')
for size in sizes:
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(torch.randn(1, 3, size, size))
    print(json.dumps(dict(size=size, seconds=time.perf_counter() - start)), flush=True)
"""


def bench_compile(threads: int) -> list[dict]:
    rows = []
    for key, name in list(_names('b0').items())[:3]:
        try:
            out = subprocess.run(
                [sys.executable, '-c', COMPILE_CHILD, name, ','.join(map(str, COMPILE_SIZES))],
                capture_output=True,
                text=True,
                timeout=COMPILE_TIMEOUT_S,
                env=_env_with_threads(threads),
            )
            stdout = out.stdout
        except subprocess.TimeoutExpired as err:
            stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or '')
        done = {r['size']: r['seconds'] for r in map(json.loads, stdout.strip().splitlines())}
        rows.append(dict(model=name, **{f'{s}px_s': done.get(s) for s in COMPILE_SIZES}))
    return rows


def _env_with_threads(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads))


# --- printing ---------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, missing: str = 'n/a') -> str:
    return missing if value is None else format(value, spec)


def print_tables(
    inference: list[Row], training: list[dict], compile_rows: list[dict], threads: int, device: torch.device
) -> None:
    print(
        f'torch {torch.__version__}, timm {timm.__version__}, torchvision {torchvision.__version__}, '
        f'{threads} thread(s), {device}\n'
    )
    print(
        f'{"variant":7} {"model":34} {"mode":24} {"prec":>4} {"batch":>5} {"size":>4} {"img/s":>7} '
        f'{"vs tf_":>7} {"max|dlogit|":>11}'
    )
    scales = {r.variant: r.reference_max_abs_logit for r in inference}
    print(
        'max |dlogit| is to our eager NCHW logits, whose max |logit| is '
        + ', '.join(f'{v:.1f} ({k})' for k, v in scales.items())
    )
    for r in inference:
        print(
            f'{r.variant:7} {r.model:34} {r.mode:24} {r.precision:>4} {r.batch:5d} {r.size:4d} {r.img_s:7.2f} '
            f'{_fmt(r.ratio_to_timm_tf, "7.3f")} {_fmt(r.max_abs_dlogit, "11.2e")}'
        )
    variant, batch, size = TRAIN
    print(f'\nTraining step ({variant}, batch {batch}, {size} px, forward + backward + SGD)')
    if device.type == 'cuda':
        print(
            "(process peak: max_memory_allocated, model and optimizer included; step peak: the steps' peak "
            'above the memory allocated before them)'
        )
    else:
        print(
            '(process peak: peak RSS of the whole subprocess, imports and set-up included; '
            'step peak: peak RSS of the steps above the RSS before them; step time from default malloc)'
        )
    print(
        f'{"model":24} {"option":15} {"memory":12} {"step s":>7} {"vs tf_":>7} {"process peak MB":>15} '
        f'{"vs tf_":>7} {"step peak MB":>12} {"vs tf_":>7}'
    )
    for r in training:
        step = f'{r["step_s"]:7.2f} {r["step_ratio"]:7.3f}' if 'mmap' not in r['malloc'] else f'{"-":>7} {"-":>7}'
        print(
            f'{r["model"]:24} {r["option"]:15} {r["malloc"]:12} {step} '
            f'{r["process_peak"] / 2**20:15.0f} {r["process_peak_ratio"]:7.3f} '
            f'{r["step_peak"] / 2**20:12.0f} {r["step_peak_ratio"]:7.3f}'
        )
    print(f'\ntorch.compile(fullgraph=True, backend="eager") time, batch 1 (limit {COMPILE_TIMEOUT_S} s per model)')
    print(f'{"model":24} ' + ' '.join(f'{f"{s} px s":>9}' for s in COMPILE_SIZES))
    for r in compile_rows:
        print(
            f'{r["model"]:24} '
            + ' '.join(
                f'{_fmt(r[f"{s}px_s"], "9.1f", missing=f">{COMPILE_TIMEOUT_S}s".rjust(9))}' for s in COMPILE_SIZES
            )
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--json', action='store_true', help='print one JSON document instead of tables')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=8, help='timed runs per model and mode')
    parser.add_argument('--inductor', action='store_true', help='add torch.compile (inductor) rows (slow)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument(
        '--precisions',
        help='comma-separated: fp32, and bf16 / fp16 autocast (default: fp32 on CPU, fp32,bf16,fp16 on CUDA)',
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    precisions = (args.precisions or ('fp32,bf16,fp16' if device.type == 'cuda' else 'fp32')).split(',')
    unknown = set(precisions) - {'fp32', *AUTOCAST}
    if unknown:
        parser.error(f'--precisions: unknown {sorted(unknown)}; expected fp32, bf16 or fp16')
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    inference = bench_inference(args.repeats, args.inductor, device, precisions)
    training = bench_training(args.threads, device, precisions)
    compile_rows = bench_compile(args.threads)
    if args.json:
        print(
            json.dumps(
                dict(
                    threads=args.threads,
                    device=str(device),
                    inference=[asdict(r) for r in inference],
                    training=training,
                    compile=compile_rows,
                ),
                indent=1,
            )
        )
    else:
        print_tables(inference, training, compile_rows, args.threads, device)
        print(f'\n({time.perf_counter() - start:.0f} s)')


if __name__ == '__main__':
    main()
