"""Pretrained tags, their preprocessing cfgs, and how weights load (local files, a filled Hub cache, failures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from conftest import realistic_init_
from safetensors.torch import save_file

import effnet_timm
from effnet_timm.weights.tags import HUB_ORG, TAGS

# Official checkpoint families (tensorflow/tpu README), written out here, not derived from TAGS.
EXPECTED_TAGS = {
    'in1k': [f'b{i}' for i in range(6)],
    'aa_in1k': [f'b{i}' for i in range(8)],
    'ra_in1k': ['b5', 'b7', 'b8'],
    'ap_in1k': [f'b{i}' for i in range(9)],
    'ns_jft_in1k': [f'b{i}' for i in range(8)] + ['l2'],
    'ns_jft_in1k_475': ['l2'],
}
NATIVE = dict(b0=224, b1=240, b2=260, b3=300, b4=380, b5=456, b6=528, b7=600, b8=672, l2=800)
B_SERIES = {f'effnet_v1_{v}' for v in NATIVE}
# The other V1 families (lite/README.md, edgetpu/README.md, condconv/README.md): tag in1k, official path,
# native size, resize of their main.py.
FAMILY_CKPTS = {
    'lite0': ('lite/efficientnet-lite0', 224, 'bilinear'),
    'lite1': ('lite/efficientnet-lite1', 240, 'bilinear'),
    'lite2': ('lite/efficientnet-lite2', 260, 'bilinear'),
    'lite3': ('lite/efficientnet-lite3', 280, 'bilinear'),
    'lite4': ('lite/efficientnet-lite4', 300, 'bilinear'),
    'edgetpu_s': ('efficientnet-edgetpu-S', 224, 'bilinear'),
    'edgetpu_m': ('efficientnet-edgetpu-M', 240, 'bilinear'),
    'edgetpu_l': ('efficientnet-edgetpu-L', 300, 'bilinear'),
    'condconv_b0_4e': ('condconv/efficientnet-condconv-b0-4e', 224, 'bicubic'),
    'condconv_b0_8e': ('condconv/efficientnet-condconv-b0-8e', 224, 'bicubic'),
    'condconv_b0_8e_depth': ('condconv/efficientnet-condconv-b0-8e-depth', 224, 'bicubic'),
}


def test_registered_tags_are_exactly_the_official_checkpoint_families():
    expected = sorted(f'effnet_v1_{v}.{tag}' for tag, vs in EXPECTED_TAGS.items() for v in vs)
    expected += [f'effnet_v1_{v}.in1k' for v in FAMILY_CKPTS]
    assert sorted(timm.list_pretrained('effnet_v1*')) == sorted(expected)


@pytest.mark.parametrize('variant', list(FAMILY_CKPTS))
def test_family_tag_cfg_has_the_official_eval_preprocessing_and_path(variant):
    from effnet_timm.weights.tags import OFFICIAL_CKPT_ROOT, official_url

    path, size, resize = FAMILY_CKPTS[variant]
    cfg = timm.models.get_pretrained_cfg(f'effnet_v1_{variant}.in1k').to_dict()
    assert cfg['input_size'] == (3, size, size) and int(size / cfg['crop_pct']) == size + 32
    assert cfg['interpolation'] == resize and cfg['crop_mode'] == 'center'
    assert cfg['mean'] == pytest.approx((127 / 255,) * 3) and cfg['std'] == pytest.approx((128 / 255,) * 3)
    assert cfg['num_classes'] == 1000 and cfg.get('label_offset') == (1 if 'edgetpu' in variant else None)
    assert official_url(f'effnet_v1_{variant}', 'in1k') == f'{OFFICIAL_CKPT_ROOT}/{path}.tar.gz'


@pytest.mark.parametrize('name', sorted(n for n in timm.list_pretrained('effnet_v1*') if n.split('.')[0] in B_SERIES))
def test_tag_cfg_has_the_official_eval_preprocessing(name):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    variant, tag = name.split('.')
    size = 475 if tag == 'ns_jft_in1k_475' else NATIVE[variant.rsplit('_', 1)[1]]
    assert cfg['input_size'] == (3, size, size)
    # timm's eval transform resizes to floor(size / crop_pct): must be the official size + 32.
    assert int(size / cfg['crop_pct']) == size + 32
    assert cfg['interpolation'] == 'bicubic' and cfg['crop_mode'] == 'center'
    if tag == 'ap_in1k':  # AdvProp: x * 2 / 255 - 1
        assert cfg['mean'] == cfg['std'] == (0.5, 0.5, 0.5)
    else:
        assert cfg['mean'] == (0.485, 0.456, 0.406) and cfg['std'] == (0.229, 0.224, 0.225)
    assert cfg['hf_hub_id'] == f'{HUB_ORG}/{name}'
    assert cfg['num_classes'] == 1000


def test_default_tags_follow_timm_tf_efficientnet():
    for i in range(8):
        assert timm.create_model(f'effnet_v1_b{i}', pretrained=False).pretrained_cfg['tag'] == 'ns_jft_in1k'
    assert timm.models.get_pretrained_cfg('effnet_v1_b8').tag == 'ap_in1k'
    assert timm.models.get_pretrained_cfg('effnet_v1_l2').tag == 'ns_jft_in1k_475'


def test_unknown_tag_is_rejected():
    with pytest.raises(RuntimeError, match='bogus'):
        timm.create_model('effnet_v1_b0.bogus')


@pytest.fixture(scope='module')
def b0_weights(tmp_path_factory):
    model = realistic_init_(timm.create_model('effnet_v1_b0', drop_path_rate=0.0), calib_size=64)
    path = tmp_path_factory.mktemp('weights') / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_local_file_with_in_chans_1_and_num_classes_10(b0_weights):
    source, path = b0_weights
    model = timm.create_model(
        'effnet_v1_b0.aa_in1k', pretrained=True, in_chans=1, num_classes=10, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    # timm's stem adaptation for one channel sums the RGB filters.
    torch.testing.assert_close(model.conv_stem.weight, source.conv_stem.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.blocks[3][1].conv_dw.weight, source.blocks[3][1].conv_dw.weight)
    assert model.classifier.out_features == 10
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert model(x).shape == (1, 10)
        # A gray image through the adapted stem equals the RGB model on the gray image repeated.
        torch.testing.assert_close(
            model.forward_features(x), source.eval().forward_features(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4
        )


def test_local_file_loads_strictly_into_features_only(b0_weights):
    source, path = b0_weights
    model = timm.create_model(
        'effnet_v1_b0', pretrained=True, features_only=True, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        _, expected = source.eval().forward_intermediates(x)
        torch.testing.assert_close(model(x), expected)


def test_pretrained_without_any_weight_source_fails_clearly():
    with pytest.raises(effnet_timm.PretrainedWeightsError) as err:
        timm.create_model('effnet_v1', pretrained=True)
    assert 'no pretrained weights' in str(err.value) and '\n' not in str(err.value)


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_hub_cache_copy_is_used_only_for_a_pinned_tag(b0_weights, tmp_path):
    """Weights that sit in the Hub cache under `HUB_ORG/effnet_v1_b0.aa_in1k` (whoever published them) are not loaded
    for an unpinned tag; once the TAGS row pins that commit and the file's sha256, they are (offline, no request)."""
    import hashlib

    source, path = b0_weights
    commit = 'a' * 40
    repo = tmp_path / 'hub' / f'models--{HUB_ORG}--effnet_v1_b0.aa_in1k'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    (repo / 'snapshots' / commit).mkdir(parents=True)
    (repo / 'snapshots' / commit / 'model.safetensors').write_bytes(path.read_bytes())
    x = torch.randn(1, 3, 64, 64)
    torch.save(x, tmp_path / 'x.pt')
    load = f"""
        import torch, timm, effnet_timm
        try:
            model = timm.create_model('effnet_v1_b0.aa_in1k', pretrained=True).eval()
        except effnet_timm.PretrainedWeightsError as err:
            print(err)
        else:
            with torch.inference_mode():
                torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})
    """
    env = dict(HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'hub'), EFFNET_TIMM_CACHE=str(tmp_path / 'cache'))
    unpinned = _run(load, env)
    assert unpinned.returncode == 0 and not (tmp_path / 'y.pt').exists(), unpinned.stderr[-2000:]
    assert 'HF_HUB_OFFLINE=1' in unpinned.stdout and 'effnet-timm download' in unpinned.stdout
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    pin = f"""
        import dataclasses
        from effnet_timm.weights.tags import TAGS, HubPin
        pin = HubPin({commit!r}, {sha256!r})
        TAGS['aa_in1k'] = dataclasses.replace(TAGS['aa_in1k'], hub_pins={{'effnet_v1_b0': pin}})
    """
    pinned = _run(textwrap.dedent(pin) + textwrap.dedent(load), env)
    assert pinned.returncode == 0 and pinned.stdout == '', pinned.stdout + pinned.stderr[-2000:]
    with torch.inference_mode():
        torch.testing.assert_close(torch.load(tmp_path / 'y.pt'), source.eval()(x))


def test_unavailable_hub_weights_fail_in_one_clear_line(tmp_path):
    result = _run(
        """
        import timm, effnet_timm
        try:
            timm.create_model('effnet_v1_b0.ap_in1k', pretrained=True)
        except effnet_timm.PretrainedWeightsError as err:
            print(str(err))
        else:
            print('LOADED')
    """,
        dict(HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'empty'), EFFNET_TIMM_CACHE=str(tmp_path / 'cache')),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    message = result.stdout.strip()
    assert len(message.splitlines()) == 1
    assert 'effnet_v1_b0.ap_in1k' in message and 'HF_HUB_OFFLINE=1' in message and 'effnet-convert' in message
    assert f'{HUB_ORG}/' not in message  # no unpinned Hub repo is a source


def test_tag_table_matches_expected_families():
    expected = dict(EXPECTED_TAGS, in1k=EXPECTED_TAGS['in1k'] + list(FAMILY_CKPTS))
    assert {tag: [v[len('effnet_v1_') :] for v in spec.variants] for tag, spec in TAGS.items()} == expected
    assert json.dumps(TAGS['ap_in1k'].mean) == '[0.5, 0.5, 0.5]'
