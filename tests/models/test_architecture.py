"""The architecture equals the official builder's: per-block channel table, stem/head, parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from conftest import FIXTURES, MANIFESTS, load_manifest, shared_path

import effnet_timm
from effnet_timm.models.config import VARIANTS, block_table, head_filters, round_filters, stem_filters

OFFICIAL_VARIANTS = list(VARIANTS)
# BlockConfig fields for the other V1 families (tests/models/test_families.py); the B-series rows lack them.
FAMILY_FIELDS = {'declared_input_filters', 'fused', 'id_skip', 'has_se', 'num_experts'}


def _row(block) -> dict:
    return {k: v for k, v in dataclasses.asdict(block).items() if k not in FAMILY_FIELDS}


def _manifest(variant: str) -> dict:
    shared_path('manifests')
    return load_manifest(MANIFESTS / f'{VARIANTS[variant].official_name}.json')


def _params_on_meta(name: str, **kwargs) -> int:
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


def _official_rows(params: dict) -> list:
    rows = []
    for row in params['blocks']:
        row = dict(row)
        strides = row.pop('strides')
        assert strides[0] == strides[1]
        rows.append(dict(row, stride=strides[0]))
    return rows


@pytest.mark.oracle
@pytest.mark.parametrize('variant', OFFICIAL_VARIANTS)
def test_block_table_equals_official_channel_table(variant):
    params = _manifest(variant)['params']
    spec = VARIANTS[variant]
    assert (spec.width, spec.depth, spec.resolution, spec.dropout) == (
        params['width_coefficient'],
        params['depth_coefficient'],
        params['resolution'],
        params['dropout_rate'],
    )
    ours = [_row(b) for b in block_table(spec.width, spec.depth)]
    assert ours == _official_rows(params)
    assert stem_filters(spec.width) == params['stem_filters']
    assert head_filters(spec.width) == params['head_filters']


def test_scaled_down_official_checkpoint_table():
    params = load_manifest(FIXTURES / 'efficientnet-tiny' / 'manifest.json')['params']
    ours = [_row(b) for b in block_table(params['width_coefficient'], params['depth_coefficient'])]
    assert ours == _official_rows(params)


@pytest.mark.oracle
@pytest.mark.parametrize('variant', OFFICIAL_VARIANTS)
def test_parameter_count_equals_official_and_timm(variant):
    official = _manifest(variant)['checkpoint']['num_trainable_parameters']
    ours = _params_on_meta(variant)
    assert ours == official
    assert ours == _params_on_meta('tf_' + variant.replace('effnet_v1_', 'efficientnet_'))


def test_b0_parameter_count_is_the_published_one():
    assert _params_on_meta('effnet_v1_b0') == 5_288_548


@pytest.mark.parametrize(
    'filters,width,expected',
    [
        (32, 1.1, 32),  # 35.2 -> 32 keeps >= 90 %
        (32, 1.2, 40),  # 38.4 -> 40
        (1280, 4.3, 5504),
        (16, 0.25, 8),  # floor at the divisor
        (40, 1.4, 56),
        (24, 0.8, 24),  # 19.2 -> 16 is < 90 %, so +8
    ],
)
def test_round_filters_cases_worked_by_hand(filters, width, expected):
    assert round_filters(filters, width) == expected


def test_state_dict_keys_and_shapes_match_timm_tf_port():
    with torch.device('meta'):
        ours = timm.create_model('effnet_v1_b2').state_dict()
        ref = timm.create_model('tf_efficientnet_b2').state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ours)


def test_general_constructor_builds_scaled_down_official_network():
    params = load_manifest(FIXTURES / 'efficientnet-tiny' / 'manifest.json')
    model = effnet_timm.EffNetV1(width_coefficient=0.25, depth_coefficient=0.25)
    assert sum(p.numel() for p in model.parameters()) == params['checkpoint']['num_trainable_parameters']
    via_timm = timm.create_model('effnet_v1', width_coefficient=0.25, depth_coefficient=0.25)
    assert sum(p.numel() for p in via_timm.parameters()) == params['checkpoint']['num_trainable_parameters']
