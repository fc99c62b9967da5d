"""Hostile images: a file of a few hundred bytes that declares an enormous size (a decompression bomb) is refused
from its header, before anything of that size is allocated, in one line naming the file; `validate --skip-bad`
skips it like any unreadable image, and memory stays bounded whatever the input.

The bombs are real encodings with the size fields rewritten: a 16 x 16 JPEG whose SOF says 60000 x 60000 (before
the limit, simplejpeg allocated 10.8 GB for it and spent a minute decoding grey), and a PNG whose IHDR says so.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from conftest import REPO, SAMPLES
from PIL import Image, ImageFile
from timm.data import ImageNetInfo

from effnet_timm.commands.validate import TimmEvalTransform
from effnet_timm.data.preprocessing import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ENV_MAX_IMAGE_PIXELS,
    MAX_JPEG_SCANS,
    ImageTooLargeError,
    create_tf_transform,
    decode_image,
    max_image_bytes,
)
from effnet_timm.errors import InputError
from effnet_timm_cli import main

BOMB_SIDE = 60000  # 3.6 GP: 10.8 GB as RGB
CONFIG = dict(input_size=(3, 96, 96), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.75)
SYNSETS = ImageNetInfo('imagenet-1k').label_names()


def _encoded(size: tuple[int, int], fmt: str) -> bytes:
    rgb = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt)
    return buffer.getvalue()


def jpeg_declaring(width: int, height: int) -> bytes:
    """A 16 x 16 baseline JPEG whose frame header (SOF0) declares ``width`` x ``height``."""
    data = bytearray(_encoded((16, 16), 'JPEG'))
    i = 2
    while data[i + 1] != 0xC0:  # walk the marker segments to the frame header
        i += 2 + struct.unpack('>H', data[i + 2 : i + 4])[0]
    data[i + 5 : i + 9] = struct.pack('>HH', height, width)
    return bytes(data)


def png_declaring(width: int, height: int) -> bytes:
    """A 16 x 16 PNG whose IHDR declares ``width`` x ``height`` (with a valid CRC, so decoders believe it)."""
    data = bytearray(_encoded((16, 16), 'PNG'))
    chunk = bytearray(data[12:29])  # 'IHDR' + 13 bytes of header
    chunk[4:12] = struct.pack('>II', width, height)
    data[12:29] = chunk
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(chunk)))
    return bytes(data)


BOMBS = {'jpeg': jpeg_declaring(BOMB_SIDE, BOMB_SIDE), 'png': png_declaring(BOMB_SIDE, BOMB_SIDE)}


@pytest.fixture
def no_decoding(monkeypatch):
    """Any attempt to decode pixels fails the test: a refusal must come from the header alone."""

    def refuse(*args, **kwargs):
        raise AssertionError('pixels were decoded')

    monkeypatch.setattr(simplejpeg, 'decode_jpeg', refuse)
    monkeypatch.setattr(ImageFile.ImageFile, 'load', refuse)


def test_the_bombs_declare_what_they_say():
    assert simplejpeg.decode_jpeg_header(BOMBS['jpeg'])[:2] == (BOMB_SIDE, BOMB_SIDE)
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow opens up to twice its own limit
        png = png_declaring(12000, 12000)
        assert Image.open(io.BytesIO(png)).size == (12000, 12000)


@pytest.mark.parametrize(('fmt', 'decoder'), [('jpeg', 'auto'), ('jpeg', 'pillow'), ('png', 'auto')])
def test_bomb_is_refused_from_its_header(no_decoding, fmt, decoder):
    with pytest.raises(ImageTooLargeError, match=r'3,600,000,000 pixels|60000x60000 pixels') as err:
        decode_image(BOMBS[fmt], decoder)
    assert f'over the limit of {DEFAULT_MAX_IMAGE_PIXELS:,} ({ENV_MAX_IMAGE_PIXELS})' in str(err.value)
    assert '\n' not in str(err.value)


def test_bomb_between_pillows_warning_and_its_error_is_refused(no_decoding):
    # 144 MP: Pillow would only warn and decode it (over 500 MB as RGB, several GB through the pipeline).
    with pytest.raises(ImageTooLargeError, match=r'12000x12000 pixels \(144.0 MP\) is over the limit'):
        decode_image(png_declaring(12000, 12000))


def test_bomb_file_is_named(tmp_path, no_decoding):
    path = tmp_path / 'bomb.jpg'
    path.write_bytes(BOMBS['jpeg'])
    with pytest.raises(ImageTooLargeError) as err:
        create_tf_transform(CONFIG)(path)
    assert str(err.value).startswith(f'{path}: 60000x60000 pixels (3,600.0 MP) is over the limit')


def test_timm_preprocessing_refuses_the_bomb_too(no_decoding):
    transform = TimmEvalTransform(dict(CONFIG, interpolation='bicubic', crop_mode='center'))
    for data in BOMBS.values():
        with pytest.raises(ImageTooLargeError, match='is over the limit'):
            transform(data)


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_the_limit_comes_from_the_environment_and_is_inclusive(monkeypatch, fmt):
    monkeypatch.setenv(ENV_MAX_IMAGE_PIXELS, str(120 * 100))
    assert decode_image(_encoded((120, 100), fmt)).shape == (100, 120, 3)
    transform = create_tf_transform(CONFIG)  # reads the limit once: workers get the same
    assert transform.max_pixels == 12000
    with pytest.raises(ImageTooLargeError, match=r'121x100 pixels \(0.0 MP\) is over the limit of 12,000'):
        transform(_encoded((121, 100), fmt))
    with pytest.raises(ImageTooLargeError):  # a decoded PIL image handed over is held to it as well
        decode_image(Image.open(io.BytesIO(_encoded((121, 100), fmt))))


@pytest.mark.parametrize('value', ['lots', '0', '-5', '1e9'])
def test_a_bad_limit_fails_once_when_the_transform_is_made(monkeypatch, value):
    monkeypatch.setenv(ENV_MAX_IMAGE_PIXELS, value)
    with pytest.raises(InputError, match=rf"^{ENV_MAX_IMAGE_PIXELS}='{value}': expected a whole number of pixels"):
        create_tf_transform(CONFIG)


def test_a_file_larger_than_any_image_within_the_limit_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_MAX_IMAGE_PIXELS, '1000')
    assert max_image_bytes() == 8 * 1000 + 2**20
    path = tmp_path / 'huge.jpg'
    with path.open('wb') as f:  # sparse: 64 GiB that take no disk and must never be read into memory
        f.write(_encoded((16, 16), 'JPEG'))
        f.truncate(64 << 30)
    with pytest.raises(ImageTooLargeError, match=rf'^{path}: 68,719,476,736 bytes is more than an image'):
        decode_image(path)


def _progressive_jpeg() -> bytes:
    y, x = np.mgrid[0:64, 0:96]
    rgb = np.stack([x * 2, y * 3, (x + y) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, 'JPEG', progressive=True, quality=80)
    return buffer.getvalue()


def test_a_progressive_jpeg_of_too_many_scans_is_refused_before_decoding(monkeypatch):
    data = _progressive_jpeg()
    scans = data.count(b'\xff\xda')
    assert 5 <= scans <= 20  # what an encoder writes ...
    assert decode_image(data).shape == (64, 96, 3)  # ... decodes
    # ... and the same file with its last scan repeated: each repeat costs a pass over the whole image.
    last = data.rindex(b'\xff\xda')
    bomb = data[:-2] + data[last:-2] * (MAX_JPEG_SCANS + 1 - scans) + b'\xff\xd9'

    class Decoded(Exception):
        pass

    def decoded(*args, **kwargs):
        raise Decoded

    monkeypatch.setattr(simplejpeg, 'decode_jpeg', decoded)
    monkeypatch.setattr(ImageFile.ImageFile, 'load', decoded)
    for decoder in ('auto', 'pillow'):
        with pytest.raises(ImageTooLargeError, match=rf'^{MAX_JPEG_SCANS + 1} scans \(JPEG start-of-scan markers\)'):
            decode_image(bomb, decoder)
    # timm's own transform (validate --preprocessing timm) opens images through the same check.
    timm_transform = TimmEvalTransform(dict(CONFIG, interpolation='bicubic', crop_mode='center'))
    with pytest.raises(ImageTooLargeError, match=rf'^{MAX_JPEG_SCANS + 1} scans'):
        timm_transform(bomb)
    with pytest.raises(Decoded):  # at the limit it is decoded
        decode_image(data[:-2] + data[last:-2] * (MAX_JPEG_SCANS - scans) + b'\xff\xd9')


# ----------------------------------------------------------------------------- the commands


@pytest.fixture
def val_with_bomb(tmp_path) -> tuple[Path, Path]:
    """Two photos in synset folders, and the JPEG bomb beside one of them."""
    data = tmp_path / 'val'
    for i, photo in enumerate(('chelsea', 'rocket')):
        (data / SYNSETS[i]).mkdir(parents=True)
        shutil.copy(SAMPLES / f'{photo}.jpg', data / SYNSETS[i] / f'{photo}.JPEG')
    bomb = data / SYNSETS[1] / 'bomb.JPEG'
    bomb.write_bytes(BOMBS['jpeg'])
    return data, bomb


@pytest.mark.parametrize('preprocessing', ['tf', 'timm'])
def test_validate_stops_at_the_bomb_in_one_line_or_skips_it(
    capsys, tmp_path, val_with_bomb, converted_tiny, preprocessing
):
    data, bomb = val_with_bomb
    results = tmp_path / 'r.json'
    args = ['validate', str(data), '--weights', str(converted_tiny), '--workers', '0', '--no-progress']
    args += ['--preprocessing', preprocessing, '--results-file', str(results)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1, err
    assert err.startswith(f'effnet-timm: error: {bomb}: image refused: 3,600,000,000 pixels') or err.startswith(
        f'effnet-timm: error: {bomb}: image refused: 60000x60000 pixels'
    ), err
    assert not results.exists()

    assert main(args + ['--skip-bad']) == 0
    out = capsys.readouterr().out
    assert json.loads(results.read_text())['num_images'] == 2
    assert f'skipped     1 undecodable file(s), not counted:\n  {bomb}: image refused: ' in out


def test_predict_reports_the_bomb_by_name_and_classifies_the_rest(capsys, tmp_path, converted_tiny):
    bomb = tmp_path / 'bomb.png'
    bomb.write_bytes(BOMBS['png'])
    code = main(['predict', str(bomb), str(SAMPLES / 'chelsea.jpg'), '--weights', str(converted_tiny), '--json'])
    assert code == 1
    result = json.loads(capsys.readouterr().out)
    assert result['images'][0]['image'] == str(bomb)
    assert result['images'][0]['error'].startswith('image refused: 3,600,000,000 pixels (3,600.0 MP) is over')
    assert 'top' in result['images'][1]


# Run in a child whose address space is capped 1.5 GiB above what it holds after importing: an allocation of
# the declared size fails there at once (MemoryError: a traceback and exit 1) instead of slowly eating the machine.
_CAPPED = """
import resource, sys
import effnet_timm.commands.validate, effnet_convert.errors, PIL.Image, simplejpeg  # what the run imports
from effnet_timm_cli import main
PIL.Image.init()  # the format plugins, loaded on first use
with open('/proc/self/status') as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmSize:'))
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 29), vm + (3 << 29)))
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='needs Linux /proc')
def test_validate_memory_stays_bounded_under_a_capped_address_space(tmp_path, val_with_bomb, converted_tiny):
    data, bomb = val_with_bomb
    (bomb.parent / 'bomb.png').write_bytes(png_declaring(12000, 12000))  # Pillow alone would decode this one
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / 'convert')]), OMP_NUM_THREADS='1')
    env.update(MALLOC_ARENA_MAX='2')  # a fixed number of malloc arenas: the cap does not depend on the core count
    cmd = [sys.executable, '-c', _CAPPED, 'validate', str(data), '--weights', str(converted_tiny)]
    cmd += ['--workers', '1', '--no-progress', '--skip-bad', '--json']
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result['num_images'] == 2
    assert [line.split(': image refused: ')[0] for line in result['skipped']] == [
        str(bomb),
        str(bomb.parent / 'bomb.png'),
    ]
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY  # the cap was the child's alone
