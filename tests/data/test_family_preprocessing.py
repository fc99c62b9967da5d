"""Lite / EdgeTPU / CondConv eval preprocessing: mean 127 / std 128, and each family's official resize.

The official `main.py` (which produced the published accuracies) resizes Lite and EdgeTPU inputs with
`tf.compat.v1.image.resize(..., BILINEAR)` (preprocessing.py imports tensorflow.compat.v1: the legacy kernel,
no half-pixel centres) and CondConv inputs bicubically; `eval_ckpt_main.py` (the fixtures' inputs) resizes
all bicubically. Checked against the fixtures and against TensorFlow itself.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import SAMPLES, load_manifest, shared_path
from timm.data import resolve_data_config

import effnet_timm  # noqa: F401  (registers the models)
from effnet_timm.data.preprocessing import (
    create_tf_transform,
    preprocess_batch,
    resize_bilinear_tf1,
    tf_center_crop_window,
    tf_crop_padding,
)

TINY = {
    'lite': 'efficientnet-lite-tiny',
    'edgetpu': 'efficientnet-edgetpu-tiny',
    'condconv': 'efficientnet-condconv-tiny',
}
REGISTERED = {'lite': 'effnet_v1_lite0', 'edgetpu': 'effnet_v1_edgetpu_s', 'condconv': 'effnet_v1_condconv_b0_4e'}
MEAN_TOL = 0.05  # 0..255 levels, mean |diff|: simplejpeg is TF's decoder up to the crop edge columns


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def _cfg(family: str, size: int) -> dict:
    """The registered model's data config at the fixture's size."""
    cfg = resolve_data_config({}, model=timm.create_model(REGISTERED[family]))
    return dict(cfg, input_size=(3, size, size))


def _paths(manifest: dict) -> list[Path]:
    paths = [SAMPLES / Path(image['path']).name for image in manifest['images']]
    for image, path in zip(manifest['images'], paths):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == image['sha256'], path
    return paths


@pytest.mark.oracle
@pytest.mark.parametrize(
    'in_hw,out_hw',
    [
        ((261, 261), (96, 96)),
        ((350, 350), (224, 224)),
        ((37, 53), (96, 80)),
        ((96, 96), (300, 300)),
        ((5, 7), (31, 17)),
    ],
)
def test_bilinear_resize_matches_tf_compat_v1_resize(tf, in_hw, out_hw):
    x = np.random.default_rng(0).integers(0, 256, size=(2, *in_hw, 3)).astype(np.float32)
    expected = tf.compat.v1.image.resize(x, out_hw, method=tf.compat.v1.image.ResizeMethod.BILINEAR).numpy()
    got = _nhwc(resize_bilinear_tf1(torch.from_numpy(x).permute(0, 3, 1, 2), out_hw))
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-3
    # The half-pixel (TF2) kernel is another resize: this is not it.
    half_pixel = tf.image.resize(x, out_hw, method='bilinear').numpy()
    assert np.abs(got - half_pixel).max() > 0.5


def test_registered_configs_carry_each_family_preprocessing():
    for family, name in REGISTERED.items():
        cfg = resolve_data_config({}, model=timm.create_model(name))
        assert cfg['mean'] == pytest.approx((127 / 255,) * 3) and cfg['std'] == pytest.approx((128 / 255,) * 3)
        assert cfg['interpolation'] == ('bicubic' if family == 'condconv' else 'bilinear')
        assert create_tf_transform(cfg).interpolation == cfg['interpolation']
    # The other official resize is offered.
    assert create_tf_transform(cfg, interpolation='bilinear').interpolation == 'bilinear'


@pytest.mark.oracle
@pytest.mark.parametrize('family', list(TINY))
def test_fixture_inputs_reproduced_with_eval_ckpt_main_bicubic(family):
    """eval_ckpt_main's preprocessing (bicubic) and normalisation, as the fixtures' inputs were made."""
    pytest.importorskip('simplejpeg', reason='simplejpeg is the TF-exact JPEG decoder (pip install simplejpeg)')
    folder = shared_path(TINY[family])
    manifest = load_manifest(folder / 'manifest.json')
    cfg = _cfg(family, manifest['preprocessing']['image_size'])
    raw = _nhwc(preprocess_batch(_paths(manifest), cfg, 'fraction', 'simplejpeg', False, 'bicubic'))
    assert np.abs(raw - np.load(folder / 'inputs_0_255.npy')).mean() <= MEAN_TOL
    normalized = _nhwc(preprocess_batch(_paths(manifest), cfg, 'fraction', 'simplejpeg', True, 'bicubic'))
    assert np.abs(normalized - np.load(folder / 'inputs.npy')).mean() <= MEAN_TOL / 128


@pytest.mark.oracle
@pytest.mark.parametrize('family', ['lite', 'edgetpu'])
def test_main_py_bilinear_pipeline_matches_tensorflow(tf, family):
    """The default for Lite/EdgeTPU: decode_and_crop_jpeg, then tf.compat.v1.image.resize BILINEAR."""
    pytest.importorskip('simplejpeg', reason='simplejpeg is the TF-exact JPEG decoder (pip install simplejpeg)')
    manifest = load_manifest(shared_path(TINY[family], 'manifest.json'))
    size = manifest['preprocessing']['image_size']
    paths = _paths(manifest)
    padding = tf_crop_padding(size, 'fraction')
    expected = []
    for path in paths:
        data = path.read_bytes()
        height, width = tf.image.extract_jpeg_shape(data).numpy()[:2]
        top, left, side, _ = tf_center_crop_window(int(height), int(width), size, padding)
        image = tf.image.decode_and_crop_jpeg(data, [top, left, side, side], channels=3)
        resized = tf.compat.v1.image.resize([image], [size, size], method=tf.compat.v1.image.ResizeMethod.BILINEAR)
        expected.append(tf.cast(resized[0], tf.float32).numpy())
    ours = _nhwc(preprocess_batch(paths, _cfg(family, size), 'fraction', 'simplejpeg', False))  # the config's resize
    diff = np.abs(ours - np.stack(expected))
    assert diff.mean() <= MEAN_TOL
    assert (diff > 1e-3).mean() < 0.01
