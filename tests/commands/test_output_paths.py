"""Output paths that cannot be written are refused before the work starts, in one line with exit 2, naming only
paths that exist.

Tests run as root, where permission bits stop nothing, so the unwritable places are ones that stop root too: a
path that goes through a regular file (ENOTDIR), /proc (no file can be created there), a folder where a file is to
be written, a folder that is missing. "Before the work starts" is checked by making the work itself fail the test.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

import effnet_convert.converter
import effnet_timm.commands.validate
import effnet_timm.weights.prefetch
from effnet_convert.cli import main as convert_main
from effnet_timm.commands.outputs import check_output_file, check_output_folder
from effnet_timm.commands.validate import write_per_image, write_results
from effnet_timm.errors import InputError
from effnet_timm_cli import main

UNWRITABLE = Path('/proc')  # procfs: creating a file or folder in it fails for root as for anyone


class WorkStarted(Exception):
    """Raised by the command's work, so a test can tell whether the checks let it begin."""


def _work_started(*args, **kwargs):
    raise WorkStarted


@pytest.fixture
def no_work(monkeypatch):
    monkeypatch.setattr(effnet_timm.commands.validate, 'validate', _work_started)
    monkeypatch.setattr(effnet_convert.converter, 'convert', _work_started)
    monkeypatch.setattr(effnet_timm.weights.prefetch, 'prefetch', _work_started)


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / 'notes.txt'
    path.write_text('a regular file, not a folder\n')
    return path


def _one_line_naming_existing_paths(err: str, prog: str) -> str:
    assert err.count('\n') == 1 and err.startswith(f'{prog}: error: '), err
    for token in re.findall(r'(?<!\S)(/[^\s:;,()]+)', err):
        assert os.path.lexists(token), f'the message names {token}, which does not exist: {err}'
    return err


def _cases(tmp_path: Path, a_file: Path) -> dict[str, tuple[Path, str]]:
    """case -> (output path, what the one line must say)."""
    (tmp_path / 'out.json').mkdir()
    return {
        'under_a_file': (a_file / 'out.json', f'{a_file}: is a file, not a folder'),
        'unwritable_folder': (UNWRITABLE / 'out.json', f'{UNWRITABLE}: cannot create'),
        'missing_folder': (tmp_path / 'no' / 'such' / 'out.json', f'{tmp_path}: has no folder no/such'),
        'a_folder': (tmp_path / 'out.json', f'{tmp_path / "out.json"}: is a folder'),
    }


@pytest.mark.parametrize('option', ['--results-file', '--per-image'])
@pytest.mark.parametrize('case', ['under_a_file', 'unwritable_folder', 'missing_folder', 'a_folder'])
def test_validate_refuses_an_unwritable_output_before_the_run(capsys, tmp_path, a_file, no_work, option, case):
    path, expect = _cases(tmp_path, a_file)[case]
    if option == '--per-image':
        path = path.with_suffix('.csv')
        expect = expect.replace('out.json', 'out.csv')
        if case == 'a_folder':
            path.mkdir()
    code = main(['validate', str(tmp_path), '--model', 'effnet_v1_b0', option, str(path)])
    err = _one_line_naming_existing_paths(capsys.readouterr().err, 'effnet-timm')
    assert code == 2 and expect in err and option in err, err


def test_validate_with_writable_outputs_starts_the_run(tmp_path, no_work):
    args = [
        'validate',
        str(tmp_path),
        '--results-file',
        str(tmp_path / 'r.json'),
        '--per-image',
        str(tmp_path / 'p.csv'),
    ]
    with pytest.raises(WorkStarted):
        main(args)
    assert sorted(os.listdir(tmp_path)) == []  # the checks leave nothing behind


def test_validate_refuses_the_same_file_for_both_outputs(capsys, tmp_path, no_work):
    (tmp_path / 'sub').mkdir()
    results, per_image = tmp_path / 'r.csv', tmp_path / 'sub' / '..' / 'r.csv'
    assert main(['validate', str(tmp_path), '--results-file', str(results), '--per-image', str(per_image)]) == 2
    err = _one_line_naming_existing_paths(capsys.readouterr().err, 'effnet-timm')
    assert '--results-file and --per-image name the same file' in err


def test_an_output_that_became_unwritable_during_the_run_is_one_line_and_nothing_is_left(tmp_path):
    result = dict(
        model='m', top1=1.0, top1_err=99.0, top5=2.0, top5_err=98.0, param_count=1.0, img_size=96, crop_pct=0.75,
        interpolation='bicubic', num_images=3, per_image=[],
    )  # fmt: skip
    target = tmp_path / 'r.json'
    check_output_file(target, '--results-file')  # fine before the run ...
    target.mkdir()  # ... and then something put a folder where the file goes
    with pytest.raises(InputError, match=rf'^{target}: is a folder'):
        write_results(result, target)
    with pytest.raises(InputError, match=rf'^{UNWRITABLE}: cannot create'):
        write_per_image(result, UNWRITABLE / 'p.csv')
    assert os.listdir(tmp_path) == ['r.json'] and os.listdir(target) == []


@pytest.mark.parametrize('case', ['under_a_file', 'unwritable_folder'])
def test_convert_refuses_an_unwritable_out_before_reading_the_checkpoint(capsys, tmp_path, a_file, no_work, case):
    path, expect = _cases(tmp_path, a_file)[case]
    assert convert_main(['--out', str(path.with_suffix('')), '--quiet']) == 2
    err = _one_line_naming_existing_paths(capsys.readouterr().err, 'effnet-convert')
    assert expect in err and '--out' in err, err


def test_convert_creates_missing_parents_of_out(tmp_path, no_work):
    with pytest.raises(WorkStarted):
        convert_main(['--out', str(tmp_path / 'new' / 'deep' / 'out'), '--quiet'])
    assert os.listdir(tmp_path) == []  # the check made nothing


def test_publish_family_refuses_an_unwritable_out(capsys, tmp_path, a_file):
    assert convert_main(['publish-family', str(tmp_path), '--tag', 'in1k', '--out', str(a_file / 'conv')]) == 2
    err = _one_line_naming_existing_paths(capsys.readouterr().err, 'effnet-convert publish-family')
    assert f'{a_file}: is a file, not a folder' in err


@pytest.mark.parametrize('case', ['under_a_file', 'unwritable_folder'])
def test_download_refuses_an_unwritable_cache_in_one_line_before_downloading(
    capsys, tmp_path, a_file, no_work, monkeypatch, case
):
    path, expect = _cases(tmp_path, a_file)[case]
    monkeypatch.setenv('EFFNET_TIMM_CACHE', str(path.with_suffix('')))
    assert main(['download', 'effnet_v1_b0.in1k', 'effnet_v1_b1.in1k']) == 2
    out, err = capsys.readouterr()
    assert out == ''
    err = _one_line_naming_existing_paths(err, 'effnet-timm')
    assert expect in err and 'EFFNET_TIMM_CACHE' in err, err


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only tmpfs: a folder root cannot write in either. Needs mount rights (root in a container that
    allows mounts); /proc stands in for it in the tests above wherever it does not."""
    mount = tmp_path / 'ro'
    mount.mkdir()
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=64k', 'tmpfs', str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here ({proc.stderr.decode().strip()}); the /proc cases cover the path')
    yield mount
    subprocess.run(['umount', str(mount)], check=True)


def test_a_read_only_folder_is_refused_by_every_command(capsys, read_only_folder, no_work, monkeypatch):
    ro = read_only_folder
    assert main(['validate', str(ro), '--results-file', str(ro / 'r.json')]) == 2
    assert f'{ro}: cannot create --results-file in this folder (Read-only file system)' in capsys.readouterr().err
    assert convert_main(['--out', str(ro / 'sub' / 'out'), '--quiet']) == 2
    assert f'{ro}: cannot create --out in this folder (Read-only file system)' in capsys.readouterr().err
    monkeypatch.setenv('EFFNET_TIMM_CACHE', str(ro))
    assert main(['download', 'effnet_v1_b0.in1k']) == 2
    assert f'{ro}: cannot create the weights cache (EFFNET_TIMM_CACHE) in this folder' in capsys.readouterr().err


def test_a_writable_cache_folder_is_left_as_it_was(tmp_path):
    check_output_folder(tmp_path / 'cache', 'the weights cache')
    check_output_folder(tmp_path, 'the weights cache')
    assert os.listdir(tmp_path) == []
