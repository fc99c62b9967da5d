"""effnet-convert on bad input and bad output places: one line naming the file and tensor, exit 2, nothing left.

Each test here was written against a failure of the earlier converter (issue 12): bad values converted with
exit 0, tracebacks, leftovers, races between two processes, and a "load with" line that lost AdvProp's mean/std.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import save_v2, shared_path
from safetensors import safe_open

from effnet_convert.cli import DEMO_CHECKPOINT, main
from effnet_timm.errors import InputError
from effnet_timm.weights.integrity import verify_folder

KERNEL = 'efficientnet-tiny/head/conv2d/kernel'
EMA = '/ExponentialMovingAverage'


@pytest.fixture(scope='module')
def tiny_tensors(tf):
    reader = tf.train.load_checkpoint(str(DEMO_CHECKPOINT / 'model.ckpt'))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _checkpoint(tf, tmp_path: Path, tensors: dict) -> Path:
    return save_v2(tf, tmp_path / 'ckpt' / 'model.ckpt', tensors)


def _leftovers(parent: Path, name: str = 'out') -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f'.{name}.'))


def _expect_error(tmp_path: Path, capsys, argv, *fragments: str, out: Path = None) -> str:
    out = out or tmp_path / 'out'
    assert main([*argv, '--out', str(out), '--quiet']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith('effnet-convert: error: '), err
    for fragment in fragments:
        assert fragment in err, err
    assert not os.path.lexists(out)
    if out.parent.is_dir():
        assert _leftovers(out.parent, out.name) == []
    return err


def _run(code: str, *args: str, timeout: int = 300) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, '-c', code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, 'OMP_NUM_THREADS': '1', 'TF_CPP_MIN_LOG_LEVEL': '3'},
    )


# --- 3: the printed "load with" line keeps the folder's preprocessing and tag ------------------------------


@pytest.mark.oracle
def test_printed_load_lines_carry_the_folders_preprocessing_and_tag(tmp_path, capsys):
    import timm

    b0 = shared_path('efficientnet-b0')
    out = tmp_path / 'b0ap'
    assert main([str(b0), '--out', str(out), '--tag', 'ap_in1k', '--quiet']) == 0
    printed = capsys.readouterr().out
    calls = re.findall(
        r'^  (?:load with|or)\s+(?:import effnet_timm, timm; )?(timm\.create_model\(.*\))$', printed, re.MULTILINE
    )
    assert calls, printed
    for call in calls:  # whichever line a user copies
        model = eval(call, {'timm': timm})
        cfg = model.pretrained_cfg
        assert tuple(cfg['mean']) == (0.5, 0.5, 0.5) and tuple(cfg['std']) == (0.5, 0.5, 0.5), call
        assert cfg.get('tag') == 'ap_in1k', call


# --- 4: values and dtypes the official graph cannot hold ------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_weights_refused(tmp_path, capsys, tf, tiny_tensors, bad):
    value = tiny_tensors[KERNEL + EMA].copy()
    value[0, 0, 3, 5] = bad
    prefix = _checkpoint(tf, tmp_path, {**tiny_tensors, KERNEL + EMA: value})
    _expect_error(
        tmp_path,
        capsys,
        [str(prefix)],
        'model.ckpt.data-00000-of-00001',
        f"'{KERNEL + EMA}'",
        '1 of',
        'NaN or Inf',
        '(0, 0, 3, 5)',
    )


@pytest.mark.oracle
def test_non_finite_raw_weights_refused_with_no_ema(tmp_path, capsys, tf, tiny_tensors):
    value = tiny_tensors[KERNEL].copy()
    value[..., 0] = np.nan
    prefix = _checkpoint(tf, tmp_path, {**tiny_tensors, KERNEL: value})
    _expect_error(tmp_path, capsys, [str(prefix), '--no-ema'], f"'{KERNEL}'", 'NaN or Inf')


@pytest.mark.oracle
@pytest.mark.parametrize('dtype', [np.float16, np.int32, np.float64])
def test_kernel_of_another_dtype_refused_not_cast(tmp_path, capsys, tf, tiny_tensors, dtype):
    value = (tiny_tensors[KERNEL + EMA] * 100).astype(dtype)
    prefix = _checkpoint(tf, tmp_path, {**tiny_tensors, KERNEL + EMA: value})
    _expect_error(
        tmp_path,
        capsys,
        [str(prefix)],
        'model.ckpt.index',
        f"'{KERNEL + EMA}'",
        f'dtype {np.dtype(dtype)}, expected float32',
    )


@pytest.mark.oracle
def test_duplicate_index_key_refused(tmp_path, capsys, tiny_tensors, tf):
    from test_tf_bundle import write_index

    from effnet_convert.tf_bundle import _read_table

    prefix = _checkpoint(tf, tmp_path, tiny_tensors)
    index = Path(f'{prefix}.index')
    pairs = _read_table(index)
    at = next(i for i, (k, _) in enumerate(pairs) if k == KERNEL.encode())
    write_index(index, [*pairs[: at + 1], pairs[at], *pairs[at + 1 :]])
    _expect_error(tmp_path, capsys, [str(prefix)], 'model.ckpt.index', f"'{KERNEL}' is listed twice")


@pytest.mark.oracle
@pytest.mark.parametrize('step', ['vector', 'int32', 'float'])
def test_global_step_of_another_kind_refused(tmp_path, capsys, tf, tiny_tensors, step):
    value = {'vector': np.array([1, 2], np.int64), 'int32': np.int32(7), 'float': np.float32(7)}[step]
    prefix = _checkpoint(tf, tmp_path, {**tiny_tensors, 'global_step': value})
    _expect_error(tmp_path, capsys, [str(prefix)], 'model.ckpt.index', "'global_step'", 'expected an int64 scalar')


# --- 11: missing or mis-shaped variables are named with their file ---------------------------------------


@pytest.mark.oracle
def test_missing_raw_variable_named(tmp_path, capsys, tf, tiny_tensors):
    missing = 'efficientnet-tiny/blocks_3/se/conv2d/bias'
    prefix = _checkpoint(tf, tmp_path, {k: v for k, v in tiny_tensors.items() if k != missing})
    _expect_error(tmp_path, capsys, [str(prefix)], 'model.ckpt.index', f"'{missing}' is missing")


@pytest.mark.oracle
def test_wrong_shaped_raw_variable_named(tmp_path, capsys, tf, tiny_tensors):
    name = 'efficientnet-tiny/blocks_3/se/conv2d/bias'
    shape = tiny_tensors[name].shape
    prefix = _checkpoint(tf, tmp_path, {**tiny_tensors, name: np.zeros(shape[0] + 1, np.float32)})
    _expect_error(
        tmp_path, capsys, [str(prefix)], 'model.ckpt.index', f"'{name}' has shape ({shape[0] + 1},), expected {shape}"
    )


@pytest.mark.oracle
def test_wrong_shaped_ema_shadow_named(tmp_path, capsys, tf, tiny_tensors):
    name = 'efficientnet-tiny/blocks_3/se/conv2d/bias' + EMA
    prefix = _checkpoint(tf, tmp_path, {**tiny_tensors, name: np.zeros(3, np.float32)})
    _expect_error(tmp_path, capsys, [str(prefix)], 'model.ckpt.index', f"'{name}': shape (3,)")


# --- 11: arguments checked before the long read -----------------------------------------------------------


def _count_reads(monkeypatch) -> list:
    from effnet_convert.tf_bundle import TensorBundle

    reads, get = [], TensorBundle.get
    monkeypatch.setattr(TensorBundle, 'get', lambda self, name: reads.append(name) or get(self, name))
    return reads


def test_tag_checked_before_any_tensor_is_read(tmp_path, capsys, monkeypatch):
    reads = _count_reads(monkeypatch)
    _expect_error(
        tmp_path,
        capsys,
        [str(DEMO_CHECKPOINT), '--tag', 'aa_in1k'],
        "tag 'aa_in1k' has no official effnet_v1 checkpoint",
    )
    assert reads == []


def test_unknown_tag_checked_before_the_source(tmp_path, capsys, monkeypatch):
    reads = _count_reads(monkeypatch)
    _expect_error(tmp_path, capsys, [str(tmp_path / 'absent.tar.gz'), '--tag', 'nope'], "unknown tag 'nope'")
    assert reads == []


@pytest.mark.parametrize('size', ['0', '-3', '100000'])
def test_absurd_image_size_refused(tmp_path, capsys, size):
    _expect_error(tmp_path, capsys, [str(DEMO_CHECKPOINT), '--image-size', size], f'image size {size}', '1 to 4096')


def test_demo_with_image_size_zero_refused(tmp_path, capsys):
    _expect_error(tmp_path, capsys, ['--image-size', '0'], 'image size 0')  # not replaced by the demo's 96


# --- 11: --allow-partial-ema says so ----------------------------------------------------------------------


@pytest.mark.oracle
def test_partial_ema_is_recorded_as_partial(tmp_path, capsys, tf, tiny_tensors):
    dropped = ['efficientnet-tiny/blocks_3/se/conv2d/bias', 'efficientnet-tiny/stem/conv2d/kernel']
    prefix = _checkpoint(tf, tmp_path, {k: v for k, v in tiny_tensors.items() if k[: -len(EMA)] not in dropped})
    out = tmp_path / 'out'
    assert main([str(prefix), '--out', str(out), '--allow-partial-ema', '--quiet']) == 0
    assert '2 variables have no EMA shadow' in capsys.readouterr().out
    with safe_open(str(out / 'model.safetensors'), 'pt') as f:
        meta = f.metadata()
    assert meta['ema'] == 'partial' and sorted(json.loads(meta['ema_raw_fallback'])) == sorted(dropped)
    provenance = json.loads((out / 'config.json').read_text())['effnet_timm']
    assert provenance['ema'] == 'partial' and sorted(provenance['ema_raw_fallback']) == sorted(dropped)
    assert 'except 2 variables without one' in (out / 'README.md').read_text()


# --- 11: archives that are not archives -------------------------------------------------------------------


@pytest.mark.parametrize(
    'content,message',
    [
        (b'', 'empty file (0 bytes)'),
        (os.urandom(3000), 'not a tar (or gzip-compressed tar) archive'),
        (b'\x1f\x8b' + os.urandom(3000), 'not a gzip-compressed tar archive'),
    ],
)
def test_broken_tarball_gives_one_line(tmp_path, capsys, content, message):
    archive = tmp_path / 'efficientnet-b0.tar.gz'
    archive.write_bytes(content)
    _expect_error(tmp_path, capsys, [str(archive)], 'efficientnet-b0.tar.gz', message)


def _tar(path: Path, files: dict) -> Path:
    with tarfile.open(path, 'w:gz', compresslevel=1) as tar:
        for name, source in files.items():
            if isinstance(source, Path):
                tar.add(source, arcname=name)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(source)
                import io

                tar.addfile(info, io.BytesIO(source))
    return path


# --- 5: an archive converts only itself ---------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize('how', ['absolute', 'dotdot'])
def test_archive_checkpoint_file_cannot_point_outside(tmp_path, capsys, tf, tiny_tensors, how):
    """The archive's `checkpoint` file names a different checkpoint outside it; its own files are converted."""
    other = {k: v + 1 if v.dtype == np.float32 else v for k, v in tiny_tensors.items()}
    outside = save_v2(tf, tmp_path / 'outside' / 'model.ckpt', other)
    # Extraction lands in <out parent>/.out.tmp-.../source/<stem>-XXXX/<folder>: three levels below tmp_path/.. .
    named = str(outside) if how == 'absolute' else '../../../../outside/model.ckpt'
    files = {
        f'efficientnet-tiny/{n}': DEMO_CHECKPOINT / n for n in ('model.ckpt.index', 'model.ckpt.data-00000-of-00001')
    }
    files['efficientnet-tiny/checkpoint'] = f'model_checkpoint_path: "{named}"\n'.encode()
    archive = _tar(tmp_path / 'efficientnet-tiny.tar.gz', files)
    out = tmp_path / 'out'
    assert main([str(archive), '--out', str(out), '--quiet']) == 0
    from effnet_convert.tf_bundle import TensorBundle

    with safe_open(str(out / 'model.safetensors'), 'pt') as f, TensorBundle(DEMO_CHECKPOINT / 'model.ckpt') as own:
        stem = f.get_tensor('conv_stem.weight').numpy()
        expected = own.get('efficientnet-tiny/stem/conv2d/kernel' + EMA).transpose(3, 2, 0, 1)
    np.testing.assert_array_equal(stem, expected)


@pytest.mark.oracle
def test_archive_naming_only_an_outside_checkpoint_is_refused(tmp_path, capsys, tf, tiny_tensors):
    outside = save_v2(tf, tmp_path / 'outside' / 'elsewhere.ckpt', tiny_tensors)
    files = {
        'efficientnet-tiny/checkpoint': f'model_checkpoint_path: "{outside}"\n'.encode(),
        'efficientnet-tiny/model.ckpt.index': DEMO_CHECKPOINT / 'model.ckpt.index',
        'efficientnet-tiny/model.ckpt.data-00000-of-00001': DEMO_CHECKPOINT / 'model.ckpt.data-00000-of-00001',
    }
    archive = _tar(tmp_path / 'efficientnet-tiny.tar.gz', files)
    _expect_error(tmp_path, capsys, [str(archive)], 'efficientnet-tiny/checkpoint', 'no index file inside the archive')


# --- 15: an archive may not expand beyond what its index declares ------------------------------------------


def test_oversized_shard_member_refused_before_unpacking(tmp_path, capsys, monkeypatch):
    files = {
        'efficientnet-tiny/model.ckpt.index': DEMO_CHECKPOINT / 'model.ckpt.index',
        'efficientnet-tiny/checkpoint': DEMO_CHECKPOINT / 'checkpoint',
        'efficientnet-tiny/model.ckpt.data-00000-of-00001': bytes(32 << 20),
    }
    archive = _tar(tmp_path / 'efficientnet-tiny.tar.gz', files)
    written = []
    original = tarfile.TarFile.extractall
    monkeypatch.setattr(
        tarfile.TarFile, 'extractall', lambda self, *a, **k: written.append(a) or original(self, *a, **k)
    )
    _expect_error(
        tmp_path,
        capsys,
        [str(archive)],
        'efficientnet-tiny.tar.gz',
        'would unpack 33',
        'tensor data its index declares',
    )
    assert written == []


def test_members_a_checkpoint_does_not_need_are_not_unpacked(tmp_path, monkeypatch):
    from effnet_convert import sources

    files = {f'efficientnet-tiny/{f.name}': f for f in DEMO_CHECKPOINT.iterdir()}
    files['efficientnet-tiny/model.ckpt.meta'] = bytes(32 << 20)  # the graph: big, and never read
    archive = _tar(tmp_path / 'efficientnet-tiny.tar.gz', files)
    seen = []
    extract = sources._extract
    monkeypatch.setattr(sources, '_extract', lambda a, w, *cap: seen.append(extract(a, w, *cap)) or seen[-1])
    resolved = sources.resolve_source(str(archive), tmp_path / 'work')
    assert sorted(p.name for p in seen[0].rglob('*') if p.is_file()) == [
        'checkpoint',
        'model.ckpt.data-00000-of-00001',
        'model.ckpt.index',
    ]
    assert resolved.prefix.name == 'model.ckpt'


# --- 9: output errors ---------------------------------------------------------------------------------------


def test_output_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / 'blocker'
    blocker.write_text('keep')
    _expect_error(tmp_path, capsys, [str(DEMO_CHECKPOINT)], 'blocker', out=blocker / 'sub' / 'out')
    assert blocker.read_text() == 'keep' and sorted(p.name for p in tmp_path.iterdir()) == ['blocker']


def test_output_that_is_a_file_with_overwrite_is_replaced(tmp_path, capsys):
    out = tmp_path / 'out'
    out.write_text('old')
    assert main([str(DEMO_CHECKPOINT), '--out', str(out), '--overwrite', '--quiet']) == 0
    verify_folder(out)


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EPERM])
def test_write_failure_gives_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, code):
    import effnet_convert.converter as converter

    def failing_save(state, filename, metadata=None):
        Path(filename).write_bytes(b'partial')  # as a full disk leaves it
        raise OSError(code, os.strerror(code), filename)

    monkeypatch.setattr(converter, 'save_file', failing_save)
    out = tmp_path / 'a' / 'b' / 'out'  # parents created for this run go again
    _expect_error(tmp_path, capsys, [str(DEMO_CHECKPOINT)], str(out), os.strerror(code), out=out)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MiB tmpfs: a real full disk (model.safetensors of the demo is 1.8 MB). Needs mount rights (root)."""
    mount = tmp_path / 'small'
    mount.mkdir()
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(
            f'cannot mount a tmpfs here ({proc.stderr.decode().strip()}); '
            'test_write_failure_gives_one_line_and_leaves_nothing covers the path'
        )
    yield mount
    subprocess.run(['umount', str(mount)], check=True)


def test_full_disk_gives_one_line_and_leaves_nothing(tmp_path, capsys, tiny_filesystem):
    out = tiny_filesystem / 'new' / 'out'
    _expect_error(tmp_path, capsys, [str(DEMO_CHECKPOINT)], str(out), 'No space left on device', out=out)
    assert list(tiny_filesystem.iterdir()) == []


def test_safetensors_write_error_gives_one_line(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import effnet_convert.converter as converter

    def failing_save(state, filename, metadata=None):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr(converter, 'save_file', failing_save)
    _expect_error(tmp_path, capsys, [str(DEMO_CHECKPOINT)], 'No space left on device')


def test_temp_folder_failure_gives_one_line(tmp_path, capsys, monkeypatch):
    import tempfile

    monkeypatch.setattr(
        tempfile,
        'mkdtemp',
        lambda **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, 'Permission denied', k.get('dir'))),
    )
    _expect_error(tmp_path, capsys, [str(DEMO_CHECKPOINT)], 'Permission denied')


def test_failed_run_removes_the_parents_it_created(tmp_path, capsys):
    (tmp_path / 'exists').mkdir()
    _expect_error(
        tmp_path,
        capsys,
        [str(DEMO_CHECKPOINT), '--variant', 'effnet_v1_b1'],
        'disagrees',
        out=tmp_path / 'exists' / 'new' / 'deeper' / 'out',
    )
    assert list((tmp_path / 'exists').iterdir()) == []  # the folder that was there stays, the new ones go


# --- 10: two processes, one output folder --------------------------------------------------------------------

# Both processes reach the model build (after the "already exists" check, before writing) before either
# goes on, so the race is certain, not a matter of timing.
RACER = r"""
import os, sys, time
from pathlib import Path
import effnet_convert.converter as c
barrier = Path(sys.argv[2])
build = c.build_model
def build_after_barrier(*args, **kwargs):
    (barrier / str(os.getpid())).touch()
    deadline = time.time() + 240
    while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.02)
    return build(*args, **kwargs)
c.build_model = build_after_barrier
from effnet_convert.cli import main
sys.exit(main([sys.argv[3], '--out', sys.argv[1], '--quiet', *sys.argv[4:]]))
"""


def _race(tmp_path: Path, *extra: str):
    barrier = tmp_path / 'barrier'
    barrier.mkdir()
    out = tmp_path / 'out'
    procs = [_run(RACER, str(out), str(barrier), str(DEMO_CHECKPOINT), *extra) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    return out, results


def test_two_processes_one_output_exactly_one_wins(tmp_path):
    out, results = _race(tmp_path)
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser_err = next(err for code, _, err in results if code == 2).strip()
    assert len(loser_err.splitlines()) == 1 and 'created by another process' in loser_err, loser_err
    verify_folder(out)  # the winner's folder, complete and as recorded
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert _leftovers(tmp_path) == []


def test_two_processes_with_overwrite_leave_one_complete_folder(tmp_path):
    out, results = _race(tmp_path, '--overwrite')
    assert [code for code, _, _ in results] == [0, 0], results
    verify_folder(out)
    assert _leftovers(tmp_path) == []


# --- 11: a killed run leaves a recognisable temp folder that the next run removes --------------------------

KILLED = r"""
import os, signal, sys
import effnet_convert.converter as c
save = c.save_file
def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
c.save_file = save_then_die
from effnet_convert.cli import main
main([sys.argv[2], '--out', sys.argv[1], '--quiet'])
"""


def test_killed_run_leaves_a_temp_folder_the_next_run_removes(tmp_path):
    out = tmp_path / 'out'
    proc = _run(KILLED, str(out), str(DEMO_CHECKPOINT))
    assert proc.wait(timeout=300) == -signal.SIGKILL, proc.communicate()
    host = re.sub(r'[^A-Za-z0-9.]', '_', socket.gethostname())
    stale = _leftovers(tmp_path)
    assert len(stale) == 1 and re.fullmatch(rf'\.out\.tmp-{re.escape(host)}-{proc.pid}-\w+', stale[0]), stale
    assert (tmp_path / stale[0] / 'out' / 'model.safetensors').is_file()  # complete-looking, but not the output
    assert not out.exists()
    # A live process's temp folder is left alone.
    live = tmp_path / f'.out.tmp-{host}-{os.getpid()}-keepme'
    live.mkdir()
    assert main([str(DEMO_CHECKPOINT), '--out', str(out), '--quiet']) == 0
    assert _leftovers(tmp_path) == [live.name]
    verify_folder(out)


KILLED_WHILE_SWAPPING = r"""
import os, signal, sys
rename = os.rename
def rename_or_die(src, dst, *args, **kwargs):
    if os.path.basename(str(src)) == 'out' and '.tmp-' in str(src):  # the new folder, after the old moved aside
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)
os.rename = rename_or_die
from effnet_convert.cli import main
main([sys.argv[2], '--out', sys.argv[1], '--quiet', '--overwrite'])
"""


def test_previous_output_survives_a_kill_during_overwrite(tmp_path, capsys):
    out = tmp_path / 'out'
    assert main([str(DEMO_CHECKPOINT), '--out', str(out), '--quiet']) == 0
    (out / 'marker').write_text('previous output')
    proc = _run(KILLED_WHILE_SWAPPING, str(out), str(DEMO_CHECKPOINT))
    assert proc.wait(timeout=300) == -signal.SIGKILL, proc.communicate()
    assert not out.exists() and len(_leftovers(tmp_path)) == 1  # moved aside, into the dead run's temp folder
    capsys.readouterr()
    assert main([str(DEMO_CHECKPOINT), '--out', str(out), '--quiet']) == 2  # the next run puts it back first
    assert 'already exists' in capsys.readouterr().err
    assert (out / 'marker').read_text() == 'previous output' and _leftovers(tmp_path) == []
    verify_folder(out)


def test_failed_swap_keeps_the_previous_output(tmp_path, capsys, monkeypatch):
    import effnet_convert.converter as converter

    out = tmp_path / 'out'
    assert main([str(DEMO_CHECKPOINT), '--out', str(out), '--quiet']) == 0
    (out / 'marker').write_text('previous output')
    rename = os.rename

    def rename_in_fails(src, dst):
        if Path(dst) == out:
            raise PermissionError(errno.EACCES, 'Permission denied', str(dst))
        return rename(src, dst)

    monkeypatch.setattr(converter.os, 'rename', rename_in_fails)
    assert main([str(DEMO_CHECKPOINT), '--out', str(out), '--quiet', '--overwrite']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Permission denied' in err, err
    kept = [p for p in tmp_path.glob('.out.tmp-*/replaced/marker')]
    assert [p.read_text() for p in kept] == ['previous output']  # not deleted with the temp folder


# --- 13: integrity records ------------------------------------------------------------------------------------


def test_conversion_records_size_and_sha256(converted_tiny):
    import hashlib

    files = json.loads((converted_tiny / 'config.json').read_text())['effnet_timm']['files']
    data = (converted_tiny / 'model.safetensors').read_bytes()
    assert files == {'model.safetensors': {'sha256': hashlib.sha256(data).hexdigest(), 'size': len(data)}}


@pytest.mark.parametrize('damage', ['flip', 'truncate', 'append'])
def test_damaged_weights_fail_verification(tmp_path, converted_tiny, damage):
    import shutil

    folder = tmp_path / 'copy'
    shutil.copytree(converted_tiny, folder)
    verify_folder(folder)
    weights = folder / 'model.safetensors'
    data = bytearray(weights.read_bytes())
    if damage == 'flip':
        data[len(data) // 2] ^= 0x01  # one bit of one weight: still a valid safetensors file
    elif damage == 'truncate':
        data = data[:-4]
    else:
        data += b'\0'
    weights.write_bytes(bytes(data))
    with pytest.raises(
        InputError,
        match=r'model\.safetensors: (sha256 [0-9a-f]{12}…, expected [0-9a-f]{12}…|'
        r'\d+ bytes, expected \d+)',
    ) as info:
        verify_folder(folder)
    assert '\n' not in str(info.value)


def test_cli_help_imports_nothing_heavy():
    code = (
        'import sys\n'
        'from effnet_convert.cli import main\n'
        'for argv in (["--help"], ["push", "--help"], ["publish-family", "--help"], []):\n'
        '    try:\n'
        '        main(argv)\n'
        '    except SystemExit as e:\n'
        '        assert e.code in (0, 2), e.code\n'
        'heavy = [m for m in ("torch", "timm", "numpy", "effnet_timm", "tensorflow") if m in sys.modules]\n'
        'assert not heavy, heavy\n'
    )
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'the following arguments are required: --out' in proc.stderr


def test_push_refuses_a_folder_whose_weights_changed(tmp_path, converted_tiny):
    import shutil

    from effnet_convert.hub import read_folder

    folder = tmp_path / 'copy'
    shutil.copytree(converted_tiny, folder)
    read_folder(folder)
    weights = folder / 'model.safetensors'
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # a weight's low bit: loads strictly, logits barely move, bytes differ from the record
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r'model\.safetensors: sha256'):
        read_folder(folder)


def test_parent_made_by_another_conversion_meanwhile_is_used_and_not_claimed(tmp_path, monkeypatch):
    """Two conversions into new siblings under a missing parent: the one whose mkdir loses the race must go on
    (and must not remove the parent, which is the other's)."""
    import effnet_convert.converter as converter

    parent = tmp_path / 'new' / 'deeper'
    real_mkdir = Path.mkdir

    def mkdir_after_the_other_process(self, *args, **kwargs):
        if self == parent and not parent.exists():
            real_mkdir(self)  # the other process wins the race for this folder
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, 'mkdir', mkdir_after_the_other_process)
    created = converter._make_parents(parent)
    assert parent.is_dir()
    assert created == [tmp_path / 'new']
