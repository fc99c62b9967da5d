"""The checkpoint family (and with it mean/std) is never guessed from free text: it comes from the official location
(`.../<family folder>/<official file name>`), from the pinned sha256 of the tarball, or from --tag."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from conftest import shared_path

from effnet_convert.converter import convert
from effnet_convert.errors import CheckpointError
from effnet_timm.weights import tags
from effnet_timm.weights.tags import tag_of_official_path

CKPT_FILES = ('checkpoint', 'model.ckpt.index', 'model.ckpt.data-00000-of-00001')


@pytest.mark.parametrize(
    'path, variant, tag',
    [
        (
            'https://storage.googleapis.com/cloud-tpu-checkpoints/efficientnet/advprop/efficientnet-b0.tar.gz',
            None,
            'ap_in1k',
        ),
        ('/data/advprop_study/ckptsaug/efficientnet-b0.tar.gz', None, 'aa_in1k'),  # the case
        ('/data/advprop_study/efficientnet-b0.tar.gz', None, None),
        ('/data/ckptsaug/efficientnet-b0.tar.gz', 'effnet_v1_b1', None),  # not b1's official file
        ('/m/noisystudent/noisy_student_efficientnet-l2_475.tar.gz', None, 'ns_jft_in1k_475'),
        ('/m/randaug/efficientnet-b7-randaug.tar.gz', 'effnet_v1_b7', 'ra_in1k'),
        ('/m/noisy_student_efficientnet-b0.tar.gz', None, None),  # a file name alone is free text
        ('efficientnet-b0.tar.gz', None, None),
    ],
)
def test_tag_of_official_path(path, variant, tag):
    assert tag_of_official_path(path, variant) == tag


@pytest.fixture(scope='module')
def b0_tarball() -> bytes:
    folder = shared_path('efficientnet-b0')
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz', compresslevel=1) as tar:
        for name in CKPT_FILES:
            tar.add(folder / name, arcname=f'efficientnet-b0/{name}')
    return buffer.getvalue()


def _place(root: Path, relative: str, data: bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


@pytest.mark.oracle
def test_advprop_named_folder_holding_an_autoaugment_tarball_gets_its_official_tag(tmp_path, b0_tarball):
    source = _place(tmp_path, 'data/advprop_study/ckptsaug/efficientnet-b0.tar.gz', b0_tarball)
    result = convert(str(source), tmp_path / 'out')
    assert result.tag == 'aa_in1k'
    cfg = json.loads((tmp_path / 'out' / 'config.json').read_text())['pretrained_cfg']
    assert cfg['tag'] == 'aa_in1k' and cfg['mean'] == [0.485, 0.456, 0.406]  # not AdvProp's [-1, 1] scaling


@pytest.mark.oracle
def test_tarball_outside_the_official_layout_is_refused_without_tag(tmp_path, b0_tarball):
    source = _place(tmp_path, 'data/advprop_study/efficientnet-b0.tar.gz', b0_tarball)
    with pytest.raises(CheckpointError) as err:
        convert(str(source), tmp_path / 'out' / 'b0')
    message = str(err.value)
    assert message.startswith(str(source)) and '--tag' in message and 'ap_in1k' in message and '\n' not in message
    assert not (tmp_path / 'out').exists()  # nothing half-written
    assert convert(str(source), tmp_path / 'tagged', tag='ap_in1k').tag == 'ap_in1k'


@pytest.mark.oracle
def test_pinned_sha256_tells_the_tag_of_a_renamed_tarball(tmp_path, b0_tarball, monkeypatch):
    pins = tmp_path / 'pins.json'
    sha = hashlib.sha256(b0_tarball).hexdigest()
    pins.write_text(
        json.dumps({'tarballs': {'advprop/efficientnet-b0.tar.gz': {'sha256': sha, 'size': len(b0_tarball)}}})
    )
    monkeypatch.setattr(tags, 'PINS_FILE', pins)
    source = _place(tmp_path, 'downloads/my-copy.tar.gz', b0_tarball)
    result = convert(str(source), tmp_path / 'out')
    assert result.tag == 'ap_in1k'
    cfg = json.loads((tmp_path / 'out' / 'config.json').read_text())['pretrained_cfg']
    assert cfg['mean'] == cfg['std'] == [0.5, 0.5, 0.5]
