"""Fetch one file over HTTP(S) the way a large checkpoint must be fetched: streamed to `<dest>.part` with a
progress bar, resumed with a Range request after a dropped connection (also in a later process), retried with
backoff on 5xx answers and network errors, bounded in time, its length checked, and its content verified against
what is known of it: a pinned sha256 and size, and the `X-Goog-Hash` (crc32c, and md5 where sent) that the Google
Cloud Storage bucket sends for the whole object. Only a complete, verified file is renamed to `dest`.

Time bounds (environment variables; a download past them fails in one line naming the URL and what was received,
and keeps its `.part` for the next call only when bytes arrived):
    EFFNET_TIMM_DOWNLOAD_DEADLINE_S     total seconds for one download, retries included (default 21600: 6 h)
    EFFNET_TIMM_DOWNLOAD_MIN_BPS        minimum bytes per second, averaged over each window (default 16384; 0: off)
    EFFNET_TIMM_DOWNLOAD_RATE_WINDOW_S  the window the minimum throughput is measured over (default 60)
    EFFNET_TIMM_DOWNLOAD_ATTEMPTS       attempts on transient failures (default 5)

Stdlib urllib only (it honours http(s)_proxy); the one error type is `DownloadError`, one line naming the URL.
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..env import env_float, env_int
from ..errors import PretrainedWeightsError
from ..files import write_atomic
from .integrity import digest_file

__all__ = ['ENV_ALLOW_UNVERIFIED', 'DownloadError', 'Downloaded', 'download', 'parse_goog_hash']

_logger = logging.getLogger(__name__)

ENV_ALLOW_UNVERIFIED = 'EFFNET_TIMM_ALLOW_UNVERIFIED'  # =1: accept an unpinned file that comes without X-Goog-Hash
CONNECT_TIMEOUT_S = 20.0
READ_TIMEOUT_S = 60.0  # the longest silence tolerated mid-body before the attempt counts as dropped
ATTEMPTS = 5  # EFFNET_TIMM_DOWNLOAD_ATTEMPTS overrides
DEADLINE_S = 6 * 3600.0  # EFFNET_TIMM_DOWNLOAD_DEADLINE_S overrides: an L2 tarball at a slow 1 MB/s fits
MIN_BPS = 16 * 1024.0  # EFFNET_TIMM_DOWNLOAD_MIN_BPS overrides: a trickle that keeps a connection alive is refused
RATE_WINDOW_S = 60.0  # EFFNET_TIMM_DOWNLOAD_RATE_WINDOW_S overrides
BACKOFF_S = 1.0  # waits 1, 2, 4, 8 s between attempts (capped at BACKOFF_MAX_S)
BACKOFF_MAX_S = 30.0
_CHUNK = 1 << 20
_USER_AGENT = 'effnet-timm (+https://github.com/tensorflow/tpu checkpoints, Python urllib)'


class DownloadError(PretrainedWeightsError):
    """A download that failed for good (after retries where retrying makes sense); one line naming the URL."""


class _Retry(Exception):
    """A transient failure: dropped connection, timeout, 5xx. The `.part` file is kept for resuming."""


@dataclass
class Downloaded:
    path: Path
    size: int
    sha256: str
    md5: str
    goog_hash: dict[str, str]  # what X-Goog-Hash said (and was verified against); empty when not sent
    requests: int  # HTTP requests made (1 for a clean download)
    resumed: bool  # whether the file kept bytes of an earlier request (a 206 answer, or a complete `.part`)


@dataclass
class _Limits:
    attempts: int
    deadline_s: float
    min_bps: float
    window_s: float
    started: float

    def left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.started)


def parse_goog_hash(values) -> dict[str, str]:
    """'crc32c=AAAAAA==,md5=1B2M2Y8AsgTpgAmY7PhCfg==' (one header or several) -> {'crc32c': ..., 'md5': ...}."""
    found: dict[str, str] = {}
    for value in values or ():
        for item in value.split(','):
            name, sep, digest = item.strip().partition('=')
            if sep and name.strip().lower() in ('crc32c', 'md5'):
                found[name.strip().lower()] = digest.strip()
    return found


def download(
    url: str,
    dest: Path,
    progress: bool | None = None,
    attempts: int | None = None,
    desc: str | None = None,
    *,
    sha256: str | None = None,
    size: int | None = None,
    require_hash: bool = False,
    keep_partial: bool = True,
) -> Downloaded:
    """Download `url` to `dest` (atomically); resume a `<dest>.part` left by an interrupted earlier call.

    Args:
        progress: None shows the bar only when stderr is a terminal, False never.
        sha256, size: what the file must be (a pin); checked whatever the server says.
        require_hash: without a `sha256`, refuse a server that sends no `X-Goog-Hash` crc32c for the file (the
            message names `EFFNET_TIMM_ALLOW_UNVERIFIED`, the caller's opt-in to accept such a mirror).
        keep_partial: keep a `.part` that received bytes for a later call to resume (False: a caller whose folder
            goes anyway; no message then names it).
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f'{err.filename or dest.parent}: cannot write ({err.strerror or err})') from None
    part, meta_path = dest.with_name(dest.name + '.part'), dest.with_name(dest.name + '.part.json')
    limits = _Limits(
        attempts or env_int('EFFNET_TIMM_DOWNLOAD_ATTEMPTS', ATTEMPTS, 1),
        env_float('EFFNET_TIMM_DOWNLOAD_DEADLINE_S', DEADLINE_S, minimum=1e-3),
        env_float('EFFNET_TIMM_DOWNLOAD_MIN_BPS', MIN_BPS, minimum=0.0),
        env_float('EFFNET_TIMM_DOWNLOAD_RATE_WINDOW_S', RATE_WINDOW_S, minimum=1e-3),
        time.monotonic(),
    )
    expect = _Expect(sha256.lower() if sha256 else None, size, require_hash)
    state = _PartState(part, meta_path, keep_partial)
    requests = 0
    # Killed after the last byte but before the rename: verify what is there instead of asking for nothing (416).
    headers = state.complete(url)
    result = None
    if headers is not None:
        try:
            result = _verify(url, part, headers, expect)
        except DownloadError:
            state.discard()
            headers = None
    if headers is None:
        try:
            headers, result, requests = _fetch_with_retries(url, dest, state, progress, limits, desc, expect)
        except BaseException:
            if not keep_partial:
                state.discard()
            raise
    os.replace(part, dest)
    resumed = bool(state.meta.get('resumed')) or requests == 0
    meta_path.unlink(missing_ok=True)
    return Downloaded(dest, result[0], result[1], result[2], headers.goog_hash, requests, resumed)


@dataclass
class _Expect:
    sha256: str | None
    size: int | None
    require_hash: bool


def _fetch_with_retries(
    url: str,
    dest: Path,
    state: _PartState,
    progress: bool | None,
    limits: _Limits,
    desc: str | None,
    expect: _Expect,
):
    """(headers, verified (size, sha256, md5), requests made) of a fresh or resumed download into the `.part`."""
    requests = 0
    last_reason = ''
    for attempt in range(limits.attempts):
        if attempt:
            wait = min(BACKOFF_S * 2 ** (attempt - 1), BACKOFF_MAX_S, max(limits.left(), 0.0))
            _logger.info(
                '%s: %s; retrying in %.0f s (attempt %d of %d)', url, last_reason, wait, attempt + 1, limits.attempts
            )
            time.sleep(wait)
        if limits.left() <= 0:
            raise _past_deadline(url, state, limits, last_reason)
        requests += 1
        try:
            headers = _fetch_into(url, state, progress, desc or dest.name, limits, expect)
            break
        except _Retry as err:
            last_reason = str(err)
    else:
        spent = time.monotonic() - limits.started
        raise DownloadError(
            f'cannot download {url}: {last_reason} (gave up after {limits.attempts} attempts in {spent:.0f} s'
            f'{_kept(state)})'
        )
    try:
        return headers, _verify(url, state.part, headers, expect), requests
    except DownloadError:
        state.discard()
        raise


def _kept(state: _PartState) -> str:
    """'; the partial file … is kept' when bytes arrived (the `.part` is then resumed next time); else it goes."""
    if state.keep and state.size > 0 and state.meta:
        return f'; the partial file {state.part} ({state.size} bytes) is kept and resumed next time'
    state.discard()
    return ''


def _past_deadline(url: str, state: _PartState, limits: _Limits, why: str = '') -> DownloadError:
    total = state.meta.get('total')
    of = f' of {total}' if isinstance(total, int) else ''
    last = f'; last: {why}' if why else ''
    return DownloadError(
        f'cannot download {url}: not finished within EFFNET_TIMM_DOWNLOAD_DEADLINE_S={limits.deadline_s:g} s '
        f'({state.size}{of} bytes received{last}{_kept(state)})'
    )


@dataclass
class _Headers:
    total: int
    goog_hash: dict[str, str]


class _PartState:
    """`<dest>.part` and, beside it, what identifies the remote file its bytes came from (to resume safely)."""

    def __init__(self, part: Path, meta_path: Path, keep: bool = True):
        self.part, self.meta_path, self.keep = part, meta_path, keep
        self.meta: dict[str, object] = {}
        if part.exists():
            try:
                self.meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                self.discard()  # bytes of unknown origin are never resumed
        else:
            meta_path.unlink(missing_ok=True)

    @property
    def size(self) -> int:
        try:
            return self.part.stat().st_size
        except FileNotFoundError:
            return 0

    def validator(self) -> str | None:
        # If-Range: the server sends the whole file (200) instead of the rest when the file changed since.
        value = self.meta.get('etag') or self.meta.get('last_modified')
        return value if isinstance(value, str) and value else None

    def recorded_hash(self) -> dict[str, str]:
        value = self.meta.get('goog_hash')
        return {k: v for k, v in value.items() if k in ('crc32c', 'md5') and isinstance(v, str)} if value else {}

    def start(
        self, url: str, etag: str | None, last_modified: str | None, total: int, goog_hash: dict[str, str]
    ) -> None:
        # goog_hash of the first answer: a resumed answer must say the same, and the whole file is checked against it.
        self.meta = dict(url=url, etag=etag, last_modified=last_modified, total=total, goog_hash=goog_hash)
        self._save()

    def mark_resumed(self) -> None:
        self.meta['resumed'] = True
        self._save()

    def _save(self) -> None:
        write_atomic(self.meta_path, json.dumps(self.meta))

    def complete(self, url: str) -> _Headers | None:
        """The headers recorded for `url` when the `.part` already holds all its bytes, else None."""
        total, goog_hash = self.meta.get('total'), self.meta.get('goog_hash')
        if (
            self.meta.get('url') != url
            or not isinstance(total, int)
            or total <= 0
            or self.size != total
            or not isinstance(goog_hash, dict)
        ):
            return None
        return _Headers(total, self.recorded_hash())

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)
        self.meta = {}


def _fetch_into(
    url: str, state: _PartState, progress: bool | None, desc: str, limits: _Limits, expect: _Expect
) -> _Headers:
    offset = state.size if state.meta.get('url') == url and state.validator() else 0
    if offset == 0 and (state.size or state.meta):
        state.discard()
    request = urllib.request.Request(url, headers={'User-Agent': _USER_AGENT, 'Accept-Encoding': 'identity'})
    if offset:
        request.add_header('Range', f'bytes={offset}-')
        request.add_header('If-Range', state.validator())
    try:
        response = urllib.request.urlopen(request, timeout=min(CONNECT_TIMEOUT_S, max(limits.left(), 1e-3)))
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:  # asked past the end: the bytes kept do not match the file; start over
            state.discard()
            raise _Retry(f'HTTP 416 on resume at byte {offset}') from None
        if err.code >= 500 or err.code in (408, 429):
            raise _Retry(f'HTTP {err.code} {err.reason}') from None
        state.discard()
        raise DownloadError(f'cannot download {url}: HTTP {err.code} {err.reason}') from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, 'reason', None)
        if isinstance(reason, socket.gaierror) or isinstance(err, socket.gaierror):
            # A name that does not resolve stays so for the next seconds: no retries, no partial file named.
            raise DownloadError(f'cannot download {url}: {_reason(err)} (the host name does not resolve)') from None
        raise _Retry(_reason(err)) from None
    with response:
        _set_read_timeout(response, limits)
        total, offset = _range_of(url, response, offset, state, expect)
        _stream(url, response, state, offset, total, progress, desc, limits)
    return _Headers(total, state.recorded_hash())


def _range_of(url: str, response, offset: int, state: _PartState, expect: _Expect):
    """(total size, offset the body starts at), and (re)start the `.part` file on a full answer."""
    length = response.headers.get('Content-Length')
    goog_hash = parse_goog_hash(response.headers.get_all('X-Goog-Hash'))
    if response.status == 206:
        content_range = response.headers.get('Content-Range', '')
        try:
            unit_start, _, total = content_range.partition('/')
            start = int(unit_start.split()[1].split('-')[0])
            total = int(total)
        except (IndexError, ValueError):
            raise DownloadError(f'cannot download {url}: unreadable Content-Range {content_range!r}') from None
        if start != offset:
            state.discard()
            raise _Retry(f'the server resumed at byte {start}, not {offset}')
        if goog_hash != state.recorded_hash() or total != state.meta.get('total'):
            # The rest must come from the object the first bytes came from: the hash that will check the whole file
            # is the first answer's, and a resumed answer that says otherwise (or nothing) starts the file over.
            state.discard()
            raise _Retry(
                f'the resumed answer describes another file (X-Goog-Hash {goog_hash or "absent"}, '
                f'first answer {state.recorded_hash() or "absent"}); restarting from byte 0'
            )
        state.mark_resumed()
        return total, offset
    if response.status != 200:
        raise DownloadError(f'cannot download {url}: HTTP {response.status} {response.reason}')
    if length is None:  # a length is what tells a complete body from a dropped one
        raise DownloadError(f'cannot download {url}: the server sent no Content-Length')
    if expect.size is not None and int(length) != expect.size:
        raise DownloadError(
            f'cannot download {url}: the server announces {int(length)} bytes, the pinned file has {expect.size}'
        )
    if expect.sha256 is None and expect.require_hash and 'crc32c' not in goog_hash:
        raise DownloadError(
            f'cannot download {url}: the server sends no X-Goog-Hash to check the file against and no sha256 is '
            f'pinned for it; set {ENV_ALLOW_UNVERIFIED}=1 to accept this mirror unverified'
        )
    try:
        state.part.write_bytes(b'')
        state.start(url, response.headers.get('ETag'), response.headers.get('Last-Modified'), int(length), goog_hash)
    except OSError as err:
        state.discard()
        raise DownloadError(f'{err.filename or state.part}: cannot write ({err.strerror or err})') from None
    return int(length), 0


def _stream(
    url: str,
    response,
    state: _PartState,
    offset: int,
    total: int,
    progress: bool | None,
    desc: str,
    limits: _Limits,
) -> None:
    from tqdm import tqdm

    received = offset
    try:
        out = open(state.part, 'ab', buffering=0)  # unbuffered appends: a killed process resumes from what is on disk
    except OSError as err:  # a permission problem is not a dropped connection: one line at once
        raise DownloadError(f'{state.part}: cannot write ({err.strerror or err})') from None
    window_start, window_bytes = time.monotonic(), received
    try:
        with (
            out,
            tqdm(
                total=total,
                initial=offset,
                unit='B',
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=None if progress is None else not progress,
                leave=False,
            ) as bar,
        ):
            while received < total:
                chunk = response.read1(min(_CHUNK, total - received))
                if not chunk:
                    break
                _write(out, chunk, state)
                received += len(chunk)
                bar.update(len(chunk))
                now = time.monotonic()
                if limits.left() <= 0 and received < total:
                    raise _past_deadline(url, state, limits)
                if now - window_start >= limits.window_s:
                    rate = (received - window_bytes) / (now - window_start)
                    if rate < limits.min_bps:
                        raise DownloadError(
                            f'cannot download {url}: {rate:.0f} bytes/s over the last {now - window_start:.0f} s, '
                            f'below EFFNET_TIMM_DOWNLOAD_MIN_BPS={limits.min_bps:g} ({received} of {total} bytes '
                            f'received{_kept(state)})'
                        )
                    window_start, window_bytes = now, received
    except (OSError, http.client.HTTPException) as err:  # dropped connection, read timeout
        if limits.left() <= 0:
            raise _past_deadline(url, state, limits, _reason(err)) from None
        raise _Retry(f'{_reason(err)} after {received} of {total} bytes') from None
    if received != total:  # http.client ends a short body silently when the server closes early
        raise _Retry(f'connection closed after {received} of {total} bytes')


def _write(out, chunk: bytes, state: _PartState) -> None:
    # A full disk is not a dropped connection: no retry, and the partial file goes (it holds the space).
    try:
        out.write(chunk)
    except OSError as err:
        state.discard()
        raise DownloadError(f'{state.part}: cannot write ({err.strerror or err})') from None


def _verify(url: str, part: Path, headers: _Headers, expect: _Expect):
    """(size, sha256, md5) of the complete `.part`, checked against the pin and the first answer's X-Goog-Hash."""
    size = part.stat().st_size
    if size != headers.total:
        raise DownloadError(f'cannot download {url}: {size} bytes on disk, the server announced {headers.total}')
    found = digest_file(part, ('sha256', 'md5', 'md5_b64', 'crc32c'))
    for name, expected in headers.goog_hash.items():
        actual = found['md5_b64' if name == 'md5' else name]
        if actual != expected:
            raise DownloadError(
                f'cannot download {url}: {name} of the {size} bytes received is {actual}, '
                f'X-Goog-Hash says {expected} (corrupted in transit or replaced); nothing kept'
            )
    if expect.sha256 is not None and found['sha256'] != expect.sha256:
        raise DownloadError(
            f'cannot download {url}: sha256 of the {size} bytes received is {found["sha256"]}, expected '
            f'{expect.sha256}; nothing kept'
        )
    if expect.sha256 is None and expect.require_hash and 'crc32c' not in headers.goog_hash:
        raise DownloadError(
            f'cannot download {url}: no X-Goog-Hash was recorded to check the file against and no sha256 is pinned '
            f'for it; set {ENV_ALLOW_UNVERIFIED}=1 to accept this mirror unverified; nothing kept'
        )
    return size, found['sha256'], found['md5']


def _set_read_timeout(response, limits: _Limits) -> None:
    # urllib applies one timeout to connecting; reading a large body may need a different patience, and never
    # more than the deadline or the throughput window leaves.
    sock = getattr(getattr(getattr(response, 'fp', None), 'raw', None), '_sock', None)
    if isinstance(sock, socket.socket):
        sock.settimeout(max(min(READ_TIMEOUT_S, limits.window_s, limits.left()), 1e-3))


def _reason(err: BaseException) -> str:
    reason = getattr(err, 'reason', None) or err
    text = ' '.join(str(reason).split()) or type(err).__name__
    if isinstance(reason, OSError) and reason.errno == errno.ECONNREFUSED:
        return f'connection refused ({text})'
    return text if not isinstance(reason, (socket.timeout, TimeoutError)) else f'timed out ({text})'
