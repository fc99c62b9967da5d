"""Fill the weights cache ahead of time (`effnet-timm download`): e.g. on a login node before a job that has no
internet. Each entry comes from the official tarball (or the `EFFNET_TIMM_CKPT_ROOT` mirror); cached ones are
skipped. A failure is reported for its entry and the others still go ahead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ..errors import InputError, PretrainedWeightsError, first_line
from .cache import cache_root, cached_entry, fill_entry, official_names
from .tags import TAGS

__all__ = ['Row', 'format_rows', 'prefetch', 'select_names']


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
