"""Pretrained tags: one row per official checkpoint family, expanded into timm pretrained cfgs."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD

from ..models.config import ALL_VARIANTS, FAMILY_VARIANTS

__all__ = [
    'HUB_ORG',
    'OFFICIAL_CKPT_ROOT',
    'TagSpec',
    'TAGS',
    'FamilyCheckpoints',
    'FAMILY_CHECKPOINTS',
    'hub_repo_id',
    'pretrained_cfg',
    'default_cfg_table',
]

HUB_ORG = 'effnet-timm'
OFFICIAL_CKPT_ROOT = 'https://storage.googleapis.com/cloud-tpu-checkpoints/efficientnet'
GENERIC_RESOLUTION = 224  # the generic `effnet_v1` (any width/depth) has no official size


@dataclass(frozen=True)
class TagSpec:
    """An official checkpoint family: which variants it has, how its inputs are normalized, where it lives."""

    description: str
    variants: tuple[str, ...]
    url_pattern: str  # `{n}` is the variant's official suffix ('b0' ... 'l2')
    official_top1: tuple[float, ...]  # tensorflow/tpu README, in `variants` order
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    input_size: int | None = None  # evaluated at another size than the variant's native one


def _bs(*indices: int) -> tuple[str, ...]:
    return tuple(f'effnet_v1_b{i}' for i in indices)


# The order matters: for each variant, the first tag that has it is its default (as in timm's
# `tf_efficientnet_*`: NoisyStudent, else AdvProp for B8, L2 at 475 px).
TAGS: dict[str, TagSpec] = {
    'ns_jft_in1k_475': TagSpec(
        'NoisyStudent + RandAugment (JFT-300M unlabeled + ImageNet-1k), evaluated at 475 px',
        ('effnet_v1_l2',),
        '/noisystudent/noisy_student_efficientnet-{n}_475.tar.gz',
        (88.2,),
        input_size=475,
    ),
    'ns_jft_in1k': TagSpec(
        'NoisyStudent + RandAugment (JFT-300M unlabeled + ImageNet-1k)',
        _bs(*range(8)) + ('effnet_v1_l2',),
        '/noisystudent/noisy_student_efficientnet-{n}.tar.gz',
        (78.8, 81.5, 82.4, 84.1, 85.3, 86.1, 86.4, 86.9, 88.4),
    ),
    'ap_in1k': TagSpec(
        'AdvProp + AutoAugment (ImageNet-1k); inputs scaled to [-1, 1]',
        _bs(*range(9)),
        '/advprop/efficientnet-{n}.tar.gz',
        (77.6, 79.6, 80.5, 81.9, 83.3, 84.3, 84.8, 85.2, 85.5),
        mean=IMAGENET_INCEPTION_MEAN,
        std=IMAGENET_INCEPTION_STD,
    ),
    'ra_in1k': TagSpec(
        'RandAugment (ImageNet-1k)', _bs(5, 7, 8), '/randaug/efficientnet-{n}-randaug.tar.gz', (83.7, 84.7, 85.4)
    ),
    'aa_in1k': TagSpec(
        'AutoAugment (ImageNet-1k)',
        _bs(*range(8)),
        '/ckptsaug/efficientnet-{n}.tar.gz',
        (77.1, 79.1, 80.1, 81.6, 82.9, 83.6, 84.0, 84.3),
    ),
    'in1k': TagSpec(
        'Baseline preprocessing (ImageNet-1k)',
        _bs(*range(6)),
        '/ckpts/efficientnet-{n}.tar.gz',
        (76.7, 78.7, 79.8, 81.1, 82.5, 83.1),
    ),
}


@dataclass(frozen=True)
class FamilyCheckpoints:
    """The official checkpoints of one other V1 family (Lite, EdgeTPU, CondConv); all are tagged `in1k`.

    Their normalisation is the official mean 127 / std 128 on 0..255 pixels, and `interpolation` is the
    resize of the official `main.py` pipeline that produced the published accuracy.
    """

    description: str
    url_pattern: str  # `{name}` is the official model name ('efficientnet-lite0', 'efficientnet-edgetpu-S')
    official_top1: dict[str, float]  # the family's README, by variant
    interpolation: str  # 'bilinear' (TF2 tf.image.resize, half-pixel centres) or 'bicubic' (TF1 kernel)
    # EdgeTPU: logit 0 of the official graph is a background class, ImageNet class k is logit k + 1.
    label_offset: int = 0


FAMILY_MEAN = (127 / 255,) * 3
FAMILY_STD = (128 / 255,) * 3
FAMILY_CHECKPOINTS: dict[str, FamilyCheckpoints] = {
    'lite': FamilyCheckpoints(
        'EfficientNet-Lite (ImageNet-1k; ReLU6, no SE, fixed stem/head)',
        '/lite/{name}.tar.gz',
        {
            'effnet_v1_lite0': 75.1,
            'effnet_v1_lite1': 76.7,
            'effnet_v1_lite2': 77.6,
            'effnet_v1_lite3': 79.8,
            'effnet_v1_lite4': 81.5,
        },
        'bilinear',
    ),
    'edgetpu': FamilyCheckpoints(
        'EfficientNet-EdgeTPU (ImageNet-1k, 1001 classes with background at 0)',
        '/{name}.tar.gz',
        {'effnet_v1_edgetpu_s': 77.23, 'effnet_v1_edgetpu_m': 78.69, 'effnet_v1_edgetpu_l': 80.62},
        'bilinear',
        label_offset=1,
    ),
    'condconv': FamilyCheckpoints(
        'EfficientNet-CondConv (ImageNet-1k; conditionally parameterized convolutions)',
        '/condconv/{name}.tar.gz',
        {'effnet_v1_condconv_b0_4e': 77.8, 'effnet_v1_condconv_b0_8e': 78.3, 'effnet_v1_condconv_b0_8e_depth': 79.5},
        'bicubic',
    ),
}
# The other families share the `in1k` tag with the B-series baseline: one row, whose per-variant URL,
# normalisation, resize and label offset come from FAMILY_CHECKPOINTS.
TAGS['in1k'] = replace(
    TAGS['in1k'],
    variants=TAGS['in1k'].variants + tuple(FAMILY_VARIANTS),
    official_top1=TAGS['in1k'].official_top1
    + tuple(FAMILY_CHECKPOINTS[s.family].official_top1[v] for v, s in FAMILY_VARIANTS.items()),
)


def family_checkpoints(variant: str) -> FamilyCheckpoints | None:
    """The Lite/EdgeTPU/CondConv family row of `variant`, or None for the B-series."""
    spec = FAMILY_VARIANTS.get(variant)
    return FAMILY_CHECKPOINTS[spec.family] if spec else None


def family_cfg(family: str) -> dict[str, Any]:
    """Pretrained-cfg entries a family's official pipeline implies (any width/depth): mean 127 / std 128,
    its eval resize, and EdgeTPU's background logit. Empty for the B-series."""
    rows = FAMILY_CHECKPOINTS.get(family)
    if rows is None:
        return {}
    cfg: dict[str, Any] = dict(mean=FAMILY_MEAN, std=FAMILY_STD, interpolation=rows.interpolation)
    if rows.label_offset:
        # timm's convention: a 1000-class model; loading drops the checkpoint's first `label_offset` logits.
        cfg.update(label_offset=rows.label_offset)
    return cfg


def hub_repo_id(variant: str, tag: str) -> str:
    return f'{HUB_ORG}/{variant}.{tag}'


def official_url(variant: str, tag: str, root: str = OFFICIAL_CKPT_ROOT) -> str:
    """The official tarball of `variant.tag` under `root` (the bucket, or a mirror laid out like it)."""
    family = family_checkpoints(variant)
    if family is not None:
        return root + family.url_pattern.format(name=ALL_VARIANTS[variant].official_name)
    return root + TAGS[tag].url_pattern.format(n=variant.rsplit('_', 1)[-1])


def crop_pct_for(size: int) -> float:
    """The published-table eval crop, size/(size+32), cut to 3 decimals so timm's `floor(size/crop_pct)`
    still gives size+32."""
    return math.floor(size / (size + 32) * 1000) / 1000


def pretrained_cfg(
    variant: str,
    tag: str | None = None,
    image_size: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A timm pretrained cfg for `variant.tag` (no tag: the architecture alone, no weights)."""
    spec = TAGS[tag] if tag else None
    native = ALL_VARIANTS[variant].resolution if variant in ALL_VARIANTS else GENERIC_RESOLUTION
    size = image_size or (spec.input_size if spec else None) or native
    cfg = dict(
        num_classes=1000,
        input_size=(3, size, size),
        pool_size=(math.ceil(size / 32),) * 2,
        crop_pct=crop_pct_for(size),
        crop_mode='center',
        interpolation='bicubic',
        mean=spec.mean if spec else IMAGENET_DEFAULT_MEAN,
        std=spec.std if spec else IMAGENET_DEFAULT_STD,
        first_conv='conv_stem',
        classifier='classifier',
        license='apache-2.0',
        paper_ids='arXiv:1905.11946',
        paper_name='EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks',
        origin_url='https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet',
    )
    if spec:
        cfg.update(hf_hub_id=hub_repo_id(variant, tag), description=spec.description)
    if variant in FAMILY_VARIANTS:
        cfg.update(family_cfg(FAMILY_VARIANTS[variant].family))
        if spec:
            cfg.update(description=FAMILY_CHECKPOINTS[FAMILY_VARIANTS[variant].family].description)
    cfg.update(overrides)
    return cfg


def default_cfg_table() -> dict[str, dict[str, Any]]:
    """`arch.tag` → cfg for every official checkpoint, in default-first order per variant."""
    table: dict[str, dict[str, Any]] = {}
    for variant in ALL_VARIANTS:
        for tag, spec in TAGS.items():
            if variant in spec.variants:
                table[f'{variant}.{tag}'] = pretrained_cfg(variant, tag)
    return table
