"""One atomic-write helper; new files get the umask applied by the kernel, never by setting the process umask."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from effnet_timm.files import new_file_mode, write_atomic

WRITE = """
import importlib.util, os, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location('files', sys.argv[2])  # the module alone: no torch to import
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
new_file_mode, write_atomic = files.new_file_mode, files.write_atomic
folder = Path(sys.argv[1])
write_atomic(folder / 'a.txt', 'text')
write_atomic(folder / 'b.bin', b'bytes')
print(oct(os.stat(folder / 'a.txt').st_mode & 0o777), oct(os.stat(folder / 'b.bin').st_mode & 0o777),
      oct(new_file_mode(folder)), oct(os.umask(0o22)))
"""


@pytest.mark.parametrize('umask', [0o022, 0o027, 0o077])
def test_new_files_get_the_mode_of_the_umask(tmp_path, umask):
    proc = subprocess.run(
        [sys.executable, '-c', WRITE, str(tmp_path), str(REPO / 'effnet_timm' / 'files.py')],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(umask),
    )
    assert proc.returncode == 0, proc.stderr
    expected = oct(0o666 & ~umask)
    assert proc.stdout.split() == [expected, expected, expected, oct(umask)]  # the umask itself untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.txt', 'b.bin']  # no probe or temp file left


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / 'results.json'
    write_atomic(target, 'old')
    with pytest.raises(TypeError):
        write_atomic(target, 3)  # type: ignore[arg-type]
    (tmp_path / 'folder').mkdir()
    with pytest.raises(OSError):
        write_atomic(tmp_path / 'folder', 'a folder cannot be replaced by a file')
    assert target.read_text() == 'old'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['folder', 'results.json']


def test_new_file_mode_needs_no_umask_call(tmp_path):
    assert new_file_mode(tmp_path) == os.stat(_touch(tmp_path / 'x')).st_mode & 0o777


def test_nothing_sets_the_process_umask():
    # os.umask(0) to read the umask changes it for every thread meanwhile: a race for any file made then.
    sources = [
        *REPO.glob('effnet_timm/**/*.py'),
        *REPO.glob('convert/effnet_convert/*.py'),
        REPO / 'effnet_timm_cli.py',
    ]
    offenders = [str(p.relative_to(REPO)) for p in sources if re.search(r'os\.umask\(', _code(p))]
    assert not offenders, offenders


def _touch(path):
    with open(path, 'x'):
        pass
    return path


def _code(path) -> str:
    """The file without its comments and docstrings' prose mentions (lines starting with #, or in backticks)."""
    return '\n'.join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith('#') and '`os.umask' not in line
    )
