"""Lite, EdgeTPU and CondConv checkpoints: detection, every official variable, and the official graphs' logits.

The tiny fixtures (../shared/fixtures/official/efficientnet-{lite,edgetpu,condconv}-tiny) were made by the
official builders of each family (width/depth 0.25 at 96 px) with their `eval_ckpt_main` logits; the
manifests list every variable of the eleven full-size checkpoints.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import MANIFESTS, load_manifest, save_v2, shared_path

import effnet_timm  # noqa: F401  (registers the models)
from effnet_convert.converter import convert
from effnet_convert.errors import CheckpointError
from effnet_convert.mapping import detect_architecture
from effnet_convert.tf_bundle import TensorBundle
from effnet_timm.models.config import FAMILY_VARIANTS

pytestmark = pytest.mark.oracle  # every test here needs TensorFlow or ../shared

TINY = {
    'lite': 'efficientnet-lite-tiny',
    'edgetpu': 'efficientnet-edgetpu-tiny',
    'condconv': 'efficientnet-condconv-tiny',
}
CKPT_FILES = ('checkpoint', 'model.ckpt.index', 'model.ckpt.data-00000-of-00001', 'model.ckpt.meta')
REL_TOL = 1e-4  # of max |logit| (the bound; measured: ~3e-6)


def _assert_reproduces(ours: np.ndarray, official: np.ndarray) -> None:
    rel = np.abs(ours - official).max() / np.abs(official).max()
    assert rel <= REL_TOL, f'max |dlogit| is {rel:.3g} of max |logit|'
    np.testing.assert_array_equal(np.argsort(-ours, 1)[:, :5], np.argsort(-official, 1)[:, :5])


def _imagenet(family: str, official: np.ndarray) -> np.ndarray:
    """The official logits in ImageNet's 1000 classes: EdgeTPU's logit 0 is a background class."""
    return official[:, 1:] if family == 'edgetpu' else official


def _logits(folder: Path, inputs: np.ndarray) -> np.ndarray:
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    with torch.inference_mode():
        return model(torch.from_numpy(inputs).permute(0, 3, 1, 2)).numpy()


def _manifest_shapes(variant: str) -> dict:
    shared_path('manifests')
    manifest = load_manifest(MANIFESTS / f'{FAMILY_VARIANTS[variant].official_name}.json')
    return {v['name']: tuple(v['shape']) for v in manifest['checkpoint']['variables']}


@pytest.mark.parametrize('variant', list(FAMILY_VARIANTS))
def test_every_official_variable_maps_exactly_once(variant):
    shapes = _manifest_shapes(variant)
    arch = detect_architecture(shapes)
    spec = FAMILY_VARIANTS[variant]
    assert (arch.variant, arch.scope, arch.family, arch.num_experts) == (
        variant,
        spec.official_name,
        spec.family,
        spec.num_experts,
    )
    slots = arch.layout()
    model_vars = {n: s for n, s in shapes.items() if not n.endswith('/ExponentialMovingAverage') and n != 'global_step'}
    assert {arch.tf_name(s): s.tf_shape for s in slots} == model_vars
    with torch.device('meta'):
        state = timm.create_model(variant, num_classes=arch.num_classes).state_dict()
    assert sorted(s.key for s in slots) == sorted(k for k in state if not k.endswith('num_batches_tracked'))
    assert all(tuple(state[s.key].shape) == _torch_shape(s) for s in slots)


def _torch_shape(slot) -> tuple:
    if slot.layout in ('condconv', 'condconv_dw'):
        return slot.tf_shape
    if slot.layout == 'conv':
        kh, kw, cin, cout = slot.tf_shape
        return (cout, cin, kh, kw)
    if slot.layout == 'depthwise':
        kh, kw, c, _ = slot.tf_shape
        return (c, 1, kh, kw)
    if slot.layout == 'dense':
        return slot.tf_shape[::-1]
    return slot.tf_shape


def test_condconv_kernels_are_matched_by_role_whatever_their_keras_numbering():
    """Under other Keras versions the CondConv layers may be numbered or scoped otherwise (no `model/`,
    a counter per block); expand/project are told apart by creation order, never by name alone."""
    shapes = _manifest_shapes('effnet_v1_condconv_b0_8e_depth')
    renamed = {}
    for name, shape in shapes.items():
        name = name.replace('/model/blocks_', '/blocks_')
        for k in range(100, -1, -1):  # a per-block counter: cond_conv2d_{3j+1} -> cond_conv2d_1 etc.
            if f'/cond_conv2d_{k}/' in name:
                name = name.replace(f'/cond_conv2d_{k}/', f'/cond_conv2d_{10 + (k % 3)}/')
                break
        renamed[name] = shape
    arch = detect_architecture(renamed)
    assert arch.variant == 'effnet_v1_condconv_b0_8e_depth'
    project = next(s for s in arch.layout() if s.key == 'blocks.4.0.conv_pwl.weight')
    assert arch.tf_name(project) == 'efficientnet-condconv-b0-8e-depth/blocks_12/cond_conv2d_12/condconv_kernel'


@pytest.mark.parametrize('family', list(TINY))
def test_tiny_family_checkpoint_reproduces_official_logits(tmp_path, family):
    fixture = shared_path(TINY[family])
    result = convert(str(fixture), tmp_path / 'out', image_size=96)
    arch = result.architecture
    assert (arch.variant, arch.family, arch.scope, result.ema_used) == ('effnet_v1', family, TINY[family], True)
    assert (arch.width, arch.depth) == (0.25, 0.25)
    inputs = np.load(fixture / 'inputs.npy')
    ours = _logits(tmp_path / 'out', inputs)
    _assert_reproduces(ours, _imagenet(family, np.load(fixture / 'logits_ema.npy')))
    # The raw variables give the other official logits: the EMA shadows were the ones read.
    assert np.abs(ours - _imagenet(family, np.load(fixture / 'logits_raw.npy'))).max() > 1e-2
    raw = convert(str(fixture), tmp_path / 'raw', ema=False, image_size=96)
    assert not raw.ema_used
    _assert_reproduces(_logits(tmp_path / 'raw', inputs), _imagenet(family, np.load(fixture / 'logits_raw.npy')))
    model = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True)
    assert model.num_classes == 1000
    assert model.pretrained_cfg['mean'] == pytest.approx((127 / 255,) * 3)
    assert model.pretrained_cfg['std'] == pytest.approx((128 / 255,) * 3)
    assert model.pretrained_cfg['interpolation'] == ('bicubic' if family == 'condconv' else 'bilinear')
    assert model.pretrained_cfg.get('label_offset', 0) == (1 if family == 'edgetpu' else 0)


def _pack(fixture: Path, tarball: Path, folder: str, extra: dict[str, bytes]) -> Path:
    with tarfile.open(tarball, 'w:gz') as tar:
        for name in CKPT_FILES:
            tar.add(fixture / name, f'{folder}/{name}')
        for name, data in extra.items():
            info = tarfile.TarInfo(f'{folder}/{name}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tarball


def test_tarball_with_tflite_files_converts(tmp_path):
    """The Lite and EdgeTPU tarballs also ship .tflite models beside the checkpoint: they are skipped."""
    fixture = shared_path(TINY['lite'])
    tflite = {
        'efficientnet-lite-tiny-fp32.tflite': b'TFL3' + bytes(4096),
        'efficientnet-lite-tiny-int8.tflite': b'TFL3',
    }
    tarball = _pack(fixture, tmp_path / 'efficientnet-lite-tiny.tar.gz', 'efficientnet-lite-tiny', tflite)
    result = convert(str(tarball), tmp_path / 'out', image_size=96)
    assert result.architecture.family == 'lite'
    _assert_reproduces(_logits(tmp_path / 'out', np.load(fixture / 'inputs.npy')), np.load(fixture / 'logits_ema.npy'))


def test_old_edgetpu_scope_name_converts(tmp_path, tf):
    """Early EdgeTPU checkpoints use the scope `edgetpunet-S` (tensorflow/tpu#460): any one scope is taken."""
    fixture = shared_path(TINY['edgetpu'])
    with TensorBundle(fixture / 'model.ckpt') as bundle:
        tensors = {n.replace('efficientnet-edgetpu-tiny/', 'edgetpunet-S/'): bundle.get(n) for n in bundle.keys()}
    save_v2(tf, tmp_path / 'ckpt' / 'model.ckpt', tensors)
    result = convert(str(tmp_path / 'ckpt' / 'model.ckpt'), tmp_path / 'out', image_size=96)
    assert (result.architecture.scope, result.architecture.family) == ('edgetpunet-S', 'edgetpu')
    official = np.load(fixture / 'logits_ema.npy')[:, 1:]
    _assert_reproduces(_logits(tmp_path / 'out', np.load(fixture / 'inputs.npy')), official)


def test_condconv_kernel_of_wrong_shape_is_named(tmp_path, tf):
    fixture = shared_path(TINY['condconv'])
    name = 'efficientnet-condconv-tiny/model/blocks_4/cond_conv2d_2/condconv_kernel'
    with TensorBundle(fixture / 'model.ckpt') as bundle:
        tensors = {n: bundle.get(n) for n in bundle.keys()}
    for key in (name, name + '/ExponentialMovingAverage'):
        tensors[key] = tensors[key][:, :-32]  # one expert row cut short
    save_v2(tf, tmp_path / 'ckpt' / 'model.ckpt', tensors)
    with pytest.raises(CheckpointError, match=r"tensor '.*cond_conv2d_2/condconv_kernel' has shape \(4, 4576\)"):
        convert(str(tmp_path / 'ckpt' / 'model.ckpt'), tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_variant_claim_must_match_family(tmp_path):
    fixture = shared_path(TINY['lite'])
    with pytest.raises(CheckpointError, match='--variant effnet_v1_lite0 disagrees'):
        convert(str(fixture), tmp_path / 'out', variant='effnet_v1_lite0')
    shutil.rmtree(tmp_path / 'out', ignore_errors=True)


def test_verify_is_refused_in_one_line_for_the_families(tmp_path):
    """--verify rebuilds the B-series graph in TensorFlow; for the other families it says so and writes nothing."""
    pytest.importorskip('tensorflow', reason='--verify needs TensorFlow (pip install .[test])')
    fixture = shared_path(TINY['condconv'])
    with pytest.raises(CheckpointError, match='--verify: .* condconv checkpoints') as err:
        convert(str(fixture), tmp_path / 'out', verify=True)
    assert '\n' not in str(err.value)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('family', ['edgetpu', 'condconv'])
def test_bare_safetensors_file_keeps_its_family(tmp_path, family):
    """`--weights model.safetensors` without its config.json: the family, experts and preprocessing recorded in
    the file's metadata build the same model as the folder does (EdgeTPU: the background logit dropped)."""
    from effnet_timm.commands.loading import load_model

    fixture = shared_path(TINY[family])
    convert(str(fixture), tmp_path / 'out', image_size=96)
    bare = tmp_path / 'bare.safetensors'
    shutil.copy(tmp_path / 'out' / 'model.safetensors', bare)
    folder_model, file_model = load_model(None, tmp_path / 'out'), load_model(None, bare)
    for key in ('mean', 'std', 'interpolation', 'label_offset'):
        found, expected = (file_model.pretrained_cfg.get(key), folder_model.pretrained_cfg.get(key))
        as_tuple = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731  (JSON gives lists)
        assert as_tuple(found) == as_tuple(expected), key
    x = torch.from_numpy(np.load(fixture / 'inputs.npy')).permute(0, 3, 1, 2)
    with torch.inference_mode():
        torch.testing.assert_close(file_model(x), folder_model(x), rtol=0, atol=0)
