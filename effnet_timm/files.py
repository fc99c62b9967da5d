"""Writing files whole or not at all, with the permissions any new file gets (the umask applied by the kernel).

The process umask is never read by setting it (`os.umask(0)` changes it for every thread of the process while
it is set, so another thread could create a world-writable file); new files are made by `open()`, whose mode
the kernel masks.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ['new_file_mode', 'write_atomic']


def _temp_beside(path: Path) -> Path:
    return path.with_name(f'.{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp')


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` through a new file beside it, renamed over `path` when complete: a reader sees the
    old file or the new one, never a part, and nothing is left behind on failure. Text is written as UTF-8
    with no newline translation."""
    path = Path(path)
    tmp = _temp_beside(path)
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, 'xb') as f:  # O_EXCL; mode 0o666 less the umask, applied by the kernel
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def new_file_mode(folder: str | os.PathLike) -> int:
    """The permission bits `open()` gives a new file in `folder` (0o666 less the umask): for a file a library
    created private (safetensors writes 0o600) that should get the mode of any other output."""
    probe = _temp_beside(Path(folder) / 'mode-probe')
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
