"""The README.md model card of a converted folder: provenance, preprocessing, verification."""
from __future__ import annotations

import json
from typing import Dict

import torch

from effnet_timm.pretrained import TAGS, hub_repo_id


def model_card(model: torch.nn.Module, metadata: Dict[str, str], result) -> str:
    arch, tag = result.architecture, result.tag
    cfg = model.pretrained_cfg
    family = TAGS[tag] if tag else None
    name = f'{arch.variant}.{tag}' if tag else arch.variant
    top1 = ''
    if family and arch.variant in family.variants:
        top1 = f'{family.official_top1[family.variants.index(arch.variant)]}'
    load_args = '' if arch.variant != 'effnet_v1' else ', ' + ', '.join(
        f'{k}={v}' for k, v in arch.model_args.items() if k != 'num_classes')
    lines = [
        '---',
        'library_name: timm',
        'license: apache-2.0',
        'pipeline_tag: image-classification',
        'tags: [image-classification, timm, effnet-timm, efficientnet]',
        'datasets: [imagenet-1k]',
        '---',
        f'# {name}',
        '',
        'EfficientNet (V1) weights converted bit-for-bit from an official tensorflow/tpu checkpoint by '
        f'effnet-timm ({metadata["converter"]}); the model computes what the official TF graph computes '
        '(TF "SAME" padding, BatchNorm eps 1e-3).',
        '',
        '## Model details',
        f'- Architecture: `{arch.variant}` (width {arch.width}, depth {arch.depth}), '
        f'{result.num_parameters:,} parameters, {arch.num_classes} classes',
        f'- Checkpoint family: {family.description if family else "not given"}'
        + (f'; official top-1 (tensorflow/tpu README): {top1} %' if top1 else ''),
        f'- Weights: {"ExponentialMovingAverage shadows (as the official eval)" if result.ema_used else "raw variables"}'
        f'; TF scope `{arch.scope}`; global_step {metadata["global_step"] or "n/a"}',
        f'- Source: `{metadata["source"]}`',
        *[f'  - `{f["name"]}` sha256 `{f["sha256"]}`' for f in result.sources],
        '',
        '## Preprocessing',
        f'- Input {cfg["input_size"][1]}×{cfg["input_size"][2]}, centre crop {cfg["crop_pct"]} '
        f'(size/(size+32), as behind the published numbers), bicubic resize',
        f'- mean {tuple(cfg["mean"])}, std {tuple(cfg["std"])} on [0, 1] inputs',
        '',
        '## Usage',
        '```python',
        'import timm, effnet_timm  # importing effnet_timm registers the architecture',
        f"model = timm.create_model('{arch.variant}', pretrained=True{load_args},",
        "                          pretrained_cfg_overlay=dict(file='model.safetensors')).eval()",
    ]
    if tag:
        lines.append(f"# or, once published: timm.create_model('hf-hub:{hub_repo_id(arch.variant, tag)}', pretrained=True)")
    lines += ['```', '', '## Verification']
    if result.verification:
        lines += ['```json', json.dumps(result.verification, indent=2), '```']
    else:
        lines.append('Not verified against TensorFlow at conversion time (run `effnet-convert ... --verify`).')
    return '\n'.join(lines) + '\n'
