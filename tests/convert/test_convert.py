"""effnet-convert against the official graph's logits, every official layout, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import FIXTURES, MANIFESTS, load_manifest, save_v2, shared_path
from safetensors import safe_open

import effnet_timm  # noqa: F401  (registers the models)
from effnet_convert.cli import DEMO_CHECKPOINT, main
from effnet_convert.converter import convert
from effnet_convert.mapping import detect_architecture, official_layout
from effnet_timm.models.config import VARIANTS

TINY = FIXTURES / 'efficientnet-tiny'
REL_TOL = 1e-5  # of max |logit|: the scale of fp32 TF-vs-PyTorch summation-order differences


def _model_logits(folder: Path, inputs: np.ndarray) -> np.ndarray:
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    with torch.inference_mode():
        return model(torch.from_numpy(inputs).permute(0, 3, 1, 2)).numpy()


def _assert_reproduces(ours: np.ndarray, official: np.ndarray, rel_tol: float = REL_TOL) -> None:
    rel = np.abs(ours - official).max() / np.abs(official).max()
    assert rel <= rel_tol, f'max |dlogit| is {rel:.3g} of max |logit|'
    np.testing.assert_array_equal(np.argsort(-ours, 1)[:, :5], np.argsort(-official, 1)[:, :5])


@pytest.mark.parametrize('ema,logits', [(True, 'logits_ema.npy'), (False, 'logits_raw.npy')])
def test_tiny_checkpoint_reproduces_official_logits(tmp_path, ema, logits):
    result = convert(str(DEMO_CHECKPOINT), tmp_path / 'out', ema=ema, image_size=96)
    assert result.ema_used is ema and result.architecture.scope == 'efficientnet-tiny'
    _assert_reproduces(_model_logits(tmp_path / 'out', np.load(TINY / 'inputs.npy')), np.load(TINY / logits))


@pytest.mark.oracle
@pytest.mark.parametrize('ema,logits', [(True, 'logits_ema.npy'), (False, 'logits_raw.npy')])
def test_b0_checkpoint_reproduces_official_logits(tmp_path, ema, logits):
    b0 = shared_path('efficientnet-b0')
    result = convert(str(b0), tmp_path / 'out', ema=ema, tag='aa_in1k')
    assert result.architecture.variant == 'effnet_v1_b0' and result.num_parameters == 5_288_548
    _assert_reproduces(_model_logits(tmp_path / 'out', np.load(b0 / 'inputs.npy')), np.load(b0 / logits))
    # The registered tag loads the same file too.
    model = timm.create_model(
        'effnet_v1_b0.aa_in1k',
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / 'out' / 'model.safetensors')),
    )
    assert model.pretrained_cfg['crop_pct'] == 0.875


def test_training_checkpoint_with_rmsprop_slots_converts(tmp_path):
    rmsprop = FIXTURES / 'efficientnet-tiny-rmsprop'
    convert(str(rmsprop), tmp_path / 'out', image_size=96)
    _assert_reproduces(
        _model_logits(tmp_path / 'out', np.load(TINY / 'inputs.npy')), np.load(rmsprop / 'logits_ema.npy')
    )


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'effnet_convert.cli', *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'},
    )


def test_cli_converts_the_embedded_default(tmp_path):
    out = tmp_path / 'demo'
    proc = _run_cli('--out', str(out), '--quiet')
    assert proc.returncode == 0, proc.stderr
    assert re.search(r'tensors\s+140 \(444,612 parameters\), EMA shadows', proc.stdout), proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    _assert_reproduces(_model_logits(out, np.load(TINY / 'inputs.npy')), np.load(TINY / 'logits_ema.npy'))

    with safe_open(str(out / 'model.safetensors'), 'pt') as f:
        meta = f.metadata()
    import hashlib

    recorded = {f['name']: f['sha256'] for f in json.loads(meta['source_files'])}
    for name in ('model.ckpt.index', 'model.ckpt.data-00000-of-00001'):
        assert recorded[name] == hashlib.sha256((DEMO_CHECKPOINT / name).read_bytes()).hexdigest()
    assert meta['ema'] == 'true' and meta['tf_scope'] == 'efficientnet-tiny' and meta['converter']

    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'effnet_v1'
    assert config['model_args']['width_coefficient'] == 0.25 and config['pretrained_cfg']['input_size'] == [3, 96, 96]
    card = (out / 'README.md').read_text()
    assert card.startswith('---\nlibrary_name: timm\n') and recorded['model.ckpt.index'] in card


@pytest.fixture(scope='module')
def tiny_tensors(tf):
    reader = tf.train.load_checkpoint(str(DEMO_CHECKPOINT / 'model.ckpt'))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _expect_error(tmp_path: Path, capsys, argv, *fragments: str) -> str:
    out = tmp_path / 'out'
    assert main([*argv, '--out', str(out), '--quiet']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.out.')] == []  # no temp leftovers
    return err


def test_wrong_variant_flag_names_both(tmp_path, capsys):
    _expect_error(
        tmp_path,
        capsys,
        [str(DEMO_CHECKPOINT), '--variant', 'effnet_v1_b1'],
        'effnet_v1_b1',
        'no official variant',
        "scope 'efficientnet-tiny'",
    )


@pytest.mark.oracle
def test_partial_ema_is_an_error_unless_asked(tmp_path, capsys, tf, tiny_tensors):
    dropped = 'efficientnet-tiny/blocks_3/se/conv2d/bias/ExponentialMovingAverage'
    prefix = save_v2(tf, tmp_path / 'ckpt' / 'model.ckpt', {k: v for k, v in tiny_tensors.items() if k != dropped})
    _expect_error(
        tmp_path, capsys, [str(prefix)], 'ExponentialMovingAverage', dropped[: -len('/ExponentialMovingAverage')]
    )
    assert main([str(prefix), '--out', str(tmp_path / 'ok'), '--allow-partial-ema', '--quiet']) == 0


@pytest.mark.oracle
def test_unexpected_variable_is_an_error(tmp_path, capsys, tf, tiny_tensors):
    extra = dict(tiny_tensors, **{'efficientnet-tiny/blocks_3/extra/kernel': np.zeros(3, np.float32)})
    prefix = save_v2(tf, tmp_path / 'ckpt' / 'model.ckpt', extra)
    _expect_error(tmp_path, capsys, [str(prefix)], 'unexpected', 'blocks_3/extra/kernel')


@pytest.mark.oracle
def test_corrupted_tensor_is_named(tmp_path, capsys, tf, tiny_tensors):
    prefix = save_v2(tf, tmp_path / 'ckpt' / 'model.ckpt', tiny_tensors)
    data = Path(f'{prefix}.data-00000-of-00001')
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    _expect_error(tmp_path, capsys, [str(prefix)], 'CRC32C mismatch', "tensor 'efficientnet-tiny/")


@pytest.mark.oracle
@pytest.mark.parametrize('damage', ['truncated index', 'missing shard', 'truncated data'])
def test_damaged_files_give_one_line(tmp_path, capsys, tf, tiny_tensors, damage):
    prefix = save_v2(tf, tmp_path / 'ckpt' / 'model.ckpt', tiny_tensors)
    index, data = Path(f'{prefix}.index'), Path(f'{prefix}.data-00000-of-00001')
    if damage == 'truncated index':
        index.write_bytes(index.read_bytes()[:-20])
    elif damage == 'missing shard':
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:-1000])
    _expect_error(tmp_path, capsys, [str(prefix)], 'model.ckpt')


def test_tar_with_parent_path_member_is_refused(tmp_path, capsys):
    archive = tmp_path / 'evil.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        for f in DEMO_CHECKPOINT.iterdir():
            tar.add(f, arcname=f'efficientnet-tiny/{f.name}')
        tar.add(DEMO_CHECKPOINT / 'checkpoint', arcname='../escaped')
    _expect_error(tmp_path, capsys, [str(archive)], 'evil.tar.gz', '..')
    assert not (tmp_path.parent / 'escaped').exists()


def test_tarball_converts_and_tag_is_guessed_from_official_name(tmp_path):
    archive = tmp_path / 'noisy_student_efficientnet-tiny.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        for f in DEMO_CHECKPOINT.iterdir():
            tar.add(f, arcname=f'noisy-student-efficientnet-tiny/{f.name}')
    result = convert(str(archive), tmp_path / 'out', image_size=96)
    assert result.sources[0]['name'] == archive.name
    assert result.tag is None  # NoisyStudent has no tiny model: the guess must not stick


def test_existing_output_is_not_replaced_without_overwrite(tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep').write_text('x')
    assert main([str(DEMO_CHECKPOINT), '--out', str(out), '--quiet']) == 2
    assert 'already exists' in capsys.readouterr().err and (out / 'keep').exists()
    assert main([str(DEMO_CHECKPOINT), '--out', str(out), '--quiet', '--overwrite']) == 0
    assert not (out / 'keep').exists()


@pytest.mark.oracle
def test_tag_must_exist_for_the_variant(tmp_path, capsys):
    b0 = shared_path('efficientnet-b0')
    _expect_error(tmp_path, capsys, [str(b0), '--tag', 'ra_in1k'], "tag 'ra_in1k'", 'effnet_v1_b0')


# --- every official layout ------------------------------------------------------------------------------


def _manifest_shapes(variant: str) -> dict:
    shared_path('manifests')
    manifest = load_manifest(MANIFESTS / f'{VARIANTS[variant].official_name}.json')
    return {v['name']: tuple(v['shape']) for v in manifest['checkpoint']['variables']}


@pytest.mark.oracle
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_every_official_variable_maps_exactly_once(variant):
    shapes = _manifest_shapes(variant)
    arch = detect_architecture(shapes)
    assert arch.variant == variant and arch.scope == VARIANTS[variant].official_name
    slots = official_layout(arch.width, arch.depth, arch.num_classes, arch.bn)
    model_vars = {
        n[len(arch.scope) + 1 :]: s
        for n, s in shapes.items()
        if not n.endswith('/ExponentialMovingAverage') and n != 'global_step'
    }
    assert {s.tf_name: s.tf_shape for s in slots} == model_vars
    with torch.device('meta'):
        state = timm.create_model(variant).state_dict()
    assert sorted(s.key for s in slots) == sorted(k for k in state if not k.endswith('num_batches_tracked'))


def _random_official_checkpoint(tf, variant: str, prefix: Path) -> Path:
    """Random values for every variable the official manifest lists (EMA shadows differ from raw)."""
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in _manifest_shapes(variant).items():
        base = name.replace('/ExponentialMovingAverage', '')
        if name == 'global_step':
            tensors[name] = np.int64(1000)
            continue
        leaf = base.rsplit('/', 1)[1]
        if leaf in ('kernel', 'depthwise_kernel'):
            fan_in = int(np.prod(shape[:-1])) if leaf == 'kernel' else shape[0] * shape[1]
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif leaf == 'gamma':
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == 'moving_variance':
            value = rng.uniform(0.5, 2.0, shape)
        else:  # beta, moving_mean, biases
            value = rng.standard_normal(shape) * 0.25
        tensors[name] = value.astype(np.float32)
    return save_v2(tf, prefix, tensors)


KERAS_SIZE = 128  # large enough for every stride, small enough for B7 in CI


@pytest.mark.oracle
@pytest.mark.parametrize('variant', [f'effnet_v1_b{i}' for i in range(8)])
def test_random_official_checkpoint_matches_keras(tmp_path, tf, variant):
    from effnet_convert.tf_reference import keras_logits, load_official_variables

    prefix = _random_official_checkpoint(tf, variant, tmp_path / 'ckpt' / 'model.ckpt')
    result = convert(str(prefix), tmp_path / 'out', variant=variant, tag='none')  # loads strictly or raises
    assert result.architecture.variant == variant and result.ema_used
    images = np.random.default_rng(1).standard_normal((2, KERAS_SIZE, KERAS_SIZE, 3)).astype(np.float32)
    variables, scope = load_official_variables(str(prefix), ema=True)
    reference = keras_logits(variables, scope, images, variant)
    model = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    with torch.inference_mode():
        ours = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    _assert_reproduces(ours, reference, rel_tol=2e-4)


@pytest.mark.oracle
@pytest.mark.parametrize('variant', ['effnet_v1_b8', pytest.param('effnet_v1_l2', marks=pytest.mark.slow)])
def test_random_official_checkpoint_of_the_largest_variants_loads_strictly(tmp_path, tf, variant):
    prefix = _random_official_checkpoint(tf, variant, tmp_path / 'ckpt' / 'model.ckpt')
    result = convert(str(prefix), tmp_path / 'out', tag='none')
    assert result.architecture.variant == variant and result.ema_used
    with torch.device('meta'):
        expected = sum(p.numel() for p in timm.create_model(variant).parameters())
    assert result.num_parameters == expected


# --- --verify -------------------------------------------------------------------------------------------


@pytest.mark.oracle
def test_cli_verify_passes_on_the_embedded_default(tmp_path, tf):
    proc = _run_cli('--out', str(tmp_path / 'demo'), '--verify', '--quiet')
    assert proc.returncode == 0, proc.stderr
    match = re.search(
        r'verification\s+PASSED: max \|dlogit\| \S+ \((\S+) of max \|logit\|\), '
        r'top-5 identical on 4/4 photos',
        proc.stdout,
    )
    assert match and float(match.group(1)) <= 1e-5, proc.stdout
    config = json.loads((tmp_path / 'demo' / 'config.json').read_text())
    assert config['effnet_timm']['verification']['passed'] is True
    assert 'max_rel_diff' in (tmp_path / 'demo' / 'README.md').read_text()


@pytest.mark.oracle
def test_verify_fails_a_wrong_model(tmp_path, tf):
    from effnet_convert.converter import build_model, read_weights
    from effnet_convert.tf_bundle import TensorBundle
    from effnet_convert.verify import verify_against_tensorflow

    with TensorBundle(DEMO_CHECKPOINT / 'model.ckpt') as bundle:
        weights = read_weights(bundle)
    model = build_model(weights.architecture, image_size=96)
    model.load_state_dict(weights.state_dict)
    assert verify_against_tensorflow(model, weights)['passed']
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.eps = 1e-5  # the classic porting bug
    report = verify_against_tensorflow(model, weights)
    assert not report['passed'] and report['max_rel_diff'] > 1e-3


def test_verify_without_tensorflow_says_so_and_fails(tmp_path):
    out = tmp_path / 'out'
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        'from effnet_convert.cli import main\n'
        f"sys.exit(main(['--out', {str(out)!r}, '--verify', '--quiet']))"
    )
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert 'needs TensorFlow' in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
