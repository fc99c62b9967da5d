"""Argument mistakes are answered before torch loads (a typo costs no import of seconds), in the library's words;
progress bars only on a terminal; `run` says where timm's scripts are."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, SAMPLES

PHOTO = str(SAMPLES / 'chelsea.jpg')
HEAVY = ('torch', 'timm', 'numpy', 'PIL', 'effnet_timm', 'tensorflow', 'safetensors')

# (argv of effnet-timm or effnet-convert, the one error line expected)
CASES = [
    (['effnet-timm', 'predict', PHOTO, '--model', 'effnet_v1_b9'], "unknown model 'effnet_v1_b9' (known: effnet_v1, "),
    (['effnet-timm', 'predict', PHOTO, '--model', 'effnet_v1_b8.ns_jft_in1k'], 'effnet_v1_b8 has no pretrained tag'),
    (['effnet-timm', 'predict', 'no/such.jpg', '--model', 'effnet_v1_b0'], 'no/such.jpg: cannot read image: no such'),
    (['effnet-timm', 'predict', PHOTO], 'give --model, --weights, or both'),
    (['effnet-timm', 'predict', PHOTO, '--weights', 'no/such'], 'no/such: no such file or folder'),
    (['effnet-timm', 'info', 'effnet_v1_bO'], "unknown model 'effnet_v1_bO'"),
    (['effnet-timm', 'validate', 'no/val', '--model', 'effnet_v1_b0'], 'no/val: no such folder'),
    (['effnet-timm', 'validate', '--data-dir', 'no/val', '--model', 'effnet_v1_b0'], 'no/val: no such folder'),
    (['effnet-timm', 'validate', str(SAMPLES), '--model', 'efnet_v1_b0'], "unknown model 'efnet_v1_b0'"),
    (['effnet-timm', 'download', 'effnet_v1_b0.nope'], "'effnet_v1_b0.nope': no such official checkpoint"),
    (['effnet-timm', 'download', '--tag', 'nope'], "unknown tag 'nope' (known: ns_jft_in1k_475, "),
    (['effnet-timm', 'download', 'effnet_v1'], "'effnet_v1': not a model with official weights"),
    (['effnet-timm', 'run', 'no/train.py'], 'no/train.py: no such script; timm'),
    (['effnet-convert', 'no/ckpt', '--out', 'out/x'], 'no/ckpt: not a checkpoint directory, prefix'),
    (['effnet-convert', '--out', 'out/x', '--tag', 'nope'], "unknown tag 'nope'"),
    (['effnet-convert', '--out', 'out/x', '--variant', 'effnet_v1_b9'], "unknown variant 'effnet_v1_b9'"),
    (['effnet-convert', '--out', 'out/x', '--image-size', '0'], 'image size 0: expected a whole number of pixels'),
]

SCRIPT = """
import contextlib, io, json, sys
import effnet_timm_cli
from effnet_convert import cli as convert_cli
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        main = effnet_timm_cli.main if argv[0] == 'effnet-timm' else convert_cli.main
        code = main(argv[1:])
    results.append([code, err.getvalue()])
heavy = sorted({m.split('.')[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
print(json.dumps(dict(results=results, heavy=heavy)))
"""


def test_argument_mistakes_are_one_line_before_torch_loads(tmp_path):
    proc = subprocess.run(
        [sys.executable, '-c', SCRIPT, json.dumps([argv for argv, _ in CASES]), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    for (argv, expected), (code, err) in zip(CASES, result['results']):
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1, (argv, code, err)
        assert lines[0].startswith(f'{argv[0]}: error: ') and expected in lines[0], (argv, lines[0])
    assert result['heavy'] == [], 'imported before the error: ' + ', '.join(result['heavy'])
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_light_name_table_is_the_registry():
    # The CLI's copy of the names (so that a typo needs no torch) must not drift from what is registered.
    import timm

    import effnet_timm_cli
    from effnet_timm import TAGS
    from effnet_timm.commands.loading import known_tags

    registry = {arch: tuple(known_tags(arch)) for arch in timm.list_models('effnet_v1*')}
    assert effnet_timm_cli.MODEL_TAGS == registry, f'effnet_timm_cli.MODEL_TAGS must be: {registry!r}'
    assert effnet_timm_cli.TAG_NAMES == tuple(TAGS), 'update effnet_timm_cli.TAG_NAMES'


def test_the_same_mistakes_get_the_same_words_from_the_library():
    # The early checks repeat the library's messages: the library, given the same names, says the same.
    from effnet_timm.commands.loading import split_known_name
    from effnet_timm.errors import InputError
    from effnet_timm.weights.prefetch import select_names
    from effnet_timm_cli import model_name_error

    for name in ('effnet_v1_b9', 'effnet_v1_b8.ns_jft_in1k', 'effnet_v1_l2.in1k'):
        with pytest.raises(InputError) as err:
            split_known_name(name)
        assert str(err.value) == model_name_error(name)
    for names, tag in ((['effnet_v1_b0.nope'], None), (['effnet_v1'], None), ([], 'nope')):
        with pytest.raises(InputError) as err:
            select_names(names, tag)
        early = next(e for argv, e in CASES if argv[:2] == ['effnet-timm', 'download'] and (names + [tag])[0] in argv)
        assert early in str(err.value)


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, converted_tiny, capsys):
    # Neither convert nor validate draw a bar into a pipe or a log (captured stderr is not a terminal).
    from effnet_convert.cli import main as convert_main
    from effnet_timm_cli import main

    demo = REPO / 'convert' / 'effnet_convert' / 'demo' / 'efficientnet-tiny'
    val = tmp_path / 'val' / 'n02123045'
    val.mkdir(parents=True)
    (val / 'chelsea.JPEG').write_bytes((SAMPLES / 'chelsea.jpg').read_bytes())
    assert convert_main([str(demo), '--out', str(tmp_path / 'demo'), '--image-size', '96']) == 0
    err = capsys.readouterr().err
    assert 'reading tensors' not in err and '|' not in err, err
    assert main(['validate', str(tmp_path / 'val'), '--weights', str(converted_tiny), '--workers', '0']) == 0
    err = capsys.readouterr().err
    assert 'it/s' not in err and '|' not in err, err


def test_validate_help_says_when_model_is_needed():
    from effnet_timm_cli import parser

    help_text = ' '.join(parser()._subparsers._group_actions[0].choices['validate'].format_help().split())
    assert 'optional with weights made by effnet-convert: they record it' in help_text
    assert '(needs --model)' not in help_text


def test_run_says_where_timms_scripts_of_the_installed_version_are(capsys):
    from importlib.metadata import version

    from effnet_timm_cli import main

    assert main(['run', 'train.py']) == 2
    err = capsys.readouterr().err
    assert f'huggingface/pytorch-image-models/v{version("timm")}/train.py' in err
