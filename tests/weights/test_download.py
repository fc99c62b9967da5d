"""The one downloader (`effnet_timm.weights.download`) against a loopback bucket that misbehaves: resumed answers that
describe another file, mirrors without hashes, trickles that never end, names that do not resolve, unwritable
folders. Each failure is one line naming the URL, and names a `.part` only when one is kept."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
from bucket_server import BucketServer, Fault

from effnet_timm.errors import InputError
from effnet_timm.weights.download import ENV_ALLOW_UNVERIFIED, DownloadError, download

DATA = os.urandom(300_000)


@pytest.fixture(scope='module')
def bucket():
    with BucketServer() as server:
        yield server


@pytest.fixture
def served(bucket, request):
    """A fresh path on the bucket serving DATA, and its URL."""
    path = f'/t/{request.node.name}.tar.gz'.replace('[', '-').replace(']', '')
    bucket.files[path] = DATA
    yield path, bucket.root + path
    bucket.faults.pop(path, None)
    bucket.release.set()


def _interrupted(bucket, path: str, url: str, dest, after: int = 100_000) -> None:
    """A first call that dies after `after` bytes, leaving a resumable `.part`."""
    bucket.faults[path] = Fault('truncate', after=after, times=1)
    with pytest.raises(DownloadError, match='is kept and resumed next time'):
        download(url, dest, progress=False, attempts=1)
    assert (dest.parent / (dest.name + '.part')).stat().st_size == after


@pytest.mark.parametrize('kind', ['range_no_hash', 'range_other'])
def test_resumed_answer_must_describe_the_file_of_the_first_answer(bucket, served, tmp_path, kind):
    """The hash recorded from the first answer checks the whole file: a resumed answer without X-Goog-Hash (whose
    bytes then cannot be checked) or with another object's bytes and hash restarts the file from byte 0."""
    path, url = served
    dest = tmp_path / 'f.tar.gz'
    _interrupted(bucket, path, url, dest)
    bucket.faults[path] = Fault(kind, times=1)
    got = download(url, dest, progress=False)
    assert dest.read_bytes() == DATA and got.sha256 == hashlib.sha256(DATA).hexdigest()
    assert bucket.gets(path)[-2:] == [f'GET {path} bytes=100000-', f'GET {path}']
    assert not got.resumed  # the truth: every byte came from the last answer


def test_clean_resume_reports_resumed(bucket, served, tmp_path):
    path, url = served
    dest = tmp_path / 'f.tar.gz'
    _interrupted(bucket, path, url, dest)
    got = download(url, dest, progress=False)
    assert dest.read_bytes() == DATA and got.resumed and got.requests == 1
    assert bucket.gets(path)[-1] == f'GET {path} bytes=100000-'


def test_pinned_sha256_and_size_are_checked(bucket, served, tmp_path):
    path, url = served
    good = hashlib.sha256(DATA).hexdigest()
    assert download(url, tmp_path / 'a.tar.gz', progress=False, sha256=good, size=len(DATA)).sha256 == good
    with pytest.raises(DownloadError, match=f'{url}: sha256 .* expected {"0" * 64}; nothing kept'):
        download(url, tmp_path / 'b.tar.gz', progress=False, sha256='0' * 64)
    seen = len(bucket.gets(path))
    with pytest.raises(DownloadError, match='announces 300000 bytes, the pinned file has 5'):
        download(url, tmp_path / 'c.tar.gz', progress=False, sha256=good, size=5)
    assert len(bucket.gets(path)) == seen + 1  # refused on the headers, not retried
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.tar.gz']


def test_mirror_without_hash_is_refused_unless_pinned(bucket, served, tmp_path):
    path, url = served
    bucket.faults[path] = Fault('no_hash')
    with pytest.raises(DownloadError) as err:
        download(url, tmp_path / 'a.tar.gz', progress=False, require_hash=True)
    assert str(err.value).startswith(f'cannot download {url}: the server sends no X-Goog-Hash')
    assert ENV_ALLOW_UNVERIFIED in str(err.value) and '.part' not in str(err.value)
    assert list(tmp_path.iterdir()) == []
    pinned = download(
        url, tmp_path / 'b.tar.gz', progress=False, require_hash=True, sha256=hashlib.sha256(DATA).hexdigest()
    )
    assert pinned.goog_hash == {} and (tmp_path / 'b.tar.gz').read_bytes() == DATA


def test_trickle_past_the_deadline_is_one_line_and_keeps_what_arrived(bucket, served, tmp_path, monkeypatch):
    path, url = served
    bucket.release.clear()
    bucket.faults[path] = Fault('trickle', after=5000, interval=0.02)
    monkeypatch.setenv('EFFNET_TIMM_DOWNLOAD_DEADLINE_S', '1.5')
    with pytest.raises(DownloadError) as err:
        download(url, tmp_path / 'a.tar.gz', progress=False)
    message = str(err.value)
    part = tmp_path / 'a.tar.gz.part'
    assert message.startswith(f'cannot download {url}: not finished within EFFNET_TIMM_DOWNLOAD_DEADLINE_S=1.5 s')
    assert f'of {len(DATA)} bytes received' in message and '\n' not in message
    assert str(part) in message and part.stat().st_size >= 5000  # what arrived is kept and named


def test_trickle_below_the_minimum_throughput_is_one_line(bucket, served, tmp_path, monkeypatch):
    path, url = served
    bucket.release.clear()
    bucket.faults[path] = Fault('trickle', after=1000, interval=0.02)
    monkeypatch.setenv('EFFNET_TIMM_DOWNLOAD_MIN_BPS', '2000')
    monkeypatch.setenv('EFFNET_TIMM_DOWNLOAD_RATE_WINDOW_S', '0.5')
    with pytest.raises(DownloadError) as err:
        download(url, tmp_path / 'a.tar.gz', progress=False)
    message = str(err.value)
    assert message.startswith(f'cannot download {url}: ') and 'below EFFNET_TIMM_DOWNLOAD_MIN_BPS=2000' in message
    assert f'of {len(DATA)} bytes received' in message and '\n' not in message


def test_silence_past_the_deadline_names_no_partial_file(bucket, served, tmp_path, monkeypatch):
    """No byte arrived: nothing is kept, and the message names no `.part`."""
    path, url = served
    bucket.release.clear()
    bucket.faults[path] = Fault('stall', after=0)
    monkeypatch.setenv('EFFNET_TIMM_DOWNLOAD_DEADLINE_S', '1')
    with pytest.raises(DownloadError) as err:
        download(url, tmp_path / 'a.tar.gz', progress=False)
    assert 'EFFNET_TIMM_DOWNLOAD_DEADLINE_S=1 s' in str(err.value) and '.part' not in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('name', ['EFFNET_TIMM_DOWNLOAD_DEADLINE_S', 'EFFNET_TIMM_DOWNLOAD_MIN_BPS'])
def test_bad_time_bound_variable_is_one_line(served, tmp_path, monkeypatch, name):
    monkeypatch.setenv(name, 'soon')
    with pytest.raises(InputError, match=f"{name}='soon'"):
        download(served[1], tmp_path / 'a.tar.gz', progress=False)


def test_name_that_does_not_resolve_is_not_retried(tmp_path, monkeypatch):
    import socket

    calls = []

    def no_such_host(*args, **kwargs):
        calls.append(args[0])
        raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')

    monkeypatch.setattr(socket, 'getaddrinfo', no_such_host)
    with pytest.raises(DownloadError) as err:
        download('http://no-such-host.invalid/x.tar.gz', tmp_path / 'x.tar.gz', progress=False)
    assert len(calls) == 1 and 'does not resolve' in str(err.value) and 'attempts' not in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes through permissions')
def test_unwritable_part_is_one_line_at_once(bucket, served, tmp_path):
    path, url = served
    folder = tmp_path / 'ro'
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    seen = len(bucket.gets(path))
    try:
        with pytest.raises(DownloadError, match='cannot write'):
            download(url, folder / 'a.tar.gz', progress=False)
    finally:
        folder.chmod(stat.S_IRWXU)
    assert len(bucket.gets(path)) - seen <= 1


def test_unwritable_part_file_is_one_line_at_once(bucket, served, tmp_path, monkeypatch):
    """A permission error on the `.part` (here: opening it to append) is no dropped connection: no retries."""
    import builtins

    path, url = served
    real_open = builtins.open

    def refusing_open(file, mode='r', *args, **kwargs):
        if str(file).endswith('.part') and 'a' in mode:
            raise PermissionError(13, 'Permission denied', str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, 'open', refusing_open)
    seen = len(bucket.gets(path))
    with pytest.raises(DownloadError, match='Permission denied') as err:
        download(url, tmp_path / 'a.tar.gz', progress=False)
    assert len(bucket.gets(path)) == seen + 1 and '\n' not in str(err.value)
