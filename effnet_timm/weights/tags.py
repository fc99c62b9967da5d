"""Pretrained tags: one row per official checkpoint family, expanded into timm pretrained cfgs."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD

from ..data.preprocessing import crop_pct_for  # the published 32 px padding, as timm's crop_pct
from ..models.config import ALL_VARIANTS, FAMILY_VARIANTS

__all__ = [
    'HUB_ORG',
    'OFFICIAL_CKPT_ROOT',
    'FAMILY_CHECKPOINTS',
    'FamilyCheckpoints',
    'PINS_FILE',
    'HubPin',
    'TagSpec',
    'TarballPin',
    'TAGS',
    'default_cfg_table',
    'hub_pin',
    'hub_repo_id',
    'official_path',
    'pretrained_cfg',
    'reload_pins',
    'tag_of_official_path',
    'tag_of_sha256',
    'tarball_pin',
    'tarball_pins',
]

HUB_ORG = 'effnet-timm'
OFFICIAL_CKPT_ROOT = 'https://storage.googleapis.com/cloud-tpu-checkpoints/efficientnet'
GENERIC_RESOLUTION = 224  # the generic `effnet_v1` (any width/depth) has no official size
PINS_FILE = Path(__file__).with_name('pins.json')  # sha256 + size of each official tarball (`--record-pins`)
_SHA256 = re.compile(r'^[0-9a-f]{64}$')
_COMMIT = re.compile(r'^[0-9a-f]{40}$')


@dataclass(frozen=True)
class HubPin:
    """A published Hub copy we can check: the repo's commit id and the sha256 of its `model.safetensors`.

    `effnet-convert push` prints the pin to add after a publish; only a pinned (variant, tag) asks the Hub."""

    revision: str  # 40-hex commit id, never a branch: a branch can move under us
    sha256: str

    def __post_init__(self) -> None:
        if not _COMMIT.match(self.revision) or not _SHA256.match(self.sha256):
            raise ValueError(
                f'HubPin({self.revision!r}, {self.sha256!r}): expected a 40-hex commit and a 64-hex sha256'
            )


@dataclass(frozen=True)
class TarballPin:
    """What an official tarball is: its sha256 and size, recorded from the real bucket."""

    sha256: str
    size: int


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
    # variant -> HubPin of its published Hub repo; optional: a row without pins is served from the official tarball
    hub_pins: Mapping[str, HubPin] = field(default_factory=dict, hash=False)


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


def official_path(variant: str, tag: str) -> str:
    """The tarball's path under the bucket root, e.g. 'ckptsaug/efficientnet-b0.tar.gz' (the pins' key);
    'lite/efficientnet-lite0.tar.gz', 'efficientnet-edgetpu-S.tar.gz' (at the root) for the other families."""
    family = family_checkpoints(variant)
    if family is not None:
        return family.url_pattern.format(name=ALL_VARIANTS[variant].official_name).lstrip('/')
    return TAGS[tag].url_pattern.format(n=variant.rsplit('_', 1)[-1]).lstrip('/')


def official_url(variant: str, tag: str, root: str = OFFICIAL_CKPT_ROOT) -> str:
    """The official tarball of `variant.tag` under `root` (the bucket, or a mirror laid out like it)."""
    return root.rstrip('/') + '/' + official_path(variant, tag)


def hub_pin(variant: str, tag: str) -> HubPin | None:
    """The pin of `variant.tag`'s published Hub repo, or None (then the Hub is not asked by default)."""
    spec = TAGS.get(tag)
    return spec.hub_pins.get(variant) if spec else None


@cache
def _pins_from(path: str) -> dict[str, TarballPin]:
    try:
        data = json.loads(Path(path).read_text(encoding='utf-8'))
    except FileNotFoundError:
        return {}
    pins = {}
    for key, value in (data.get('tarballs') or {}).items():
        sha, size = value.get('sha256'), value.get('size')
        if not (isinstance(sha, str) and _SHA256.match(sha) and isinstance(size, int) and size > 0):
            raise ValueError(f'{path}: pin of {key!r} is {value!r}, expected {{"sha256": 64 hex, "size": bytes}}')
        pins[key] = TarballPin(sha, size)
    return pins


def tarball_pins() -> dict[str, TarballPin]:
    """Official path (as `official_path`) -> TarballPin, from `pins.json` beside this module."""
    return _pins_from(str(PINS_FILE))


def reload_pins() -> None:
    """Read `pins.json` again at the next look-up (after `--record-pins` wrote it)."""
    _pins_from.cache_clear()


def tarball_pin(variant: str, tag: str) -> TarballPin | None:
    return tarball_pins().get(official_path(variant, tag))


def tag_of_official_path(path: str, variant: str | None = None) -> str | None:
    """The tag whose official tarball `path` (a URL or file path) is, judged by its last two components only
    (`<family folder>/<official file name>`, as in TAGS), or None. Free text elsewhere in the path is ignored."""
    parts = PurePosixPath(path.replace('\\', '/').split('?')[0]).parts
    if len(parts) < 2:
        return None
    found = {
        tag
        for tag, spec in TAGS.items()
        for v in spec.variants
        if (variant in (None, v)) and _path_tail(parts, official_path(v, tag)) == official_path(v, tag)
    }
    return found.pop() if len(found) == 1 else None


def _path_tail(parts: tuple[str, ...], official: str) -> str:
    # As many trailing components as the official path has (EdgeTPU's tarballs lie at the bucket root).
    return '/'.join(parts[-(official.count('/') + 1) :])


def tag_of_sha256(sha256: str, variant: str | None = None) -> str | None:
    """The tag of the official tarball whose pinned sha256 this is, or None."""
    pins = tarball_pins()
    for tag, spec in TAGS.items():
        for v in spec.variants:
            pin = pins.get(official_path(v, tag))
            if pin is not None and pin.sha256 == sha256 and variant in (None, v):
                return tag
    return None


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
