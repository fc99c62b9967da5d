"""resolve_source: directories, prefixes, tarballs (safely unpacked) and URLs (served on loopback only)."""

from __future__ import annotations

import functools
import hashlib
import io
import shutil
import socket
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CKPT

from effnet_convert.errors import CheckpointError
from effnet_convert.sources import resolve_source
from effnet_convert.tf_bundle import TensorBundle
from effnet_timm.weights.integrity import sha256_file

TINY = TINY_CKPT.parent
INDEX, DATA = 'model.ckpt.index', 'model.ckpt.data-00000-of-00001'
INNER = 'noisy-student-efficientnet-b1'  # the inconsistent inner folder naming of the NoisyStudent tars


def checkpoint_dir(path: Path, state: str | None = None, prefixes: tuple[str, ...] = ('model.ckpt',)) -> Path:
    """Copies of the tiny checkpoint as ``prefixes``, plus a ``checkpoint`` file naming ``state`` if given."""
    path.mkdir(parents=True)
    for prefix in prefixes:
        shutil.copy(TINY / INDEX, path / f'{prefix}.index')
        shutil.copy(TINY / DATA, path / f'{prefix}.data-00000-of-00001')
    if state is not None:
        (path / 'checkpoint').write_text(f'model_checkpoint_path: "{state}"\nall_model_checkpoint_paths: "{state}"\n')
    return path


def make_tar(path: Path, files: dict[str, Path], links: dict[str, str] | None = None) -> Path:
    mode = 'w' if path.suffix == '.tar' else 'w:gz'
    with tarfile.open(path, mode, **({} if mode == 'w' else {'compresslevel': 1})) as tar:
        for name, source in files.items():
            tar.add(source, arcname=name)
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def official_like_tar(path: Path, folder: str = INNER) -> Path:
    files = {f'{folder}/{name}': TINY / name for name in ('checkpoint', INDEX, DATA)}
    # A harmless symlink inside the archive must not be refused.
    return make_tar(path, files, {f'{folder}/alias': 'checkpoint'})


def assert_tiny_tensors(prefix: Path) -> None:
    with TensorBundle(prefix) as got, TensorBundle(TINY / 'model.ckpt') as want:
        assert got.keys() == want.keys()
        name = 'efficientnet-tiny/head/conv2d/kernel'
        assert np.array_equal(got.get(name), want.get(name))


# ---------------------------------------------------------------------------------------------------------
# Directories and prefixes


def test_directory_with_checkpoint_file(tmp_path: Path) -> None:
    resolved = resolve_source(str(TINY), tmp_path)
    assert resolved.prefix == (TINY / 'model.ckpt').absolute()
    assert resolved.files == [TINY.absolute() / INDEX, TINY.absolute() / DATA]
    assert (resolved.origin, resolved.kind, resolved.archive_sha256) == (str(TINY), 'directory', None)


def test_directory_without_checkpoint_file(tmp_path: Path) -> None:
    directory = checkpoint_dir(tmp_path / 'ckpt', prefixes=('model.ckpt-1000',))
    assert resolve_source(str(directory), tmp_path).prefix == directory / 'model.ckpt-1000'


def test_directory_with_two_checkpoints_and_no_checkpoint_file(tmp_path: Path) -> None:
    directory = checkpoint_dir(tmp_path / 'ckpt', prefixes=('model.ckpt-1', 'model.ckpt-2'))
    with pytest.raises(
        CheckpointError,
        match=r"no 'checkpoint' file to choose one: model\.ckpt-1\.index, model\.ckpt-2\.index",
    ):
        resolve_source(str(directory), tmp_path)


def test_checkpoint_file_chooses_among_several(tmp_path: Path) -> None:
    directory = checkpoint_dir(tmp_path / 'ckpt', 'model.ckpt-2', prefixes=('model.ckpt-1', 'model.ckpt-2'))
    assert resolve_source(str(directory), tmp_path).prefix == directory / 'model.ckpt-2'


def test_checkpoint_file_with_absolute_path(tmp_path: Path) -> None:
    directory = checkpoint_dir(tmp_path / 'ckpt', str(tmp_path / 'ckpt' / 'model.ckpt'))
    assert resolve_source(str(directory), tmp_path).prefix == directory / 'model.ckpt'


def test_checkpoint_file_written_on_another_machine(tmp_path: Path) -> None:
    directory = checkpoint_dir(tmp_path / 'ckpt', 'gs://bucket/run7/model.ckpt')
    assert resolve_source(str(directory), tmp_path).prefix == directory / 'model.ckpt'


def test_checkpoint_file_naming_a_missing_checkpoint(tmp_path: Path) -> None:
    directory = checkpoint_dir(tmp_path / 'ckpt', 'model.ckpt-99')
    with pytest.raises(CheckpointError, match=r'checkpoint: model_checkpoint_path "model.ckpt-99" has no index file'):
        resolve_source(str(directory), tmp_path)


@pytest.mark.parametrize('given', ['model.ckpt', INDEX, DATA])
def test_prefix_index_or_shard_path(tmp_path: Path, given: str) -> None:
    resolved = resolve_source(str(TINY / given), tmp_path)
    assert (resolved.prefix, resolved.kind) == ((TINY / 'model.ckpt').absolute(), 'prefix')


def test_nothing_there(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r'nothing\.ckpt: not a checkpoint directory, prefix'):
        resolve_source(str(tmp_path / 'nothing.ckpt'), tmp_path)


def test_sha256_only_for_archives(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match='can only be checked for a tarball or URL'):
        resolve_source(str(TINY), tmp_path, expected_sha256='0' * 64)


def test_sha256_file() -> None:
    assert sha256_file(TINY / DATA) == hashlib.sha256((TINY / DATA).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Tarballs


@pytest.mark.parametrize('suffix', ['.tar.gz', '.tgz', '.tar'])
def test_archive_with_inconsistent_inner_folder(tmp_path: Path, suffix: str) -> None:
    archive = official_like_tar(tmp_path / f'noisy_student_efficientnet-b1{suffix}')
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    work = tmp_path / 'work'
    resolved = resolve_source(str(archive), work, expected_sha256=digest.upper())
    assert resolved.prefix.parent.name == INNER and resolved.prefix.is_relative_to(work.absolute())
    assert [p.name for p in resolved.files] == [INDEX, DATA] and all(p.is_file() for p in resolved.files)
    assert (resolved.kind, resolved.archive_sha256) == ('archive', digest)
    assert_tiny_tensors(resolved.prefix)


def test_archive_sha256_mismatch(tmp_path: Path) -> None:
    archive = official_like_tar(tmp_path / 'efficientnet-b0.tar.gz')
    with pytest.raises(
        CheckpointError,
        match=r'efficientnet-b0\.tar\.gz: sha256 mismatch \(expected 0{64}, found [0-9a-f]{64}\)',
    ):
        resolve_source(str(archive), tmp_path / 'work', expected_sha256='0' * 64)


def test_archive_with_two_checkpoint_folders(tmp_path: Path) -> None:
    files = {f'{folder}/{INDEX}': TINY / INDEX for folder in ('b0', 'b1')}
    archive = make_tar(tmp_path / 'two.tar.gz', files)
    with pytest.raises(CheckpointError, match='checkpoints in several folders: b0, b1'):
        resolve_source(str(archive), tmp_path / 'work')


def test_archive_without_checkpoint(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / 'empty.tar.gz', {'readme.txt': TINY / 'checkpoint'})
    with pytest.raises(CheckpointError, match=r'empty\.tar\.gz: archive holds no \*\.index file'):
        resolve_source(str(archive), tmp_path / 'work')


def test_truncated_archive(tmp_path: Path) -> None:
    archive = official_like_tar(tmp_path / 'cut.tar.gz')
    archive.write_bytes(archive.read_bytes()[:50_000])
    work = tmp_path / 'work'
    with pytest.raises(CheckpointError, match=r'cut\.tar\.gz: cannot unpack'):
        resolve_source(str(archive), work)
    assert list(work.iterdir()) == []


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = '') -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


EVIL = {
    'parent': ([_member('../evil')], "'../evil': '..' in its path"),
    'symlink-up': (
        [_member('link', tarfile.SYMTYPE, '../../outside')],
        "'link': symlink to '../../outside' outside",
    ),
    'symlink-absolute': ([_member('link', tarfile.SYMTYPE, '/etc')], "'link': symlink to '/etc' outside"),
    # Each link alone stays inside, but b -> a/.. climbs out because a is the archive root itself.
    'symlink-chain': (
        [_member('a', tarfile.SYMTYPE, '.'), _member('b', tarfile.SYMTYPE, 'a/..')],
        "'b': symlink to 'a/..' outside",
    ),
    'through-symlink': (
        [_member('d', tarfile.SYMTYPE, 'sub'), _member('d/x')],
        "'d/x': its path goes through a symlink",
    ),
    'hardlink-up': ([_member('h', tarfile.LNKTYPE, '../outside')], "'h': hard link to '../outside' outside"),
    'char-device': ([_member('dev', tarfile.CHRTYPE)], "'dev': device, FIFO or other special file"),
    'fifo': ([_member('pipe', tarfile.FIFOTYPE)], "'pipe': device, FIFO or other special file"),
}


@pytest.mark.parametrize('case', [*EVIL, 'absolute'])
def test_unsafe_archive_refused(tmp_path: Path, case: str) -> None:
    outside = tmp_path / 'absolute-evil'
    members, message = EVIL.get(case) or ([_member(str(outside))], f"'{outside}': absolute path")
    archive = tmp_path / 'evil.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        # A real checkpoint too, so that only the bad member can be the reason for the refusal.
        for name in (INDEX, DATA):
            tar.add(TINY / name, arcname=f'ckpt/{name}')
        for member in members:
            tar.addfile(member, io.BytesIO(b'') if member.isreg() else None)
    work = tmp_path / 'work'
    with pytest.raises(CheckpointError, match=rf'evil\.tar\.gz: refusing unsafe member {message}'):
        resolve_source(str(archive), work)
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ['evil.tar.gz', 'work']


# ---------------------------------------------------------------------------------------------------------
# URLs, served from a loopback-only server


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope='module')
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(base URL, sha256) of a tarball on a local HTTP server."""
    root = tmp_path_factory.mktemp('www')
    archive = official_like_tar(root / 'noisy_student_efficientnet-b1.tar.gz')
    server = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_port}', sha256_file(archive)
    server.shutdown()
    server.server_close()
    thread.join()


def test_url(tmp_path: Path, served: tuple[str, str]) -> None:
    base, digest = served
    url = f'{base}/noisy_student_efficientnet-b1.tar.gz'
    resolved = resolve_source(url, tmp_path, expected_sha256=digest)
    assert (resolved.origin, resolved.kind, resolved.archive_sha256) == (url, 'url', digest)
    assert resolved.prefix.parent.name == INNER
    assert sha256_file(tmp_path / 'noisy_student_efficientnet-b1.tar.gz') == digest
    assert not list(tmp_path.glob('*.part'))
    assert_tiny_tensors(resolved.prefix)


def test_url_sha256_mismatch_leaves_nothing(tmp_path: Path, served: tuple[str, str]) -> None:
    url = f'{served[0]}/noisy_student_efficientnet-b1.tar.gz'
    with pytest.raises(
        CheckpointError, match=f'{url}: sha256 of the .* bytes received is .*, expected 0+; nothing kept'
    ):
        resolve_source(url, tmp_path, expected_sha256='0' * 64)
    assert list(tmp_path.iterdir()) == []


def test_url_not_found(tmp_path: Path, served: tuple[str, str]) -> None:
    url = f'{served[0]}/missing.tar.gz'
    with pytest.raises(CheckpointError, match=f'^cannot download {url}: HTTP 404'):
        resolve_source(url, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_url_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('EFFNET_TIMM_DOWNLOAD_ATTEMPTS', '1')
    with socket.socket() as probe:  # a port that was just free, so nothing listens there
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    url = f'http://127.0.0.1:{port}/efficientnet-b0.tar.gz'
    with pytest.raises(CheckpointError) as info:
        resolve_source(url, tmp_path)
    message = str(info.value)
    assert message.startswith(f'cannot download {url}: ') and '\n' not in message
    assert list(tmp_path.iterdir()) == []


def test_url_must_name_a_tarball(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r'only \.tar\.gz, \.tgz or \.tar archives can be downloaded'):
        resolve_source('http://127.0.0.1:9/model.ckpt.index', tmp_path)


def test_url_is_fetched_by_the_one_downloader_resumed_and_hash_checked(tmp_path: Path) -> None:
    """The converter's URL input resumes a dropped connection within the call and checks X-Goog-Hash."""
    from bucket_server import BucketServer, Fault

    data = official_like_tar(tmp_path / 'src.tar.gz').read_bytes()
    with BucketServer() as bucket:
        bucket.files['/noisystudent/noisy_student_efficientnet-b1.tar.gz'] = data
        url = f'{bucket.root}/noisystudent/noisy_student_efficientnet-b1.tar.gz'
        bucket.faults['/noisystudent/noisy_student_efficientnet-b1.tar.gz'] = Fault('truncate', after=1000, times=1)
        resolved = resolve_source(url, tmp_path / 'a')
        assert resolved.archive_sha256 == hashlib.sha256(data).hexdigest()
        assert bucket.gets('/noisystudent/noisy_student_efficientnet-b1.tar.gz')[-1].endswith('bytes=1000-')
        assert_tiny_tensors(resolved.prefix)
        bucket.faults['/noisystudent/noisy_student_efficientnet-b1.tar.gz'] = Fault('bad_hash', times=1)
        with pytest.raises(CheckpointError, match='X-Goog-Hash') as info:
            resolve_source(url, tmp_path / 'b')
    assert '\n' not in str(info.value) and '.part' not in str(info.value)
    assert list((tmp_path / 'b').iterdir()) == []


def test_unpacked_size_is_bounded_by_what_the_variant_can_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The expansion cap does not come only from sizes the (untrusted) archive declares about itself: with an
    expected variant, what that variant can hold (parameters x 4 bytes x raw, EMA and optimizer slots) bounds it."""
    import effnet_convert.sources as sources
    from effnet_convert.converter import _unpack_cap, convert

    archive = official_like_tar(tmp_path / 'efficientnet-b0.tar.gz', 'efficientnet-b0')
    with pytest.raises(CheckpointError, match='more than the 1000 that the expected variant can hold'):
        resolve_source(str(archive), tmp_path / 'work', max_unpacked=1000)
    assert list((tmp_path / 'work').iterdir()) == []
    caps = []
    check = sources._check_expansion
    monkeypatch.setattr(sources, '_check_expansion', lambda *args: caps.append(args[-1]) or check(*args))
    with pytest.raises(CheckpointError, match='disagrees|effnet_v1_b0'):
        convert(str(archive), tmp_path / 'out', variant='effnet_v1_b0', tag='none')
    b0_numel = 5_288_548 + 42_560  # parameters + BatchNorm statistics
    assert caps == [_unpack_cap('effnet_v1_b0')] and 16 * b0_numel < caps[0] < 17 * b0_numel + (16 << 20)
