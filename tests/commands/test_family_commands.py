"""`predict` / `validate` / `info` with the other V1 families: EdgeTPU's background logit, each family's resize.

The expected classes are the official graph's (the EdgeTPU fixture's 1001 EMA logits: ImageNet class k is
logit k + 1), at the preprocessing the fixture was made with (eval_ckpt_main: bicubic, crop fraction 0.875).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES, load_manifest, shared_path
from timm.data import ImageNetInfo

import effnet_timm  # noqa: F401  (registers the models)
from effnet_convert.converter import convert
from effnet_timm.models.config import FAMILY_VARIANTS
from effnet_timm_cli import main

SYNSETS = ImageNetInfo('imagenet-1k').label_names()


@pytest.fixture(scope='module')
def edgetpu(tmp_path_factory) -> tuple[Path, list[str], np.ndarray]:
    """The EdgeTPU fixture converted at 96 px, its photos, and the official top-5 in ImageNet's classes."""
    fixture = shared_path('efficientnet-edgetpu-tiny')
    folder = tmp_path_factory.mktemp('edgetpu') / 'out'
    convert(str(fixture), folder, image_size=96)
    names = [image['name'] for image in load_manifest(fixture / 'manifest.json')['images']]
    official = np.argsort(-np.load(fixture / 'logits_ema.npy'), 1, kind='stable')[:, :5] - 1  # background: -1
    assert (official[:, 0] >= 0).all()
    return folder, names, official


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.oracle
def test_validate_maps_edgetpu_logits_to_imagenet_labels(capsys, tmp_path, edgetpu):
    folder, names, official = edgetpu
    for name, top5 in zip(names, official):
        (tmp_path / 'val' / SYNSETS[top5[0]]).mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLES / f'{name}.jpg', tmp_path / 'val' / SYNSETS[top5[0]] / f'{name}.JPEG')
    results, per_image = tmp_path / 'results.json', tmp_path / 'per_image.csv'
    args = ['--weights', folder, '--crop', 'fraction', '--resize', 'bicubic', '--workers', 0, '--no-progress']
    code, _, err = _cli(
        capsys, 'validate', tmp_path / 'val', *args, '--results-file', results, '--per-image', per_image
    )
    assert code == 0, err
    result = json.loads(results.read_text())
    assert (result['num_images'], result['top1'], result['top5']) == (len(names), 100.0, 100.0)
    assert result['interpolation'] == 'bicubic'
    rows = {Path(r[0]).stem: [int(c) for c in r[2:]] for r in list(csv.reader(per_image.open()))[1:]}
    assert all(rows[name] == top5.tolist() for name, top5 in zip(names, official))


@pytest.mark.oracle
def test_predict_gives_imagenet_classes_and_defaults_to_bilinear(capsys, edgetpu):
    folder, names, official = edgetpu
    photos = [SAMPLES / f'{name}.jpg' for name in names]
    code, out, err = _cli(capsys, 'predict', *photos, '--weights', folder, '--crop', 'fraction', '--json')
    assert code == 0, err
    result = json.loads(out)
    assert result['model']['num_classes'] == 1000
    assert result['preprocessing']['interpolation'] == 'bilinear'  # EdgeTPU's main.py resize
    code, out, err = _cli(
        capsys, 'predict', *photos, '--weights', folder, '--crop', 'fraction', '--resize', 'bicubic', '--json'
    )
    assert code == 0, err
    tops = [[entry['index'] for entry in image['top']] for image in json.loads(out)['images']]
    assert tops == official.tolist()


def test_info_lists_every_family_variant(info_output):
    for variant, spec in FAMILY_VARIANTS.items():
        line = next((row for row in info_output.splitlines() if row.split()[:1] == [variant]), None)
        assert line is not None, variant
        cells = line.split()
        assert str(spec.resolution) in cells and '127/128' in cells and cells[-1] == 'in1k', line
