"""Fill the weights cache ahead of time (`effnet-timm download`): e.g. on a login node before a job that has no
internet. Each entry comes from the official tarball (or the `EFFNET_TIMM_CKPT_ROOT` mirror); cached ones are
skipped. A failure is reported for its entry and the others still go ahead.

Also: `--list` (every model.tag and its official URL, for whoever builds a mirror), `--verify` (hash cached entries
again, whatever their recorded stat says) and `--record-pins` (the maintainers' command that fills `pins.json`
with the sha256 and size of each official tarball, fetched from the bucket with its `X-Goog-Hash` checked).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError, PretrainedWeightsError, first_line
from ..files import write_atomic
from .cache import cache_root, cached_entry, entry_state, fill_entry, official_location, official_names
from .download import download
from .tags import PINS_FILE, TAGS, official_path, official_url, reload_pins

__all__ = ['Row', 'format_rows', 'list_official', 'prefetch', 'record_pins', 'select_names', 'verify_cached']


@dataclass
class Row:
    model: str
    tag: str
    mb: float | None = None  # of the official tarball
    sha256: str = ''  # of the official tarball
    source: str = ''  # 'cache', or the URL / path it came from now
    seconds: float = 0.0
    error: str = ''


def select_names(names: Sequence[str] = (), tag: str | None = None, all_: bool = False) -> list[tuple[str, str]]:
    """(variant, tag) pairs for MODEL[.TAG] names (`tag` for the bare ones, else their default tag), a `tag`
    alone (all its variants) or `all_` (of `tag` when given), without repeats."""
    if tag is not None and tag not in TAGS:
        raise InputError(f"unknown tag '{tag}' (known: {', '.join(TAGS)})")
    if all_:
        chosen = official_names(tag)
    elif names:
        chosen = [_full_name(name, tag) for name in names]
    elif tag is not None:
        chosen = official_names(tag)
    else:
        raise InputError('name the models (MODEL.TAG ...), a --tag, or --all')
    pairs = []
    for name in chosen:
        pair = tuple(name.split('.', 1))
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def _full_name(name: str, tag: str | None) -> str:
    variant, _, named_tag = name.partition('.')
    variants = sorted({v for spec in TAGS.values() for v in spec.variants})
    if variant not in variants:
        raise InputError(f"'{name}': not a model with official weights (known: {', '.join(variants)})")
    named_tag = named_tag or tag or next(t for t, spec in TAGS.items() if variant in spec.variants)
    if named_tag not in TAGS or variant not in TAGS[named_tag].variants:
        has = [t for t, spec in TAGS.items() if variant in spec.variants]
        raise InputError(f"'{variant}.{named_tag}': no such official checkpoint ({variant} has: {', '.join(has)})")
    return f'{variant}.{named_tag}'


def prefetch(pairs: Sequence[tuple[str, str]], progress: bool | None = None) -> list[Row]:
    """Make the cache entry of every (variant, tag) that lacks one; one Row each (with `error` on failure)."""
    rows = []
    for variant, tag in pairs:
        row = Row(variant, tag)
        try:
            entry = cached_entry(variant, tag)
            if entry is None:
                entry = fill_entry(variant, tag, progress=progress)
            row.mb = entry.tarball_bytes / 1e6
            row.sha256 = entry.tarball_sha256
            row.source = entry.source if entry.fetched_now else 'cache'
            row.seconds = entry.seconds
        except PretrainedWeightsError as err:
            row.error = first_line(err)
        rows.append(row)
    return rows


def list_official(pairs: Sequence[tuple[str, str]]) -> str:
    """'model.tag  official URL' per line: the file names a mirror must hold (bare names mean their first tag)."""
    names = [f'{v}.{t}' for v, t in pairs]
    width = max(map(len, names), default=0)
    return '\n'.join(f'{name.ljust(width)}  {official_url(*pair)}' for name, pair in zip(names, pairs))


def verify_cached(pairs: Sequence[tuple[str, str]]) -> list[Row]:
    """Hash the weights of each cached entry again (`--verify`); a missing or damaged one is a row with `error`."""
    rows = []
    for variant, tag in pairs:
        started = time.perf_counter()
        entry, why = entry_state(variant, tag, rehash=True)
        row = Row(variant, tag, seconds=time.perf_counter() - started)
        if entry is None:
            row.error = f'{variant}.{tag}: cache entry {why}'
        else:
            row.mb, row.sha256, row.source = entry.tarball_bytes / 1e6, entry.tarball_sha256, 'verified'
        rows.append(row)
    return rows


def record_pins(
    pairs: Sequence[tuple[str, str]], path: os.PathLike | None = None, progress: bool | None = None
) -> list[Row]:
    """Fetch each official tarball (from `EFFNET_TIMM_CKPT_ROOT` or the bucket), check it against the `X-Goog-Hash`
    the bucket sends (required: an unverifiable file is never pinned), and record its sha256 and size in the pins
    file (default: `pins.json` beside `tags.py`). Tarballs are not kept."""
    target = Path(path) if path else PINS_FILE
    rows, pins = [], {}
    scratch = Path(tempfile.mkdtemp(prefix='effnet-timm-pins-'))
    try:
        for variant, tag in pairs:
            row, started = Row(variant, tag), time.perf_counter()
            try:
                location = official_location(variant, tag)
                if not location.startswith(('http://', 'https://')):
                    raise PretrainedWeightsError(f'{location}: pins are recorded from the bucket (an http(s) URL)')
                got = download(location, scratch / f'{variant}.{tag}.tar.gz', progress, require_hash=True)
                got.path.unlink()
                pins[official_path(variant, tag)] = dict(sha256=got.sha256, size=got.size)
                row.mb, row.sha256, row.source = got.size / 1e6, got.sha256, location
            except PretrainedWeightsError as err:
                row.error = first_line(err)
            row.seconds = time.perf_counter() - started
            rows.append(row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if pins:
        _merge_pins(target, pins)
    return rows


def _merge_pins(target: Path, pins: dict[str, dict]) -> None:
    try:
        data = json.loads(target.read_text(encoding='utf-8'))
    except FileNotFoundError:
        data = {}
    except (OSError, ValueError) as err:
        raise InputError(f'{target}: cannot read the pins ({err})') from None
    data.setdefault('tarballs', {}).update(pins)
    data['tarballs'] = dict(sorted(data['tarballs'].items()))
    try:
        write_atomic(target, json.dumps(data, indent=2) + '\n')
    except OSError as err:
        raise InputError(f'{target}: cannot write the pins ({err.strerror or err})') from None
    reload_pins()


def format_rows(rows: Sequence[Row]) -> str:
    header = ('model', 'tag', 'MB', 'sha256', 'source', 'seconds')
    table = [header] + [
        (
            r.model,
            r.tag,
            f'{r.mb:.1f}' if r.mb is not None else '-',
            r.sha256[:12] or '-',
            r.source if not r.error else 'FAILED',
            f'{r.seconds:.1f}',
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    right = {2, 5}
    lines = [
        '  '.join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))
        ).rstrip()
        for line in table
    ]
    return '\n'.join(lines) + f'\ncache: {cache_root()}'


def rows_as_json(rows: Sequence[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
