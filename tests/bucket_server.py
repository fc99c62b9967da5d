"""The official checkpoint bucket on 127.0.0.1 for tests: files served at their bucket paths with the headers
Google Cloud Storage sends (Content-Length, ETag, Last-Modified, `X-Goog-Hash: crc32c=<b64>,md5=<b64>` of the whole
object, also on ranged answers), `Range` / `If-Range` support, a request log and injectable faults (including the
ones of a hostile or careless mirror: no hash, a resumed answer from another object, a trickle that never ends).
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import crc32c

LIFETIME_S = 600  # the server stops by itself even if a test forgets to


@dataclass
class Fault:
    """What to do instead of a clean answer, for the next `times` GETs of a path (None: every one)."""

    # 'status' | 'truncate' | 'bad_hash' | 'stall' | 'no_hash' (no X-Goog-Hash) | 'trickle' (`after` bytes, then
    # one byte every `interval` s while the connection lasts) | 'range_no_hash' (a 206 answer without X-Goog-Hash and
    # with a flipped byte) | 'range_other' (a 206 answer with the bytes and X-Goog-Hash of another object);
    # the 'range_*' kinds apply to (and are used up by) ranged requests only
    kind: str
    status: int = 500
    after: int = 0  # truncate/stall/trickle: bytes of the body sent first
    times: int | None = None
    interval: float = 0.05


def goog_hash(data: bytes) -> str:
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    crc = base64.b64encode(crc32c.crc32c(data).to_bytes(4, 'big')).decode()
    return f'crc32c={crc},md5={md5}'


class BucketServer:
    """`with BucketServer() as bucket:` serves `bucket.files` (path -> bytes) on `bucket.root`."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, Fault] = {}
        self.requests: list[str] = []  # 'GET /path bytes=N-' in arrival order
        self.release = threading.Event()  # a 'stall' fault holds its connection until this is set
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(('127.0.0.1', 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.root = f'http://127.0.0.1:{self._httpd.server_address[1]}'
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs=dict(poll_interval=0.1), daemon=True)
        self._timer = threading.Timer(LIFETIME_S, self._httpd.shutdown)
        self._timer.daemon = True

    def __enter__(self) -> BucketServer:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def gets(self, path: str) -> list[str]:
        """The GET requests for `path` so far (with their Range header, if any)."""
        with self._lock:
            return [r for r in self.requests if r.split()[:2] == ['GET', path]]

    def fault_for(self, path: str, ranged: bool = False) -> Fault | None:
        with self._lock:
            fault = self.faults.get(path)
            if fault is None or (fault.kind.startswith('range_') and not ranged):
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self.faults[path]
            return fault

    def record(self, entry: str) -> None:
        with self._lock:
            self.requests.append(entry)


def _handler_for(bucket: BucketServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'
        timeout = 30

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def _answer(self, send_body: bool) -> None:
            path = self.path.split('?')[0]
            range_header = self.headers.get('Range', '')
            bucket.record(f'{self.command} {path} {range_header}'.strip())
            data = bucket.files.get(path)
            if data is None:
                return self._plain(404, b'<Error><Code>NoSuchKey</Code></Error>')
            etag = f'"{hashlib.md5(data).hexdigest()}"'
            start = 0
            if range_header.startswith('bytes=') and self.headers.get('If-Range', etag) == etag:
                start = int(range_header[len('bytes=') :].split('-')[0])
                if start >= len(data):
                    return self._plain(416, b'<Error><Code>InvalidRange</Code></Error>')
            fault = bucket.fault_for(path, ranged=bool(start)) if send_body else None
            if fault and fault.kind == 'status':
                return self._plain(fault.status, b'<Error><Code>InternalError</Code></Error>')
            hashes = goog_hash(data)
            if fault and fault.kind == 'range_other':
                data = bytes(b ^ 0x55 for b in data)
                hashes = goog_hash(data)
            body = data[start:]
            if fault and fault.kind == 'range_no_hash':
                body = bytes([body[0] ^ 1]) + body[1:]
            self.send_response(206 if start else 200)
            self.send_header('Content-Type', 'application/x-tar')
            self.send_header('Content-Length', str(len(body)))
            if start:
                self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
            self.send_header('Accept-Ranges', 'bytes')
            self.send_header('ETag', etag)
            self.send_header('Last-Modified', 'Tue, 11 Feb 2020 18:00:00 GMT')
            if fault and fault.kind == 'bad_hash':
                hashes = goog_hash(data + b'x')
            if not (fault and fault.kind in ('no_hash', 'range_no_hash')):
                for item in hashes.split(','):  # GCS sends one X-Goog-Hash header per algorithm
                    self.send_header('X-Goog-Hash', item)
            self.end_headers()
            if not send_body:
                return
            if fault and fault.kind == 'truncate':
                self.wfile.write(body[: fault.after])
                self.wfile.flush()
                self.close_connection = True
                return
            if fault and fault.kind == 'trickle':
                self.wfile.write(body[: fault.after])
                for i in range(fault.after, len(body)):
                    if bucket.release.wait(fault.interval):
                        break
                    try:
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                    except OSError:
                        break
                self.close_connection = True
                return
            if fault and fault.kind == 'stall':
                self.wfile.write(body[: fault.after])
                self.wfile.flush()
                bucket.release.wait(LIFETIME_S)
                self.close_connection = True
                return
            self.wfile.write(body)

        def _plain(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header('Content-Type', 'application/xml')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            if self.command != 'HEAD':
                self.wfile.write(body)

    return Handler


def wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False
