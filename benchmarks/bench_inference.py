"""Inference and training speed of effnet_v1 against timm's EfficientNets, measured so that noise cannot fool it.

    python benchmarks/bench_inference.py [--threads 1,2] [--rounds 12] [--train-rounds 6] [--variants b0,b3]
                                         [--markdown BENCHMARKS.md] [--json] [--inductor] [--no-training]
                                         [--device cpu|cuda] [--precisions fp32,bf16,fp16]

Every comparison is made inside one run, per round: each round runs every model once (interleaved, the
starting model rotating), and a ratio is taken within the round, so a load change on a shared machine
moves both sides of it. Ratios are reported as the median over rounds with the interquartile range in
brackets; a wide bracket means a noisy run. At 1 thread the process-CPU-time ratio is shown too (time
the process was not running does not count in it).

1. Inference, fp32 (CUDA: plus bf16/fp16 autocast): our `effnet_v1_bN` eager (NCHW, channels_last) and
   fused (channels_last), timm `tf_efficientnet_bN` (same TF numerics, the reference) and timm
   `efficientnet_bN` (symmetric padding, not TF-exact: the speed ceiling of an eager port), B0 batch 8 at
   224 px and B3 batch 2 at 300 px, all given the same weights. Ratios are to the timm model in the same
   memory format (fused: to channels_last). |Δlogit| is relative to the largest logit of our eager NCHW
   model (goal: 1e-5 eager, 1e-4 fused).
2. One training step (forward + backward + SGD, B0 batch 8 at 224, dropout and drop-path on), interleaved
   in one process: our memory-lean default, our plain-autograd mode, timm `tf_efficientnet_b0`.
3. Training memory, one fresh process per model: the peak RSS the steps add with glibc's mmap threshold at
   128 KiB (`MALLOC_MMAP_THRESHOLD_=131072`: every tensor is its own mapping, returned when freed, so RSS
   follows live tensors; under default malloc freed heap stays resident and the peak moves ±10 % between
   runs). On CUDA: `torch.cuda.max_memory_allocated` above what was allocated before the steps.

`--markdown FILE` writes the tables with the machine, versions, date and load into FILE's section of this
script (BENCHMARKS.md at the repository root). Threads: one DataLoader-less process; on a shared machine
2 threads wait on each other whenever the other core is busy, so the 2-thread rows are the noisier.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch

import effnet_timm  # noqa: F401  (registers effnet_v1_*)
from effnet_timm.models.fusion import fuse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import fmt_ratio, interleaved, load_average, machine_header, quartiles, speed_ratio, write_section  # noqa: E402

VARIANTS = {'b0': (8, 224), 'b3': (2, 300)}  # batch, size
TRAIN = ('b0', 8, 224)
CL = torch.channels_last
AUTOCAST = {'bf16': torch.bfloat16, 'fp16': torch.float16}
# (variant, our mode, reference model, reference mode, goal as a speed ratio)
GOALS = [
    ('b0', 'eager channels_last', 'tf_efficientnet', 'eager channels_last', 1.15),
    ('b0', 'eager channels_last', 'efficientnet', 'eager channels_last', 1.0),
    ('b3', 'eager channels_last', 'tf_efficientnet', 'eager channels_last', 1.15),
    ('b0', 'fused channels_last', 'tf_efficientnet', 'eager channels_last', 1.8),
    ('b3', 'fused channels_last', 'tf_efficientnet', 'eager channels_last', 1.5),
]
TRAIN_TIME_GOAL = 1.10  # our step time / tf_'s, at most
TRAIN_MEMORY_GOAL = 0.5  # our step peak / tf_'s, at most


@dataclass
class Row:
    threads: int
    variant: str
    model: str
    mode: str
    precision: str
    batch: int
    size: int
    times: list = field(default_factory=list)  # (wall, cpu) per round
    img_s: float = 0.0
    vs_tf: list = field(default_factory=list)
    vs_tf_cpu: list = field(default_factory=list)
    vs_sym: list = field(default_factory=list)
    rel_dlogit: float | None = None


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


def _cases(variant: str, device: torch.device, inductor: bool) -> tuple[dict, torch.Tensor]:
    """{(model name, mode): (module, input)} with the same weights everywhere."""
    batch, size = VARIANTS[variant]
    ours = _trained_like_(timm.create_model(f'effnet_v1_{variant}')).eval().to(device)
    models = {f'effnet_v1_{variant}': ours}
    for name in (f'tf_efficientnet_{variant}', f'efficientnet_{variant}'):
        models[name] = timm.create_model(name).eval().to(device)
        models[name].load_state_dict(ours.state_dict())
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    x_cl = x.contiguous(memory_format=CL)
    cases = {}
    for name, model in models.items():
        cases[(name, 'eager NCHW')] = (model, x)
        cases[(name, 'eager channels_last')] = (copy.deepcopy(model).to(memory_format=CL), x_cl)
    cases[(f'effnet_v1_{variant}', 'fused channels_last')] = (fuse(ours).to(memory_format=CL), x_cl)
    if inductor and variant == 'b0':
        for name in models:
            cases[(name, 'compiled channels_last')] = (torch.compile(cases[(name, 'eager channels_last')][0]), x_cl)
    return cases, x


def bench_inference(
    threads: int, variants: list[str], rounds: int, device: torch.device, precisions: list[str], inductor: bool
) -> list[Row]:
    torch.set_num_threads(threads)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    rows: list[Row] = []
    for variant in variants:
        batch, size = VARIANTS[variant]
        cases, _ = _cases(variant, device, inductor)
        runs, outputs = {}, {}
        for (name, mode), (model, inp) in cases.items():
            for precision in precisions:

                def run(model=model, inp=inp, precision=precision) -> torch.Tensor:
                    with torch.autocast(device.type, dtype=AUTOCAST.get(precision), enabled=precision in AUTOCAST):
                        return model(inp)

                runs[(name, mode, precision)] = run
        with torch.inference_mode():
            for key, run in runs.items():  # warm-up (and compile), and the logits
                run()
                outputs[key] = run().float()
            times = interleaved(runs, rounds, sync)
        reference = outputs[(f'effnet_v1_{variant}', 'eager NCHW', precisions[0])]
        scale = reference.abs().max().item()
        by_key = {}
        for (name, mode, precision), t in times.items():
            row = Row(threads, variant, name, mode, precision, batch, size, times=t)
            row.img_s = batch / statistics.median(w for w, _ in t)
            row.rel_dlogit = (outputs[(name, mode, precision)] - reference).abs().max().item() / scale
            by_key[(name, mode, precision)] = row
        for (name, mode, precision), row in by_key.items():
            ref_mode = mode if mode in ('eager NCHW', 'compiled channels_last') else 'eager channels_last'
            tf_ref = by_key[(f'tf_efficientnet_{variant}', ref_mode, precision)]
            sym_ref = by_key[(f'efficientnet_{variant}', ref_mode, precision)]
            row.vs_tf = speed_ratio(row.times, tf_ref.times)
            row.vs_tf_cpu = speed_ratio(row.times, tf_ref.times, cpu=True)
            row.vs_sym = speed_ratio(row.times, sym_ref.times)
            rows.append(row)
        del cases, runs, outputs
    return rows


# --- training step time, interleaved in one process ---------------------------------------------------


def bench_training_time(threads: int, rounds: int, device: torch.device) -> dict[str, list]:
    torch.set_num_threads(threads)
    variant, batch, size = TRAIN
    torch.manual_seed(0)
    configs = {
        f'effnet_v1_{variant} (memory-lean default)': (f'effnet_v1_{variant}', True),
        f'effnet_v1_{variant} (plain autograd)': (f'effnet_v1_{variant}', False),
        f'tf_efficientnet_{variant}': (f'tf_efficientnet_{variant}', None),
    }
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    steps = {}
    state = None
    for label, (name, lean) in configs.items():
        model = timm.create_model(name, drop_rate=0.2, drop_path_rate=0.2).train().to(device)
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        if lean is not None:
            model.set_memory_efficient(lean)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        step()  # warm-up (allocator, optimizer state)
        steps[label] = step
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    return interleaved(steps, rounds, sync)


# --- training memory, one fresh process per model -----------------------------------------------------

MEMORY_CHILD = r"""
import json, re, sys
import torch, timm
import effnet_timm
name, option, device = sys.argv[1], sys.argv[4], torch.device(sys.argv[5])
batch, size = int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
torch.manual_seed(0)
model = timm.create_model(name, drop_rate=0.2, drop_path_rate=0.2).train().to(device)
if option == 'checkpointing':
    model.set_grad_checkpointing()
if option == 'plain autograd':
    model.set_memory_efficient(False)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 1000, (batch,), device=device)

def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()

step()  # optimizer state and grads exist from here on: the steps below add only their own tensors
if device.type == 'cuda':
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
else:
    kib = lambda key: int(re.search(key + r':\s+(\d+)', open('/proc/self/status').read()).group(1)) * 1024
    before = kib('VmRSS')
    open('/proc/self/clear_refs', 'w').write('5')  # restart VmHWM
for _ in range(2):
    step()
peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else kib('VmHWM')
print(json.dumps(dict(step_peak=peak - before)))
"""


def bench_training_memory(device: torch.device) -> list[dict]:
    variant, batch, size = TRAIN
    configs = [
        (f'effnet_v1_{variant}', 'memory-lean default'),
        (f'effnet_v1_{variant}', 'checkpointing'),
        (f'effnet_v1_{variant}', 'plain autograd'),
        (f'tf_efficientnet_{variant}', 'default'),
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='131072', OMP_NUM_THREADS='1')
    rows = []
    for name, option in configs:
        out = subprocess.run(
            [sys.executable, '-c', MEMORY_CHILD, name, str(batch), str(size), option, str(device)],
            capture_output=True,
            text=True,
            env=env,
        )
        if out.returncode != 0:
            raise SystemExit(f'training-memory child for {name} ({option}) failed:\n{out.stderr[-2000:]}')
        rows.append(dict(model=name, option=option, **json.loads(out.stdout.strip().splitlines()[-1])))
    ref = rows[-1]['step_peak']
    for r in rows:
        r['ratio_to_tf'] = r['step_peak'] / ref
    return rows


# --- report -------------------------------------------------------------------------------------------


def _goal_rows(inference: list[Row], training: dict[int, dict], memory: list[dict], threads: list[int]) -> list[str]:
    lines = [
        '| goal (issue 18) | ' + ' | '.join(f'{t} thread{"s" if t > 1 else ""}' for t in threads) + ' | met |',
        '|---|' + '---:|' * len(threads) + ':---:|',
    ]
    for variant, mode, ref_model, ref_mode, goal in GOALS:
        cells, met = [], []
        for t in threads:
            row = next(
                (
                    r
                    for r in inference
                    if r.threads == t
                    and r.variant == variant
                    and r.model.startswith('effnet')
                    and r.mode == mode
                    and r.precision == 'fp32'
                ),
                None,
            )
            if row is None:
                cells.append('n/a')
                continue
            values = row.vs_tf if ref_model == 'tf_efficientnet' else row.vs_sym
            cells.append(fmt_ratio(values))
            met.append(quartiles(values)[1] >= goal)
        target = f'{ref_model}_{variant} {ref_mode}'
        verdict = 'yes' if met and all(met) else ('no' if met else 'n/a')
        lines.append(
            f'| {variant.upper()} {mode} vs `{target}` ≥ {goal:.2f}× | ' + ' | '.join(cells) + f' | {verdict} |'
        )
    if training:
        cells, met = [], []
        for t in threads:
            times = training.get(t)
            if not times:
                cells.append('n/a')
                continue
            lean = next(v for k, v in times.items() if 'memory-lean' in k)
            ref = next(v for k, v in times.items() if k.startswith('tf_'))
            ratios = [c[0] / r[0] for c, r in zip(lean, ref)]  # time ratio: lower is better
            cells.append(fmt_ratio(ratios))
            met.append(quartiles(ratios)[1] <= TRAIN_TIME_GOAL)
        verdict = 'yes' if met and all(met) else 'no'
        lines.append(
            f'| B0 training step time (memory-lean default) / `tf_efficientnet_b0` ≤ {TRAIN_TIME_GOAL:.2f}× | '
            + ' | '.join(cells)
            + f' | {verdict} |'
        )
    if memory:
        lean = next(r for r in memory if r['option'] == 'memory-lean default')
        ok = 'yes' if lean['ratio_to_tf'] <= TRAIN_MEMORY_GOAL else 'no'
        cell = f'{lean["ratio_to_tf"]:.2f}× (one process each)'
        lines.append(
            f'| B0 training step peak, live tensors / `tf_efficientnet_b0` ≤ {TRAIN_MEMORY_GOAL:.2f}× | '
            + ' | '.join([cell] + ['same'] * (len(threads) - 1))
            + f' | {ok} |'
        )
    return lines


def markdown(
    inference: list[Row], training: dict[int, dict], memory: list[dict], args: argparse.Namespace, load_start: str
) -> str:
    threads = args.threads
    out = [
        '## Inference and training (`benchmarks/bench_inference.py`)',
        '',
        machine_header(f' Load average at the start: {load_start}.'),
        '',
        f'Command: `{args.command}`',
        '',
        f'{args.rounds} interleaved rounds per thread count (training: {args.train_rounds}); each ratio is the '
        'median over rounds of the per-round ratio, with the interquartile range in brackets. Speed ratios: '
        '> 1 is faster than the reference. fp32.',
        '',
        '### Goals',
        '',
        *_goal_rows(inference, training, memory, threads),
        '',
        '### Inference',
        '',
        'Batch 8 at 224 px (B0), batch 2 at 300 px (B3). Reference for the ratios: the timm model in the same '
        'memory format (fused: channels_last). CPU-time ratio: the same per-round ratio on process CPU '
        'time. Δlogit: max |Δ| to our eager NCHW logits over their largest |logit|.',
        '',
        '| threads | model | mode | prec | img/s | vs `tf_efficientnet` | CPU-time vs `tf_` | vs `efficientnet` '
        '(symmetric) | rel. Δlogit |',
        '|---:|---|---|---|---:|---:|---:|---:|---:|',
    ]
    for r in inference:
        cpu = fmt_ratio(r.vs_tf_cpu) if r.threads == 1 else '–'
        out.append(
            f'| {r.threads} | `{r.model}` | {r.mode} | {r.precision} | {r.img_s:.1f} | {fmt_ratio(r.vs_tf)} | '
            f'{cpu} | {fmt_ratio(r.vs_sym)} | {r.rel_dlogit:.1e} |'
        )
    if training:
        variant, batch, size = TRAIN
        out += [
            '',
            f'### Training step ({variant.upper()}, batch {batch}, {size} px, forward + backward + SGD)',
            '',
            '| threads | model | step s (median) | time / `tf_efficientnet_b0` (lower is better) |',
            '|---:|---|---:|---:|',
        ]
        for t, times in training.items():
            ref = next(v for k, v in times.items() if k.startswith('tf_'))
            for label, v in times.items():
                ratios = [c[0] / r[0] for c, r in zip(v, ref)]
                out.append(f'| {t} | `{label}` | {statistics.median(w for w, _ in v):.2f} | {fmt_ratio(ratios)} |')
    if memory:
        out += [
            '',
            '### Training memory (live tensors: `MALLOC_MMAP_THRESHOLD_=131072`, one process each, 1 thread)',
            '',
            '| model | option | step peak MB | / `tf_efficientnet_b0` |',
            '|---|---|---:|---:|',
        ]
        for r in memory:
            out.append(f'| `{r["model"]}` | {r["option"]} | {r["step_peak"] / 2**20:.0f} | {r["ratio_to_tf"]:.2f}× |')
    if args.device.type != 'cuda':
        out += ['', 'CUDA rows (bf16/fp16 autocast, `max_memory_allocated`): not measured, no GPU on this machine.']
    return '\n'.join(out) + '\n'


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', default='1,2', help='comma-separated thread counts (default 1,2)')
    parser.add_argument('--rounds', type=int, default=12, help='interleaved inference rounds per thread count')
    parser.add_argument('--train-rounds', type=int, default=6, help='interleaved training-step rounds')
    parser.add_argument('--variants', default='b0,b3')
    parser.add_argument('--no-training', action='store_true', help='inference only')
    parser.add_argument('--inductor', action='store_true', help='add torch.compile (inductor) rows for B0 (slow)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--precisions', help='fp32 and/or bf16, fp16 autocast (default fp32; CUDA: all three)')
    parser.add_argument('--markdown', type=Path, help='write the tables into this file (its bench_inference section)')
    parser.add_argument('--json', action='store_true', help='print the raw results as JSON')
    args = parser.parse_args(argv)
    args.command = shlex.join(['python', 'benchmarks/bench_inference.py', *(sys.argv[1:] if argv is None else argv)])
    args.threads = [int(t) for t in args.threads.split(',')]
    args.device = torch.device(args.device)
    precisions = (args.precisions or ('fp32,bf16,fp16' if args.device.type == 'cuda' else 'fp32')).split(',')
    unknown = set(precisions) - {'fp32', *AUTOCAST}
    variants = args.variants.split(',')
    if unknown or set(variants) - set(VARIANTS):
        parser.error(f'unknown precision or variant: {sorted(unknown | (set(variants) - set(VARIANTS)))}')
    load_start = load_average()
    start = time.perf_counter()
    inference, training = [], {}
    for t in args.threads:
        inference += bench_inference(t, variants, args.rounds, args.device, precisions, args.inductor)
        if not args.no_training:
            training[t] = bench_training_time(t, args.train_rounds, args.device)
    memory = [] if args.no_training else bench_training_memory(args.device)
    text = markdown(inference, training, memory, args, load_start)
    if args.json:
        print(json.dumps(dict(inference=[asdict(r) for r in inference], training=training, memory=memory), indent=1))
    else:
        print(text)
        print(f'({time.perf_counter() - start:.0f} s)')
    if args.markdown:
        write_section(args.markdown, 'bench_inference', text)


if __name__ == '__main__':
    main()
