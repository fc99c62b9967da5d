"""The README.md model card of a converted folder: provenance, preprocessing, verification."""

from __future__ import annotations

import json

import torch

from effnet_timm.weights.tags import TAGS, hub_repo_id, official_url


def model_card(model: torch.nn.Module, metadata: dict[str, str], result) -> str:
    arch, tag = result.architecture, result.tag
    cfg = model.pretrained_cfg
    family = TAGS[tag] if tag else None
    name = f'{arch.variant}.{tag}' if tag else arch.variant
    top1 = family.official_top1[family.variants.index(arch.variant)] if family else None
    lines = [
        *_front_matter(name, tag, top1, family.description if family else None, cfg['origin_url']),
        f'# {name}',
        '',
        'EfficientNet (V1) weights converted bit-for-bit from an official tensorflow/tpu checkpoint by '
        f'effnet-timm ({metadata["converter"]}); the model computes what the official TF graph computes '
        '(TF "SAME" padding, BatchNorm eps 1e-3).',
        '',
        '## Model details',
        f'- Architecture: `{arch.variant}` (width {arch.width}, depth {arch.depth}), '
        f'{result.num_parameters:,} parameters, {arch.num_classes} classes',
        f'- Checkpoint family: {f"`{tag}`, {family.description}" if family else "not given"}'
        + (f'; official top-1 (tensorflow/tpu README): {top1} %' if top1 else ''),
        *([f'- Official checkpoint: {official_url(arch.variant, tag)}'] if tag else []),
        f'- Weights: {_weights_line(result)}; TF scope `{arch.scope}`; global_step {metadata["global_step"] or "n/a"}',
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
        *_usage(name, hub_repo_id(arch.variant, tag) if tag else None),
        '```',
        '',
        '## Verification',
    ]
    if result.verification:
        lines += ['```json', json.dumps(result.verification, indent=2), '```']
    else:
        lines.append('Not verified against TensorFlow at conversion time (run `effnet-convert ... --verify`).')
    return '\n'.join(lines) + '\n'


def _front_matter(
    name: str, tag: str | None, top1: float | None, family: str | None, official_readme: str
) -> list[str]:
    """Hub metadata; the official top-1 goes in model-index, the Hub's place for results, citing its source."""
    lines = [
        '---',
        'library_name: timm',
        'license: apache-2.0',
        'pipeline_tag: image-classification',
        f'tags: [image-classification, timm, effnet-timm, efficientnet{", " + tag if tag else ""}]',
        'datasets: [imagenet-1k]',
    ]
    if top1 is not None:
        q = json.dumps  # a JSON string is a valid YAML scalar, whatever punctuation the description has
        lines += [
            'model-index:',
            f'- name: {name}',
            '  results:',
            '  - task:',
            '      type: image-classification',
            '    dataset:',
            '      name: ImageNet-1k',
            '      type: imagenet-1k',
            '      split: validation',
            '    metrics:',
            '    - name: Top-1 accuracy',
            '      type: accuracy',
            f'      value: {top1}',
            '    source:',
            f'      name: {q(f"tensorflow/tpu EfficientNet README, {family} checkpoints")}',
            f'      url: {official_readme}',
        ]
    return lines + ['---']


def _usage(name: str, repo_id: str | None) -> list[str]:
    if repo_id:
        return [
            f"model = timm.create_model('{name}', pretrained=True).eval()  # weights from {repo_id}",
            "# the same through this repository's config.json:",
            f"# model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
            '# or from a local copy of this folder:',
            "# model = timm.create_model('local-dir:PATH/TO/FOLDER', pretrained=True).eval()",
        ]
    return [
        "model = timm.create_model('hf-hub:ORG/NAME', pretrained=True).eval()  # ORG/NAME: the repository of this card",
        '# or from a local copy of this folder:',
        "# model = timm.create_model('local-dir:PATH/TO/FOLDER', pretrained=True).eval()",
    ]


def _weights_line(result) -> str:
    if not result.ema_used:
        return 'raw variables'
    if result.raw_fallback:
        return (
            f'ExponentialMovingAverage shadows, except {len(result.raw_fallback)} variables without one '
            f'(raw values, --allow-partial-ema: {", ".join(f"`{n}`" for n in result.raw_fallback[:5])}'
            f'{" ..." if len(result.raw_fallback) > 5 else ""})'
        )
    return 'ExponentialMovingAverage shadows (as the official eval)'
