"""Size, cost, preprocessing and pretrained tags of the variants: the library behind `effnet-timm info`."""

from __future__ import annotations

from typing import Any

from ..weights.tags import pretrained_cfg
from .loading import known_tags, split_known_name
from .predict import mean_std_name

__all__ = ['variant_info', 'format_info']


def variant_info(name: str) -> dict[str, Any]:
    """Size, cost and preprocessing of a variant at its native size (or of ``variant.tag`` at the tag's)."""
    from ..models.complexity import count_params_and_macs  # builds models on the meta device

    arch, tag = split_known_name(name)
    cfg = pretrained_cfg(arch, tag or None)
    size = cfg['input_size'][-1]
    params, macs = count_params_and_macs(arch, size)
    tags = [tag] if tag else known_tags(arch)
    return dict(
        model=name,
        params=params,
        gmacs=macs / 1e9,
        input_size=size,
        crop_pct=cfg['crop_pct'],
        mean=list(cfg['mean']),
        std=list(cfg['std']),
        tags=[_tag_info(arch, t) for t in tags],
    )


def _tag_info(arch: str, tag: str) -> dict[str, Any]:
    cfg = pretrained_cfg(arch, tag)
    return dict(
        tag=tag,
        input_size=cfg['input_size'][-1],
        mean=list(cfg['mean']),
        std=list(cfg['std']),
        hf_hub_id=cfg['hf_hub_id'],
    )


def format_info(rows: list[dict[str, Any]]) -> str:
    header = ('model', 'params', 'GMACs', 'input', 'crop_pct', 'mean/std', 'pretrained tags (default first)')
    table = [header] + [_info_cells(row) for row in rows]
    widths = [max(len(cells[c]) for cells in table) for c in range(len(header) - 1)]
    right = {1, 2, 3}  # numbers
    lines = []
    for cells in table:
        padded = [cell.rjust(w) if c in right else cell.ljust(w) for c, (cell, w) in enumerate(zip(cells, widths))]
        lines.append('  '.join(padded + [cells[-1]]).rstrip())
    lines += [
        '',
        'GMACs: multiply-accumulates of the convolutions and classifier for one image at the input size',
        '(torch.utils.flop_counter FLOPs / 2). *: the tag has its own mean/std (AdvProp: 0.5, inputs in [-1, 1]);',
        '@N: evaluated at N px. effnet_v1 is the generic width/depth architecture, shown at B0 scale.',
    ]
    return '\n'.join(lines)


def _info_cells(row: dict[str, Any]) -> tuple[str, ...]:
    return (
        row['model'],
        f'{row["params"]:,}',
        f'{row["gmacs"]:.3f}',
        str(row['input_size']),
        f'{row["crop_pct"]:.3f}',
        mean_std_name(row['mean'], row['std']),
        ', '.join(_tag_label(t, row) for t in row['tags']) or 'none',
    )


def _tag_label(tag: dict[str, Any], row: dict[str, Any]) -> str:
    label = tag['tag']
    if (tag['mean'], tag['std']) != (row['mean'], row['std']):
        label += '*'
    if tag['input_size'] != row['input_size']:
        label += f'@{tag["input_size"]}'
    return label
