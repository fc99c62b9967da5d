"""Resolve the SOURCE a user names (directory, prefix, .index file, tarball or URL) to a checkpoint prefix."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tarfile
import tempfile
import urllib.parse
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NoReturn

from effnet_timm.errors import first_line
from effnet_timm.weights.integrity import sha256_file

from .errors import CheckpointError, OutputError
from .tf_bundle import TensorBundle, declared_data_size

_TAR_SUFFIXES = ('.tar.gz', '.tgz', '.tar')
_CHECKPOINT_PATH = re.compile(r'^\s*model_checkpoint_path\s*:\s*"([^"]*)"', re.MULTILINE)
_DATA_SHARD_SUFFIX = re.compile(r'\.data-\d{5}-of-\d{5}$')
_INDEX_MEMBER_LIMIT = 64 << 20  # an L2 index is well under 1 MiB
# Shards hold exactly the declared bytes; the factor and slack only absorb the checkpoint text file and
# directories, while a member of zeros claiming to be a shard cannot fill the disk.
_EXPANSION_FACTOR = 2
_EXPANSION_SLACK = 1 << 20
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass
class ResolvedSource:
    """A checkpoint found from SOURCE, with the files it consists of."""

    prefix: Path  # absolute; <prefix>.index exists
    files: list[Path]  # the index and every data shard
    origin: str  # SOURCE as the user gave it
    kind: str  # "directory", "prefix", "archive" or "url"
    archive_sha256: str | None = None  # of the tarball, for provenance; None for unpacked sources


def resolve_source(
    source: str, workdir: Path, expected_sha256: str | None = None, max_unpacked: int | None = None
) -> ResolvedSource:
    """Find the checkpoint ``source`` names; archives are unpacked (URLs downloaded first) into ``workdir``.

    ``expected_sha256`` is checked against the archive; it is an error for a source that is not an archive.
    ``max_unpacked``: bytes of checkpoint files an archive may unpack to at most, whatever its own index declares
    (the converter passes what the expected variant can hold).
    """
    if source.startswith(('http://', 'https://')):
        archive, digest = download(source, workdir, expected_sha256)
        return _from_archive(archive, workdir, source, 'url', digest, max_unpacked)
    path = Path(source).expanduser()
    if path.is_file() and path.name.lower().endswith(_TAR_SUFFIXES):
        digest = sha256_file(path)
        _check_sha256(str(path), expected_sha256, digest)
        return _from_archive(path, workdir, source, 'archive', digest, max_unpacked)
    if expected_sha256:
        raise CheckpointError(f'{source}: a sha256 can only be checked for a tarball or URL')
    if path.is_dir():
        return _resolved(_checkpoint_in_dir(path), source, 'directory')
    return _resolved(_prefix_of(path), source, 'prefix')


def download(url: str, workdir: Path, expected_sha256: str | None = None) -> tuple[Path, str]:
    """Download a tarball into ``workdir``; returns (path, sha256). Only a complete, verified file is kept.

    The one downloader of the project (`effnet_timm.weights.download`): retried and resumed within the call,
    bounded in time, checked against ``expected_sha256`` and the `X-Goog-Hash` the bucket sends."""
    from effnet_timm.errors import first_line
    from effnet_timm.weights.download import DownloadError
    from effnet_timm.weights.download import download as fetch

    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    if not name.lower().endswith(_TAR_SUFFIXES):
        raise CheckpointError(f'{url}: only .tar.gz, .tgz or .tar archives can be downloaded')
    try:
        got = fetch(url, workdir / name, desc=name, sha256=expected_sha256, keep_partial=False)
    except DownloadError as err:
        raise CheckpointError(first_line(err)) from None
    return got.path, got.sha256


def _check_sha256(label: str, expected: str | None, found: str) -> None:
    if expected and expected.strip().lower() != found:
        raise CheckpointError(f'{label}: sha256 mismatch (expected {expected.strip().lower()}, found {found})')


def _resolved(prefix: Path, origin: str, kind: str, archive_sha256: str | None = None) -> ResolvedSource:
    # Opening the bundle checks the index and that every data shard is there, so errors surface now.
    with TensorBundle(prefix.absolute()) as bundle:
        return ResolvedSource(bundle.prefix, bundle.files, origin, kind, archive_sha256)


def _prefix_of(path: Path) -> Path:
    """A prefix given directly, as its .index file or as one of its data shards."""
    text = str(path)
    prefix = Path(text[: -len('.index')] if text.endswith('.index') else _DATA_SHARD_SUFFIX.sub('', text))
    if not Path(f'{prefix}.index').is_file():
        raise CheckpointError(
            f'{path}: not a checkpoint directory, prefix, .index file, .tar.gz/.tgz/.tar or URL (no {prefix}.index)'
        )
    return prefix


def _checkpoint_in_dir(directory: Path, root: Path | None = None) -> Path:
    """The prefix the directory's ``checkpoint`` file names, else its only ``*.index``.

    ``root``: an unpacked archive's folder; the checkpoint file may then only name files inside it."""
    state = directory / 'checkpoint'
    if state.is_file():
        return _prefix_from_state(state, root)
    indexes = sorted(directory.glob('*.index'))
    if len(indexes) == 1:
        return indexes[0].with_suffix('')
    if not indexes:
        raise CheckpointError(f"{directory}: no 'checkpoint' file and no *.index file")
    names = ', '.join(index.name for index in indexes)
    raise CheckpointError(f"{directory}: several checkpoints and no 'checkpoint' file to choose one: {names}")


def _prefix_from_state(state: Path, root: Path | None = None) -> Path:
    match = _CHECKPOINT_PATH.search(state.read_text(errors='replace'))
    if not match:
        raise CheckpointError(f'{state}: no model_checkpoint_path line')
    named = match.group(1)
    stated = state.parent / named  # an absolute ``named`` replaces the directory
    # Checkpoints copied off the training machine keep its paths (even gs://...); the file beside us is meant.
    candidates = [stated, state.parent / PurePosixPath(named).name]
    if root is not None:
        # An archive is one file whose sha256 is recorded: it may not pull in files from outside itself,
        # whether by an absolute path, '..' or a symlink.
        inside = os.path.realpath(root)
        candidates = [p for p in candidates if _is_within(f'{p}.index', inside)]
    for prefix in candidates:
        if Path(f'{prefix}.index').is_file():
            return prefix
    where = ' inside the archive' if root is not None else ''
    raise CheckpointError(f'{state}: model_checkpoint_path "{named}" has no index file{where} ({stated}.index)')


def _is_within(path: str, root: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _from_archive(
    archive: Path, workdir: Path, origin: str, kind: str, digest: str, max_unpacked: int | None = None
) -> ResolvedSource:
    root = _extract(archive, workdir, max_unpacked)
    # The official tars disagree on their inner folder names, so look for the checkpoint wherever it is.
    folders = sorted({index.parent for index in root.rglob('*.index')})
    if not folders:
        raise CheckpointError(f'{archive}: archive holds no *.index file')
    if len(folders) > 1:
        names = ', '.join(str(folder.relative_to(root)) for folder in folders)
        raise CheckpointError(f'{archive}: archive holds checkpoints in several folders: {names}')
    prefix = _checkpoint_in_dir(folders[0], root)
    resolved = _resolved(prefix, origin, kind, digest)
    inside = os.path.realpath(root)
    outside = [str(f) for f in resolved.files if not _is_within(str(f), inside)]
    if outside:  # e.g. a data shard that is a symlink the safety checks let through
        raise CheckpointError(f'{archive}: checkpoint file {outside[0]} lies outside the archive')
    return resolved


def _extract(archive: Path, workdir: Path, max_unpacked: int | None = None) -> Path:
    """Unpack the checkpoint files into a new folder under ``workdir``, removed again if anything fails.

    Only what a checkpoint consists of is written (``checkpoint``, ``*.index``, data shards; not the
    ``.meta`` graph), and only if it fits what the index declares (`_check_expansion`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    stem = archive.name[: -len(next(s for s in _TAR_SUFFIXES if archive.name.lower().endswith(s)))]
    dest = Path(tempfile.mkdtemp(prefix=f'{stem}-', dir=workdir))
    try:
        with _open_tar(archive) as tar:
            members, indexes = _scan(tar, archive)
            _check_members(members, archive)
            wanted = [m for m in members if _is_checkpoint_member(m)]
            _check_expansion(members, wanted, indexes, archive, max_unpacked)
            # tarfile's own 'data' filter (Python >= 3.10.12 / 3.11.4) also resolves real paths while
            # extracting; older Pythons rely on _check_members alone.
            if hasattr(tarfile, 'data_filter'):
                tar.extractall(dest, wanted, filter='data')
            else:
                tar.extractall(dest, wanted)
    except OSError as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if exc.errno in _OUTPUT_ERRNOS:  # the disk or a limit, not the archive: the caller may keep the archive
            raise OutputError(
                f'{archive}: cannot unpack into {workdir} ({exc.strerror or first_line(exc, whole=True)})'
            ) from None
        raise CheckpointError(f'{archive}: cannot unpack ({first_line(exc, whole=True)})') from None
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise CheckpointError(f'{archive}: cannot unpack ({first_line(exc, whole=True)})') from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _open_tar(archive: Path) -> tarfile.TarFile:
    """The archive opened as what its first bytes say (gzip or plain tar), so a bad file gets one reason,
    not tarfile's list of every compression it tried."""
    with open(archive, 'rb') as f:
        head = f.read(2)
    if not head:
        raise CheckpointError(f'{archive}: empty file (0 bytes), not a tar archive')
    try:
        return tarfile.open(archive, 'r:gz' if head == b'\x1f\x8b' else 'r:')
    except tarfile.ReadError as exc:
        kind = 'gzip-compressed tar' if head == b'\x1f\x8b' else 'tar (or gzip-compressed tar)'
        raise CheckpointError(f'{archive}: not a {kind} archive ({first_line(exc, whole=True)})') from None


def _is_checkpoint_member(member: tarfile.TarInfo) -> bool:
    name = PurePosixPath(member.name).name
    if member.isdir():
        return True
    return name == 'checkpoint' or name.endswith('.index') or _DATA_SHARD_SUFFIX.search(name) is not None


def _scan(tar: tarfile.TarFile, archive: Path) -> tuple[list[tarfile.TarInfo], dict[str, bytes]]:
    """Every member, and the bytes of the ``*.index`` ones, in one forward pass over the (compressed) stream:
    reading an index later would rewind a gzip stream and decompress it all again."""
    members, indexes = [], {}
    while (member := tar.next()) is not None:
        members.append(member)
        if member.isreg() and member.name.endswith('.index'):
            if member.size > _INDEX_MEMBER_LIMIT:
                raise CheckpointError(
                    f"{archive}: member '{member.name}' is {member.size} bytes, more than an index can "
                    f'plausibly be ({_INDEX_MEMBER_LIMIT})'
                )
            f = tar.extractfile(member)
            assert f is not None
            indexes[member.name] = f.read()
    return members, indexes


def _check_expansion(
    members: list[tarfile.TarInfo],
    wanted: list[tarfile.TarInfo],
    indexes: dict[str, bytes],
    archive: Path,
    max_unpacked: int | None = None,
) -> None:
    """Refuse, before writing anything, an archive that would unpack to far more than its checkpoint needs.

    The data shards hold exactly the tensor bytes the index entries declare; a member's size is what tarfile
    writes for it (a hard link to a member not extracted writes that member's bytes)."""
    by_name = {_walk(PurePosixPath(m.name).parts, set()): m for m in members}
    declared = sum(declared_data_size(data, f'{archive}:{name}') for name, data in indexes.items())
    index_bytes = sum(len(data) for data in indexes.values())
    total = 0
    for member in wanted:
        if member.islnk():
            target = by_name.get(_walk(PurePosixPath(member.linkname).parts, set()))
            total += target.size if target is not None and target.isreg() else 0
        elif member.isreg():
            total += member.size
    limit = _EXPANSION_FACTOR * declared + index_bytes + _EXPANSION_SLACK
    if max_unpacked is not None and total > max_unpacked:  # what the archive declares is no bound on itself
        raise CheckpointError(
            f'{archive}: would unpack {total} bytes of checkpoint files, more than the {max_unpacked} that the '
            f'expected variant can hold (raw, EMA and optimizer slots)'
        )
    if total > limit:
        raise CheckpointError(
            f'{archive}: would unpack {total} bytes of checkpoint files, more than {limit} '
            f'({_EXPANSION_FACTOR}x the {declared} bytes of tensor data its index declares, plus the index and '
            f'{_EXPANSION_SLACK} bytes)'
        )


def _check_members(members: list[tarfile.TarInfo], archive: Path) -> None:
    """Refuse the whole archive if any member could land outside the folder or is a special file."""
    symlinks = {path for m in members if m.issym() and (path := _walk(PurePosixPath(m.name).parts, set()))}
    for member in members:
        _check_member(member, symlinks, archive)


def _check_member(member: tarfile.TarInfo, symlinks: set[str], archive: Path) -> None:
    def refuse(why: str) -> NoReturn:
        raise CheckpointError(f"{archive}: refusing unsafe member '{member.name}': {why}")

    name = PurePosixPath(member.name)
    if name.is_absolute():
        refuse('absolute path')
    if '..' in name.parts:
        refuse("'..' in its path")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        refuse('device, FIFO or other special file')
    if _walk(name.parts, symlinks) is None:
        refuse('its path goes through a symlink')
    link = PurePosixPath(member.linkname)
    if member.issym() and (link.is_absolute() or _walk((*name.parts[:-1], *link.parts), symlinks) is None):
        refuse(f"symlink to '{member.linkname}' outside the archive")
    if member.islnk() and (link.is_absolute() or _walk(link.parts, symlinks) is None):
        refuse(f"hard link to '{member.linkname}' outside the archive")


def _walk(parts: Iterable[str], symlinks: set[str]) -> str | None:
    """Resolve a path relative to the archive root lexically; None if it climbs above the root or passes
    through one of the archive's own symlinks (which extraction would follow, to anywhere)."""
    stack: list[str] = []
    for part in parts:
        if stack and '/'.join(stack) in symlinks:
            return None
        if part == '..':
            if not stack:
                return None
            stack.pop()
        elif part not in ('', '.'):
            stack.append(part)
    return '/'.join(stack)
