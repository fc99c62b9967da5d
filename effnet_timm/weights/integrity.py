"""Integrity of converted folders: the size and sha256 of each file, recorded in config.json at conversion.

`effnet-convert` stores `file_digests(folder)` under `config['effnet_timm']['files']`; loaders call
`verify_folder(folder)` before trusting the weights, so flipped or truncated bytes are an error instead of
silently different logits. Folders without records (converted before records existed, or written by other
tools) are not checked: `verify_folder` returns without reading anything. This module is runtime code: it
needs neither TensorFlow nor the converter.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ['CONFIG_NAME', 'digest_file', 'file_digests', 'sha256_file', 'verify_folder']

CONFIG_NAME = 'config.json'
_CHUNK = 1 << 20  # 1 MiB reads: large enough that hashing, not the syscalls, sets the speed


def digest_file(path: Path, algorithms: Sequence[str] = ('sha256',)) -> dict[str, str]:
    """The digests of a file's bytes in one pass, read in chunks (memory stays flat for multi-GB files).

    'sha256', 'md5' and 'git_blob' (git's object id) give hex; 'md5_b64' and 'crc32c' the base64 form of Google
    Cloud Storage's `X-Goog-Hash`. The one place the project hashes files: the cache, the downloader, the converter
    and the Hub publisher all call it."""
    hashers = {
        name: hashlib.new(name) for name in ('sha256', 'md5') if name in algorithms or f'{name}_b64' in algorithms
    }
    if 'git_blob' in algorithms:  # the git object id the Hub reports for regular files
        hashers['git_blob'] = hashlib.sha1(b'blob %d\0' % Path(path).stat().st_size)
    crc = 0 if 'crc32c' in algorithms else None
    if crc is not None:
        import crc32c
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, 'rb') as f:
        while n := f.readinto(buffer):
            chunk = view[:n]
            for hasher in hashers.values():
                hasher.update(chunk)
            if crc is not None:
                crc = crc32c.crc32c(chunk, crc)
    found: dict[str, str] = {}
    for name in algorithms:
        if name in hashers:
            found[name] = hashers[name].hexdigest()
        elif name.endswith('_b64'):
            found[name] = base64.b64encode(hashers[name[:-4]].digest()).decode()
        elif name == 'crc32c':
            found[name] = base64.b64encode(crc.to_bytes(4, 'big')).decode()
        else:
            raise ValueError(f'unknown digest {name!r}')
    return found


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return digest_file(path)['sha256']


def file_digests(folder: Path, names: Sequence[str] = ('model.safetensors',)) -> dict[str, dict[str, Any]]:
    """{name: {'sha256': hex, 'size': bytes}} for each named file of `folder` (what config.json records)."""
    folder = Path(folder)
    records: dict[str, dict[str, Any]] = {}
    for name in names:
        path = folder / _plain_name(name, folder)
        try:
            size = path.stat().st_size
            records[name] = {'sha256': sha256_file(path), 'size': size}
        except OSError as err:
            raise InputError(f'{path}: cannot read ({err.strerror or err})') from None
    return records


def verify_folder(folder: Path) -> None:
    """Raise InputError (one line: file, expected vs found) when a file recorded in config.json differs.

    Sizes are compared first (free), then sha256. A folder whose config.json has no
    `effnet_timm.files` record (older conversions, folders not made by effnet-convert) passes unchecked.
    """
    folder = Path(folder)
    records = _recorded_files(folder)
    for name, record in records.items():
        path = folder / _plain_name(name, folder)
        expected_size, expected_sha = _record_fields(record, name, folder)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise InputError(f'{path}: missing (recorded in {folder / CONFIG_NAME})') from None
        except OSError as err:
            raise InputError(f'{path}: cannot read ({err.strerror or err})') from None
        if size != expected_size:
            raise InputError(
                f'{path}: {size} bytes, expected {expected_size} (recorded in {CONFIG_NAME}); '
                f'the file is damaged or was replaced: convert it again'
            )
        try:
            found = sha256_file(path)
        except OSError as err:
            raise InputError(f'{path}: cannot read ({err.strerror or err})') from None
        if found != expected_sha:
            raise InputError(
                f'{path}: sha256 {found[:12]}…, expected {expected_sha[:12]}… (recorded in '
                f'{CONFIG_NAME}); the file is damaged or was replaced: convert it again'
            )


def _recorded_files(folder: Path) -> dict[str, Any]:
    config_path = folder / CONFIG_NAME
    try:
        text = config_path.read_text(encoding='utf-8')
    except FileNotFoundError:
        return {}  # nothing recorded: a bare weights folder is loaded (and checked) by other means
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f'{config_path}: cannot read ({getattr(err, "strerror", None) or err})') from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f'{config_path}: not valid JSON ({err.msg} at line {err.lineno})') from None
    block = config.get('effnet_timm') if isinstance(config, dict) else None
    files = block.get('files') if isinstance(block, dict) else None
    if files is None:
        return {}
    if not isinstance(files, dict):
        raise InputError(f"{config_path}: 'effnet_timm.files' is {type(files).__name__}, expected an object")
    return files


def _record_fields(record: Any, name: str, folder: Path):
    size = record.get('size') if isinstance(record, dict) else None
    sha = record.get('sha256') if isinstance(record, dict) else None
    if not (
        isinstance(size, int)
        and not isinstance(size, bool)
        and size >= 0
        and isinstance(sha, str)
        and len(sha) == 64
        and all(c in '0123456789abcdef' for c in sha)
    ):
        raise InputError(
            f"{folder / CONFIG_NAME}: record of '{name}' is {record!r}, "
            f"expected {{'sha256': 64 hex digits, 'size': bytes}}"
        )
    return size, sha


def _plain_name(name: Any, folder: Path) -> str:
    # A record names a file of the folder itself: no paths, so config.json cannot point elsewhere.
    if not isinstance(name, str) or not name or name in ('.', '..') or '/' in name or '\\' in name or '\0' in name:
        raise InputError(f'{folder / CONFIG_NAME}: recorded file name {name!r} is not a plain file name')
    return name
