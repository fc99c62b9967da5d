"""Shared by the benchmark scripts: interleaved timing, robust ratios, machine header, BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TITLE = (
    '# Benchmarks\n\nWritten by the scripts in `benchmarks/` (`--markdown`); each script replaces its own section.\n'
)


def interleaved(cases: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], None]) -> dict[str, list]:
    """Wall and process-CPU seconds of each case, `rounds` times, all cases once per round.

    A load change on a shared machine then hits every case of a round alike, and ratios are taken per
    round; the starting case rotates so none always runs first (after another one's allocations).
    """
    names = list(cases)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            sync()
            cpu, wall = time.process_time(), time.perf_counter()
            cases[name]()
            sync()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method='inclusive')
    return q1, q2, q3


def speed_ratio(case: list[tuple[float, float]], ref: list[tuple[float, float]], cpu: bool = False) -> list[float]:
    """Per round: reference time / case time (> 1: the case is faster)."""
    k = 1 if cpu else 0
    return [r[k] / c[k] for c, r in zip(case, ref)]


def fmt_ratio(values: list[float]) -> str:
    q1, med, q3 = quartiles(values)
    return f'{med:.2f}× [{q1:.2f}–{q3:.2f}]'


def cpu_model() -> str:
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return ', '.join(f'{v:.2f}' for v in os.getloadavg())
    except OSError:
        return 'n/a'


def machine_header(extra: str = '') -> str:
    """One paragraph naming the machine, the software and the date."""
    import timm

    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'
    now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    return (
        f'Machine: {cpu_model()}, {cores} logical CPUs ({usable} usable), GPU: {cuda}. '
        f'Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}. '
        f'{now}; load average (1, 5, 15 min) at the end: {load_average()}.{extra}'
    )


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the section `name` of the markdown file at `path`, keeping the others."""
    start, end = f'<!-- {name}:start -->', f'<!-- {name}:end -->'
    block = f'{start}\n{body.rstrip()}\n{end}\n'
    text = path.read_text() if path.exists() else TITLE
    pattern = re.compile(re.escape(start) + r'.*?' + re.escape(end) + r'\n?', re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + '\n\n' + block
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    tmp.replace(path)
