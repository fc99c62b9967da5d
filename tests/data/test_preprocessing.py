"""TF-exact eval preprocessing: checked against TensorFlow itself and the official code's fixtures.

The fixtures' `inputs_0_255.npy` / `inputs.npy` were made by the official
`preprocessing.preprocess_image(is_training=False)` with the current crop fraction 0.875, so these
tests use crop='fraction'.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import FIXTURES, OFFICIAL, SAMPLES
from PIL import Image
from timm.data import resolve_data_config

from effnet_timm.data.preprocessing import (
    create_tf_transform,
    decode_image,
    normalize_0_255,
    preprocess_batch,
    resize_bicubic_tf1,
    tf_center_crop_window,
    tf_crop_padding,
)

TINY = FIXTURES / 'efficientnet-tiny'
B0 = OFFICIAL / 'efficientnet-b0'
FIXTURES = {'tiny': TINY, 'b0': B0}

NO_SIMPLEJPEG = 'simplejpeg is not installed; it is the TF-exact JPEG decoder (pip install simplejpeg)'
# Bounds on the 0..255 scale (mean absolute difference): simplejpeg is TF's decoder up to the crop
# edge columns, Pillow's accurate DCT is ~1.2 levels from TF's fast one.
MEAN_TOL_SIMPLEJPEG = 0.05
MEAN_TOL_PILLOW = 1.5


def _tf():
    return pytest.importorskip('tensorflow', reason='TensorFlow is the oracle here (pip install .[test])')


def _fixture(name: str) -> tuple[Path, dict]:
    folder = FIXTURES[name]
    if not (folder / 'manifest.json').exists():
        pytest.skip(f'{folder} is absent (../shared is not beside this checkout)')
    return folder, json.loads((folder / 'manifest.json').read_text())


def _config(manifest: dict) -> dict:
    """A timm data config for the fixture: its size, and ImageNet mean/std recovered from the
    official 0..255 constants the manifest records."""
    size = manifest['preprocessing']['image_size']
    norm = manifest['normalization']
    return dict(
        input_size=(3, size, size),
        mean=tuple(m / 255 for m in norm['mean_rgb']),
        std=tuple(s / 255 for s in norm['stddev_rgb']),
    )


def _image_paths(folder: Path, manifest: dict) -> list[Path]:
    """The photos the fixture was made from, taken from the package's samples (same bytes, checked)."""
    paths = [SAMPLES / Path(image['path']).name for image in manifest['images']]
    for image, path in zip(manifest['images'], paths):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == image['sha256'], path
    return paths


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- resize


@pytest.mark.oracle
@pytest.mark.parametrize(
    'in_hw,out_hw',
    [
        ((261, 261), (96, 96)),  # the tiny fixture's chelsea crop
        ((350, 350), (224, 224)),
        ((37, 53), (96, 80)),  # upsampling, non-square; off TF's 1/1024 coefficient grid
        ((96, 96), (300, 300)),
        ((600, 400), (57, 99)),  # strong, uneven downsampling
        ((5, 7), (31, 17)),  # tiny inputs: every tap clamps somewhere
    ],
)
def test_resize_matches_tf1_resize_bicubic(in_hw, out_hw):
    tf = _tf()
    x = np.random.default_rng(0).integers(0, 256, size=(2, *in_hw, 3)).astype(np.float32)
    expected = tf.compat.v1.image.resize_bicubic(x, out_hw).numpy()
    got = _nhwc(resize_bicubic_tf1(torch.from_numpy(x).permute(0, 3, 1, 2), out_hw))
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-3


def test_resize_output_is_not_clipped():
    # A step edge makes Keys' negative lobes overshoot; TF keeps the overshoot.
    x = torch.zeros(1, 1, 8, 8)
    x[..., 4:] = 255
    y = resize_bicubic_tf1(x, (8, 13))
    assert y.max() > 255 and y.min() < 0


# ----------------------------------------------------------------------------- crop


@pytest.mark.oracle
@pytest.mark.parametrize('name', ['tiny', 'b0'])
def test_crop_window_matches_manifest(name):
    folder, manifest = _fixture(name)
    size = manifest['preprocessing']['image_size']
    assert tf_crop_padding(size, 'fraction') == manifest['preprocessing']['crop_padding']
    padding = tf_crop_padding(size, 'fraction')
    for image, path in zip(manifest['images'], _image_paths(folder, manifest)):
        decoded = decode_image(path)
        assert tuple(decoded.shape) == (image['height'], image['width'], 3)
        window = tf_center_crop_window(image['height'], image['width'], size, padding)
        assert list(window) == image['crop_window_hw'], image['name']


@pytest.mark.parametrize('size,padding', [(96, 14), (224, 32), (300, 43), (600, 86)])
def test_fraction_convention_is_the_current_official_one(size, padding):
    # round(size * (1/0.875 - 1)), worked out by hand from the official _decode_and_center_crop.
    assert tf_crop_padding(size, 'fraction') == padding
    assert tf_crop_padding(size, 'padding32') == 32


@pytest.mark.oracle
@pytest.mark.parametrize('size', [96, 224, 300, 600])
@pytest.mark.parametrize('crop', ['padding32', 'fraction'])
def test_crop_window_matches_official_expression(size, crop):
    tf = _tf()
    padding = tf_crop_padding(size, crop)
    heights = np.arange(8, 2008, dtype=np.int32)
    widths = np.random.default_rng(size).permutation(heights)
    # The official _decode_and_center_crop, run by TF on every (h, w) pair at once.
    side = tf.cast((size / (size + padding)) * tf.cast(tf.minimum(heights, widths), tf.float32), tf.int32)
    expected = np.stack([((heights - side) + 1) // 2, ((widths - side) + 1) // 2, side, side], axis=1)
    got = np.array([tf_center_crop_window(int(h), int(w), size, padding) for h, w in zip(heights, widths)])
    np.testing.assert_array_equal(got, expected)


def test_crop_window_rejects_images_too_small_to_crop():
    with pytest.raises(ValueError, match='too small'):
        tf_center_crop_window(1, 5, 224, 32)


# ----------------------------------------------------------------------------- whole pipeline


@pytest.mark.oracle
@pytest.mark.parametrize('name', ['tiny', 'b0'])
def test_fixture_batch_matches_official_preprocessing(name):
    pytest.importorskip('simplejpeg', reason=NO_SIMPLEJPEG)
    folder, manifest = _fixture(name)
    paths, cfg = _image_paths(folder, manifest), _config(manifest)
    raw = _nhwc(preprocess_batch(paths, cfg, crop='fraction', decoder='simplejpeg', normalize=False))
    diff = np.abs(raw - np.load(folder / 'inputs_0_255.npy'))
    print(f'{name} simplejpeg 0..255: mean {diff.mean():.2e} max {diff.max():.3f}')
    assert diff.mean() <= MEAN_TOL_SIMPLEJPEG
    # Only the columns next to a chroma-subsampled crop edge may differ (see the module docstring).
    assert (diff > 1e-3).mean() < 0.01

    normalized = _nhwc(preprocess_batch(paths, cfg, crop='fraction', decoder='simplejpeg'))
    ndiff = np.abs(normalized - np.load(folder / 'inputs.npy'))
    print(f'{name} simplejpeg normalized: mean {ndiff.mean():.2e} max {ndiff.max():.3f}')
    # The same bound carried through the division by std * 255.
    assert ndiff.mean() <= MEAN_TOL_SIMPLEJPEG / 255 / min(cfg['std'])


@pytest.mark.oracle
@pytest.mark.parametrize('name', ['tiny', 'b0'])
def test_fixture_batch_with_pillow_decoder(name):
    folder, manifest = _fixture(name)
    paths, cfg = _image_paths(folder, manifest), _config(manifest)
    raw = _nhwc(preprocess_batch(paths, cfg, crop='fraction', decoder='pillow', normalize=False))
    diff = np.abs(raw - np.load(folder / 'inputs_0_255.npy'))
    print(f'{name} pillow 0..255: mean {diff.mean():.3f} max {diff.max():.3f}')
    assert diff.mean() <= MEAN_TOL_PILLOW

    normalized = _nhwc(preprocess_batch(paths, cfg, crop='fraction', decoder='pillow'))
    ndiff = np.abs(normalized - np.load(folder / 'inputs.npy'))
    assert ndiff.mean() <= MEAN_TOL_PILLOW / 255 / min(cfg['std'])


@pytest.mark.oracle
def test_decoded_arrays_and_pil_images_match_official_preprocessing():
    tf = _tf()
    folder, manifest = _fixture('tiny')
    transform = create_tf_transform(_config(manifest), crop='fraction', normalize=False)
    expected = np.load(folder / 'inputs_0_255.npy')
    for path, ref in zip(_image_paths(folder, manifest), expected):
        hwc = tf.io.decode_jpeg(path.read_bytes(), channels=3).numpy()
        for image in (hwc, torch.from_numpy(hwc).permute(2, 0, 1), Image.fromarray(hwc)):
            got = transform(image).permute(1, 2, 0).numpy()
            assert np.abs(got - ref).mean() <= MEAN_TOL_SIMPLEJPEG, type(image)


@pytest.mark.oracle
def test_timm_image_dataset_with_raw_bytes(tmp_path):
    pytest.importorskip('simplejpeg', reason=NO_SIMPLEJPEG)
    folder, manifest = _fixture('tiny')
    (tmp_path / 'photos').mkdir()
    for path in _image_paths(folder, manifest):
        (tmp_path / 'photos' / path.name).write_bytes(path.read_bytes())
    transform = create_tf_transform(_config(manifest), crop='fraction', normalize=False)
    dataset = timm.data.ImageDataset(str(tmp_path), load_bytes=True, transform=transform)
    expected = dict(zip((image['name'] for image in manifest['images']), np.load(folder / 'inputs_0_255.npy')))
    assert len(dataset) == len(expected)
    for index in range(len(dataset)):
        name = Path(dataset.filename(index)).stem
        diff = np.abs(dataset[index][0].permute(1, 2, 0).numpy() - expected[name])
        assert diff.mean() <= MEAN_TOL_SIMPLEJPEG, name


# ----------------------------------------------------------------------------- colour modes


def _photo(mode: str) -> Image.Image:
    rgb = Image.open(SAMPLES / 'coffee.jpg').convert('RGB').crop((100, 50, 260, 170))
    if mode == 'RGBA':
        image = rgb.convert('RGBA')
        image.putalpha(Image.linear_gradient('L').resize(rgb.size))
        return image
    return rgb.convert(mode)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
    return buffer.getvalue()


@pytest.mark.oracle
@pytest.mark.parametrize('mode', ['L', 'CMYK'])
def test_jpeg_colour_modes_match_tf_decode_jpeg(mode):
    tf = _tf()
    pytest.importorskip('simplejpeg', reason=NO_SIMPLEJPEG)
    data = _encode(_photo(mode), 'JPEG')
    expected = tf.io.decode_jpeg(data, channels=3).numpy()
    np.testing.assert_array_equal(decode_image(data, decoder='simplejpeg').numpy(), expected)
    # Pillow's accurate DCT lands close, with the same colour conversion.
    diff = np.abs(decode_image(data, decoder='pillow').numpy().astype(int) - expected)
    assert diff.mean() <= MEAN_TOL_PILLOW and diff.max() <= 8


def _png_cases() -> dict[str, bytes]:
    palette = _photo('RGB').convert('P', palette=Image.Palette.ADAPTIVE)
    palette.info['transparency'] = 0
    gray16 = Image.fromarray(np.random.default_rng(0).integers(0, 65536, (40, 50), dtype=np.uint16))
    return {
        'RGBA': _encode(_photo('RGBA'), 'PNG'),
        'LA': _encode(_photo('RGBA').convert('LA'), 'PNG'),
        'P+transparency': _encode(palette, 'PNG'),
        'I;16': _encode(gray16, 'PNG'),
    }


@pytest.mark.oracle
@pytest.mark.parametrize('case', ['RGBA', 'LA', 'P+transparency', 'I;16'])
def test_png_modes_match_tf_decode_png(case):
    tf = _tf()
    data = _png_cases()[case]
    expected = tf.io.decode_png(data, channels=3).numpy()
    np.testing.assert_array_equal(decode_image(data).numpy(), expected)
    np.testing.assert_array_equal(decode_image(Image.open(io.BytesIO(data))).numpy(), expected)


@pytest.mark.oracle
def test_grayscale_jpeg_gives_three_equal_channels():
    transform = create_tf_transform(_config(_fixture('tiny')[1]), normalize=False)
    out = transform(_encode(_photo('L'), 'JPEG'))
    assert out.shape == (3, 96, 96)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


# ----------------------------------------------------------------------------- timm glue


def _timm_config(name: str) -> dict:
    return resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())


def test_timm_data_config_default_is_the_published_crop():
    cfg = _timm_config('tf_efficientnet_b0.ns_jft_in1k')  # crop_pct 0.875 at 224: padding 32
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        transform = create_tf_transform(cfg)
    assert (transform.image_size, transform.crop_padding, transform.crop_pct) == (224, 32, 0.875)


def test_crop_conventions_that_disagree_with_the_config_warn():
    # timm's tf_efficientnet_b3 says crop_pct 0.904 (rounded up from 300/332), which timm's
    # floor(300 / 0.904) = 331 turns into 31 pixels of padding, not the published 32.
    cfg = _timm_config('tf_efficientnet_b3.ns_jft_in1k')
    with pytest.warns(UserWarning, match='crop_padding=31'):
        assert create_tf_transform(cfg).crop_padding == 32
    with pytest.warns(UserWarning, match='crop_pct'):
        assert create_tf_transform(cfg, crop='fraction').crop_padding == 43
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert create_tf_transform(cfg, crop='crop_pct').crop_padding == 31


@pytest.mark.parametrize('size', [224, 240, 260, 300, 380, 456, 475, 528, 600, 672, 800])
def test_three_decimal_crop_pct_maps_back_to_padding32(size):
    # effnet_timm's configs store size/(size+32) cut to 3 decimals; that must not trip the check.
    crop_pct = math.floor(size / (size + 32) * 1000) / 1000
    cfg = dict(input_size=(3, size, size), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=crop_pct)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert create_tf_transform(cfg).crop_padding == 32
    assert tf_crop_padding(size, 'crop_pct', crop_pct) == 32


def test_advprop_config_gives_official_advprop_scaling():
    cfg = _timm_config('tf_efficientnet_b0.ap_in1k')
    x = torch.arange(0, 256, dtype=torch.float32).view(1, 1, 256).expand(3, 2, 256)
    # The official AdvProp input: x * 2 / 255 - 1.
    torch.testing.assert_close(normalize_0_255(x, cfg['mean'], cfg['std']), x * 2 / 255 - 1, rtol=0, atol=1e-6)


def test_non_square_input_size_is_rejected():
    with pytest.raises(ValueError, match='square'):
        create_tf_transform(dict(input_size=(3, 224, 256), mean=(0.5,) * 3, std=(0.5,) * 3))


def test_one_crop_pct_rule_resizes_to_the_official_size_at_every_size():
    # timm resizes to floor(size / crop_pct); the official crop resizes to size + 32 (or + padding).
    from effnet_timm.data.preprocessing import crop_pct_for
    from effnet_timm.weights.tags import pretrained_cfg

    for size in range(1, 4097):
        crop_pct = crop_pct_for(size)
        assert math.floor(size / crop_pct) == size + 32, size
        assert crop_pct == round(crop_pct, 3) or size >= 900, size  # 3 decimals, as timm's tf_ configs, up to ~1000
    for size, padding in ((600, 32), (224, 32), (96, 14), (1000, 32), (2000, 286)):
        assert math.floor(size / crop_pct_for(size, padding, decimals=4)) == size + padding
    assert crop_pct_for(224) == 0.875 and crop_pct_for(600) == 0.949  # the published tables' values
    cfg = pretrained_cfg('effnet_v1_b0', 'aa_in1k', 1000)  # a conversion at --image-size 1000
    assert math.floor(1000 / cfg['crop_pct']) == 1032
