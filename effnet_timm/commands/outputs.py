"""Output paths checked before a command's work starts, so that an hour of evaluation or a download does not end in
a file that cannot be written. Each problem is one :class:`InputError` line (exit 2) that names only paths that
exist: the deepest existing folder on the way, or the path itself when it is there.

Permission bits are not enough to decide (root ignores them; a read-only mount or a file in the middle of the path
stops root too), so a folder is tried: a temporary file (or folder) is created in it and removed at once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError

__all__ = ['check_distinct', 'check_output_file', 'check_output_folder', 'check_weights_cache', 'same_file']


def _deepest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or '.')


def _strerror(err: OSError) -> str:
    return err.strerror or str(err)


def _try_create(folder: Path, what: str, make_folder: bool) -> None:
    try:
        if make_folder:
            os.rmdir(tempfile.mkdtemp(prefix='.effnet-timm-check-', dir=folder))
        else:
            fd, tmp = tempfile.mkstemp(prefix='.effnet-timm-check-', dir=folder)
            os.close(fd)
            os.unlink(tmp)
    except OSError as err:
        raise InputError(f'{folder}: cannot create {what} in this folder ({_strerror(err)})') from None


def _check_folder_on_the_way(folder: Path, what: str, create_missing: bool, make_folder: bool = False) -> None:
    """``folder`` is where the output goes: it must be (or, with ``create_missing``, become) a folder in which a
    file (``make_folder``: a folder) can be created."""
    existing = _deepest_existing(folder)
    if not existing.is_dir():
        raise InputError(f'{existing}: is a file, not a folder, so {what} cannot be written under it')
    if existing != folder and not create_missing:
        missing = os.path.relpath(folder, existing)
        raise InputError(f'{existing}: has no folder {missing} to write {what} in (create it first)')
    _try_create(existing, what, make_folder=make_folder or existing != folder)


def check_output_file(path: Path, option: str) -> None:
    """``path`` can be written as a new file (replacing the file there, if any) by ``option``'s writer, which
    writes a temporary file beside it and renames it over ``path``."""
    path = Path(path).absolute()
    if path.is_dir():
        raise InputError(f'{path}: is a folder; {option} takes a file name')
    _check_folder_on_the_way(path.parent, option, create_missing=False)


def check_output_folder(path: Path, what: str, made_beside: bool = False) -> None:
    """``path`` can be made as a folder (its missing parents too), or is a folder that can be written in.

    ``made_beside``: the writer builds the folder under a temporary name beside ``path`` and renames it into place
    (``effnet-convert --out``), so what matters is its parent, whether or not ``path`` exists."""
    path = Path(path).absolute()
    if not made_beside:
        if path.is_dir():
            _try_create(path, what, make_folder=False)
            return
        if os.path.lexists(path):
            raise InputError(f'{path}: is a file, not a folder, so {what} cannot be written there')
    _check_folder_on_the_way(path.parent, what, create_missing=True, make_folder=True)


def same_file(a: Path, b: Path) -> bool:
    """Whether two output paths name one file (through '..', symlinks or hard links)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_distinct(outputs: dict[str, Path | None]) -> None:
    """No two of the given outputs (option -> path, None when not given) are one file: the last written would
    silently replace the other."""
    given = [(option, path) for option, path in outputs.items() if path is not None]
    for i, (option, path) in enumerate(given):
        for other, other_path in given[i + 1 :]:
            if same_file(path, other_path):
                raise InputError(f'{option} and {other} name the same file; give each its own')


def check_weights_cache(pairs: Sequence[tuple[str, str]]) -> None:
    """The weights cache can take the entries of ``(variant, tag)`` ``pairs`` that it lacks (``effnet-timm
    download``); when every entry is there, nothing will be written and a read-only cache is fine."""
    from ..weights.cache import ENV_CACHE, cache_root, entry_dir

    if all(entry_dir(variant, tag).is_dir() for variant, tag in pairs):
        return
    check_output_folder(cache_root(), f'the weights cache ({ENV_CACHE})')
