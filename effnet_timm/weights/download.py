"""Fetch one file over HTTP(S) the way a large checkpoint must be fetched: streamed to `<dest>.part` with a
progress bar, resumed with a Range request after a dropped connection (also in a later process), retried with
backoff on 5xx answers and network errors, its length checked, and the `X-Goog-Hash` (crc32c and md5) that the
Google Cloud Storage bucket sends verified. Only a complete, verified file is renamed to `dest`.

Stdlib urllib only (it honours http(s)_proxy); the one error type is `DownloadError`, one line naming the URL.
"""

from __future__ import annotations

import base64
import hashlib
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

import crc32c

from ..errors import InputError, PretrainedWeightsError

__all__ = ['DownloadError', 'Downloaded', 'download', 'parse_goog_hash']

_logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 20.0
READ_TIMEOUT_S = 60.0  # the longest silence tolerated mid-body before the attempt counts as dropped
ATTEMPTS = 5  # EFFNET_TIMM_DOWNLOAD_ATTEMPTS overrides
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
    resumed: bool  # whether some bytes came from an earlier, interrupted attempt


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
    url: str, dest: Path, progress: bool | None = None, attempts: int | None = None, desc: str | None = None
) -> Downloaded:
    """Download `url` to `dest` (atomically); resume a `<dest>.part` left by an interrupted earlier call.

    progress: None shows the bar only when stderr is a terminal, False never.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, meta_path = dest.with_name(dest.name + '.part'), dest.with_name(dest.name + '.part.json')
    attempts = attempts or _attempts_from_env()
    state = _PartState(part, meta_path)
    resumed = state.size > 0
    requests = 0
    # Killed after the last byte but before the rename: verify what is there instead of asking for nothing (416).
    headers = state.complete(url)
    if headers is not None:
        try:
            result = _verify(url, part, headers)
        except DownloadError:
            state.discard()
            headers = None
    if headers is None:
        headers, result, requests = _fetch_with_retries(url, dest, state, progress, attempts, desc)
    os.replace(part, dest)
    meta_path.unlink(missing_ok=True)
    return Downloaded(dest, result[0], result[1], result[2], headers.goog_hash, requests, resumed)


def _attempts_from_env() -> int:
    value = os.environ.get('EFFNET_TIMM_DOWNLOAD_ATTEMPTS', '').strip()
    if not value:
        return ATTEMPTS
    try:
        attempts = int(value)
    except ValueError:
        attempts = 0
    if attempts < 1:
        raise InputError(f'EFFNET_TIMM_DOWNLOAD_ATTEMPTS={value!r}: expected an integer >= 1')
    return attempts


def _fetch_with_retries(
    url: str, dest: Path, state: _PartState, progress: bool | None, attempts: int, desc: str | None
):
    """(headers, verified (size, sha256, md5), requests made) of a fresh or resumed download into the `.part`."""
    requests = 0
    last_reason = ''
    for attempt in range(attempts):
        if attempt:
            wait = min(BACKOFF_S * 2 ** (attempt - 1), BACKOFF_MAX_S)
            _logger.info('%s: %s; retrying in %.0f s (attempt %d of %d)', url, last_reason, wait, attempt + 1, attempts)
            time.sleep(wait)
        requests += 1
        try:
            headers = _fetch_into(url, state, progress, desc or dest.name)
            break
        except _Retry as err:
            last_reason = str(err)
    else:
        raise DownloadError(
            f'cannot download {url}: {last_reason} (gave up after {attempts} attempts; '
            f'the partial file {state.part} is kept and resumed next time)'
        )
    try:
        return headers, _verify(url, state.part, headers), requests
    except DownloadError:
        state.discard()
        raise


@dataclass
class _Headers:
    total: int
    goog_hash: dict[str, str]


class _PartState:
    """`<dest>.part` and, beside it, what identifies the remote file its bytes came from (to resume safely)."""

    def __init__(self, part: Path, meta_path: Path):
        self.part, self.meta_path = part, meta_path
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

    def start(
        self, url: str, etag: str | None, last_modified: str | None, total: int, goog_hash: dict[str, str]
    ) -> None:
        # goog_hash too: a `.part` that is already complete is verified against it without asking again.
        self.meta = dict(url=url, etag=etag, last_modified=last_modified, total=total, goog_hash=goog_hash)
        self.meta_path.write_text(json.dumps(self.meta))

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
        return _Headers(total, {k: v for k, v in goog_hash.items() if k in ('crc32c', 'md5') and isinstance(v, str)})

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)
        self.meta = {}


def _fetch_into(url: str, state: _PartState, progress: bool | None, desc: str) -> _Headers:
    offset = state.size if state.meta.get('url') == url and state.validator() else 0
    if offset == 0 and state.size:
        state.discard()
    request = urllib.request.Request(url, headers={'User-Agent': _USER_AGENT, 'Accept-Encoding': 'identity'})
    if offset:
        request.add_header('Range', f'bytes={offset}-')
        request.add_header('If-Range', state.validator())
    try:
        response = urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S)
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
        raise _Retry(_reason(err)) from None
    with response:
        _set_read_timeout(response)
        total, offset = _range_of(url, response, offset, state)
        headers = _Headers(total, parse_goog_hash(response.headers.get_all('X-Goog-Hash')))
        _stream(url, response, state, offset, total, progress, desc)
    return headers


def _range_of(url: str, response, offset: int, state: _PartState):
    """(total size, offset the body starts at), and (re)start the `.part` file on a full answer."""
    length = response.headers.get('Content-Length')
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
        return total, offset
    if response.status != 200:
        raise DownloadError(f'cannot download {url}: HTTP {response.status} {response.reason}')
    if length is None:  # a length is what tells a complete body from a dropped one
        raise DownloadError(f'cannot download {url}: the server sent no Content-Length')
    state.part.write_bytes(b'')
    state.start(
        url,
        response.headers.get('ETag'),
        response.headers.get('Last-Modified'),
        int(length),
        parse_goog_hash(response.headers.get_all('X-Goog-Hash')),
    )
    return int(length), 0


def _stream(url: str, response, state: _PartState, offset: int, total: int, progress: bool | None, desc: str) -> None:
    from tqdm import tqdm

    received = offset
    try:
        # Unbuffered appends and read1: what was received is on disk, so a killed process resumes from it.
        with (
            open(state.part, 'ab', buffering=0) as out,
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
    except (OSError, http.client.HTTPException) as err:  # dropped connection, read timeout
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


def _verify(url: str, part: Path, headers: _Headers):
    size = part.stat().st_size
    if size != headers.total:
        raise DownloadError(f'cannot download {url}: {size} bytes on disk, the server announced {headers.total}')
    sha256, md5, crc = hashlib.sha256(), hashlib.md5(), 0
    with open(part, 'rb') as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            md5.update(chunk)
            crc = crc32c.crc32c(chunk, crc)
    found = {
        'md5': base64.b64encode(md5.digest()).decode(),
        'crc32c': base64.b64encode(crc.to_bytes(4, 'big')).decode(),
    }
    for name, expected in headers.goog_hash.items():
        if found[name] != expected:
            raise DownloadError(
                f'cannot download {url}: {name} of the {size} bytes received is {found[name]}, '
                f'X-Goog-Hash says {expected} (corrupted in transit or replaced); nothing kept'
            )
    return size, sha256.hexdigest(), md5.hexdigest()


def _set_read_timeout(response) -> None:
    # urllib applies one timeout to connecting; reading a large body may need a different patience.
    sock = getattr(getattr(getattr(response, 'fp', None), 'raw', None), '_sock', None)
    if isinstance(sock, socket.socket):
        sock.settimeout(READ_TIMEOUT_S)


def _reason(err: BaseException) -> str:
    reason = getattr(err, 'reason', None) or err
    text = ' '.join(str(reason).split()) or type(err).__name__
    return text if not isinstance(reason, (socket.timeout, TimeoutError)) else f'timed out ({text})'
