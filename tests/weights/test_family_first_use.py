"""First use of the Lite/EdgeTPU/CondConv tags: the official path on a loopback bucket, through the same
cache fill (download, sha256, lock, conversion, provenance) as the B-series, then `pretrained=True`.

No released weights can be fetched here, so the served tarballs hold full-size checkpoints in the official
layout (every variable name and shape of the family's manifest, with EMA shadows, beside `.tflite` files as
the Lite/EdgeTPU tarballs have) with seeded values; the loaded tensors are checked against those values
through TF->PyTorch layouts written out here. (The mapping's numerics are tested against the official graphs'
logits with the tiny fixtures in tests/convert/test_families_convert.py.)
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
from bucket_server import BucketServer
from conftest import MANIFESTS, load_manifest, save_v2, shared_path

import effnet_timm  # noqa: F401  (registers the models)
from effnet_timm.models.config import FAMILY_VARIANTS
from effnet_timm.weights.cache import cached_entry, fill_entry, official_names

SERVED = {
    'effnet_v1_lite0': '/lite/efficientnet-lite0.tar.gz',
    'effnet_v1_edgetpu_s': '/efficientnet-edgetpu-S.tar.gz',
    'effnet_v1_condconv_b0_4e': '/condconv/efficientnet-condconv-b0-4e.tar.gz',
}


def _official_format_tarball(tf, variant: str, work: Path) -> tuple[bytes, dict[str, np.ndarray]]:
    """A tarball laid out as the official one, and the EMA values it holds by variable name."""
    shared_path('manifests')
    name = FAMILY_VARIANTS[variant].official_name
    variables = load_manifest(MANIFESTS / f'{name}.json')['checkpoint']['variables']
    rng = np.random.default_rng(sum(map(ord, variant)))
    tensors: dict[str, np.ndarray] = {}
    for var in variables:
        shape = tuple(var['shape'])
        if var['name'] == 'global_step':
            tensors[var['name']] = np.array(218750, dtype=np.int64)
        elif var['name'].endswith('moving_variance'):
            tensors[var['name']] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            tensors[var['name']] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    ema = {
        n[: -len('/ExponentialMovingAverage')]: v for n, v in tensors.items() if n.endswith('ExponentialMovingAverage')
    }
    prefix = save_v2(tf, work / name / 'model.ckpt', tensors)
    (prefix.parent / 'checkpoint').write_text('model_checkpoint_path: "model.ckpt"\n')
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz', compresslevel=1) as tar:
        for file in sorted(prefix.parent.iterdir()):
            tar.add(file, arcname=f'{name}/{file.name}')
        for extra in (f'{name}-fp32.tflite', f'{name}-int8.tflite'):  # shipped beside the Lite/EdgeTPU checkpoints
            info = tarfile.TarInfo(f'{name}/{extra}')
            info.size = 64
            tar.addfile(info, io.BytesIO(b'TFL3' + bytes(60)))
    return buffer.getvalue(), ema


@pytest.fixture(scope='module')
def bucket(tf, tmp_path_factory):
    with BucketServer() as server:
        values = {}
        for variant, path in SERVED.items():
            server.files[path], values[variant] = _official_format_tarball(
                tf, variant, tmp_path_factory.mktemp(variant)
            )
        yield server, values


@pytest.mark.oracle
@pytest.mark.parametrize('variant', list(SERVED))
def test_first_use_fetches_the_official_path_converts_and_loads(bucket, variant, tmp_path, monkeypatch):
    server, values = bucket
    monkeypatch.setenv('EFFNET_TIMM_CKPT_ROOT', server.root)
    monkeypatch.setenv('EFFNET_TIMM_CACHE', str(tmp_path / 'cache'))
    seen = len(server.requests)
    entry = fill_entry(variant, 'in1k')
    assert server.requests[seen:] == [f'GET {SERVED[variant]}']
    assert cached_entry(variant, 'in1k') is not None and entry.folder == tmp_path / 'cache' / f'{variant}.in1k'
    # pretrained=True now loads from the cache: no further request.
    model = timm.create_model(f'{variant}.in1k', pretrained=True)
    assert server.requests[seen + 1 :] == []
    assert model.pretrained_cfg['file'] == str(entry.weights)
    scope, ema = FAMILY_VARIANTS[variant].official_name, values[variant]
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(state['conv_stem.weight'], ema[f'{scope}/stem/conv2d/kernel'].transpose(3, 2, 0, 1))
    # EdgeTPU: a 1000-class model, the background row of the official 1001-class head dropped.
    offset = 1 if 'edgetpu' in variant else 0
    assert model.num_classes == 1000
    np.testing.assert_array_equal(state['classifier.weight'], ema[f'{scope}/head/dense/kernel'].T[offset:])
    np.testing.assert_array_equal(state['classifier.bias'], ema[f'{scope}/head/dense/bias'][offset:])
    if 'condconv' in variant:
        # Block 8 (blocks.4.0) is the first CondConv block; its expand kernel is `cond_conv2d_1`.
        experts = ema[f'{scope}/model/blocks_8/cond_conv2d_1/condconv_kernel'].reshape(4, 1, 1, 80, 480)
        expected = experts.transpose(0, 4, 3, 1, 2).reshape(4, -1)
        np.testing.assert_array_equal(state['blocks.4.0.conv_pw.weight'], expected)
        np.testing.assert_array_equal(state['blocks.4.0.routing_fn.weight'], ema[f'{scope}/blocks_8/dense/kernel'].T)


def test_download_all_includes_every_family_checkpoint():
    names = official_names()
    assert all(f'{variant}.in1k' in names for variant in FAMILY_VARIANTS)
    assert official_names('in1k')[-len(FAMILY_VARIANTS) :] == [f'{v}.in1k' for v in FAMILY_VARIANTS]
