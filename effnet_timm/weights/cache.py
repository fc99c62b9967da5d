"""Pretrained weights of registered tags on first use: where they come from, what is checked, how they are cached.

Resolution order for `effnet_v1_bN.<tag>` with `pretrained=True` (explicit files and `hf-hub:` repos the user names
are handled by timm before, as the user's own choice):
  1. our cache of an earlier conversion (no network);
  2. the Hub repo `effnet-timm/<model>.<tag>`, only where its TAGS row pins a commit and the sha256 of its
     `model.safetensors` (`tags.hub_pin`); the file is checked against the pin before it is loaded, a mismatch is one
     warning line and falls through. No row is pinned today;
  3. the official TensorFlow tarball at `EFFNET_TIMM_CKPT_ROOT` (default: the official bucket), checked against its
     pinned sha256 and size (`pins.json`, whatever the source), else against the `X-Goog-Hash` the bucket sends for
     the whole file (an http(s) mirror that sends none is refused unless `EFFNET_TIMM_ALLOW_UNVERIFIED=1`; a local
     folder or file:// mirror is the user's own disk), converted without TensorFlow and cached.

Cache layout (root: `EFFNET_TIMM_CACHE`, else `$XDG_CACHE_HOME/effnet_timm`, else `~/.cache/effnet_timm`):

    <root>/effnet_v1_b0.aa_in1k/{model.safetensors,config.json,README.md,.verified.json}   one entry per tag and variant
    <root>/.locks/effnet_v1_b0.aa_in1k.lock                           held while an entry is made (filelock, NFS-safe)
    <root>/.tmp/effnet_v1_b0.aa_in1k/download/                        the resumable `.part`, or a verified tarball
    <root>/.tmp/effnet_v1_b0.aa_in1k/<host>-<pid>-*/                  staging of one process, removed when it ends

An entry appears by one `os.rename` of a complete folder, and is trusted only when its config.json carries the
`effnet_timm.cache` record (written last, before the rename) and the size + sha256 recorded for its weights match.
The sha256 is computed when the entry is filled; later loads compare the size, mtime, ctime and inode recorded in
`.verified.json` and hash again only when one changed (or with `effnet-timm download --verify`), so the ranks of a
job do not each read a multi-GB file. The lock is the `filelock` package's lock on a regular file: it dies with its
process, so a killed download never blocks; whoever takes it next resumes the `.part`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..env import env_flag
from ..errors import CheckpointError, InputError, OutputError, PretrainedWeightsError, first_line
from ..files import write_atomic
from .download import ENV_ALLOW_UNVERIFIED, download
from .integrity import file_digests, sha256_file, verify_folder
from .tags import OFFICIAL_CKPT_ROOT, TAGS, hub_pin, hub_repo_id, official_url, tarball_pin

__all__ = [
    'ENV_ALLOW_UNVERIFIED',
    'ENV_CACHE',
    'ENV_CKPT_ROOT',
    'CacheEntry',
    'cache_root',
    'cached_entry',
    'ckpt_root',
    'entry_dir',
    'entry_state',
    'fill_entry',
    'official_location',
    'official_names',
    'resolve_pretrained_file',
]

_logger = logging.getLogger(__name__)

ENV_CACHE = 'EFFNET_TIMM_CACHE'
ENV_CKPT_ROOT = 'EFFNET_TIMM_CKPT_ROOT'
WEIGHTS_NAME = 'model.safetensors'
STAT_NAME = '.verified.json'  # size, mtime, ctime, inode of the weights when their sha256 was last checked
_WAIT_NOTICE_S = 1.0  # say that we wait for another process only when the lock is not free at once


@dataclass
class CacheEntry:
    name: str  # 'effnet_v1_b0.aa_in1k'
    folder: Path
    source: str  # where the tarball came from (URL or path)
    tarball_sha256: str
    tarball_bytes: int
    seconds: float = 0.0  # spent filling it in this call (0 when it was cached)
    fetched_now: bool = False

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS_NAME


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: `cache_dir/effnet_timm` (timm's `cache_dir=` argument), `EFFNET_TIMM_CACHE`, or the user
    cache (`$XDG_CACHE_HOME` or `~/.cache`) + `effnet_timm`."""
    if cache_dir:
        return Path(cache_dir).expanduser() / 'effnet_timm'
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache').expanduser() / 'effnet_timm'


def ckpt_root() -> str:
    """Where the official tarballs are: `EFFNET_TIMM_CKPT_ROOT` (a mirror: http(s)://, file:// or a local folder
    laid out like the bucket), else the official bucket."""
    return (os.environ.get(ENV_CKPT_ROOT) or OFFICIAL_CKPT_ROOT).rstrip('/')


def official_location(variant: str, tag: str) -> str:
    """URL or local path of the official tarball of `variant.tag` under `ckpt_root()`."""
    _check_known(variant, tag)
    return official_url(variant, tag, root=ckpt_root())


def entry_dir(variant: str, tag: str, cache_dir=None) -> Path:
    # One entry per family and variant: the official basenames repeat across ckpts/, ckptsaug/ and advprop/.
    return cache_root(cache_dir) / f'{variant}.{tag}'


def entry_state(variant: str, tag: str, cache_dir=None, rehash: bool = False) -> tuple[CacheEntry | None, str]:
    """(the trusted entry, '') or (None, 'not there' | 'damaged (why)'). Reads no network.

    The weights' sha256 is compared only when their size, mtime, ctime or inode changed since it was last checked
    (or with `rehash`)."""
    folder = entry_dir(variant, tag, cache_dir)
    if not folder.is_dir():
        return None, 'not there'
    reason = _untrusted_reason(folder, variant, tag, rehash)
    if reason:
        return None, f'damaged ({reason})'
    record = _config(folder)['effnet_timm']['cache']
    return CacheEntry(folder.name, folder, record['source'], record['tarball_sha256'], record['tarball_bytes']), ''


def cached_entry(variant: str, tag: str, cache_dir=None, rehash: bool = False) -> CacheEntry | None:
    """The trusted cache entry of `variant.tag`, or None (a damaged one is logged, and made again when filled)."""
    entry, why = entry_state(variant, tag, cache_dir, rehash)
    if entry is None and why != 'not there':
        _logger.warning('%s: not used, %s; it will be made again', entry_dir(variant, tag, cache_dir), why)
    return entry


def fill_entry(variant: str, tag: str, cache_dir=None, progress: bool | None = None) -> CacheEntry:
    """Make the cache entry of `variant.tag` from the official tarball, unless it is there (or another process
    makes it meanwhile: one process downloads, the others wait for the lock and then find it)."""
    from filelock import FileLock, Timeout

    _check_known(variant, tag)
    if progress is None and _progress_bars_disabled():
        progress = False
    root = cache_root(cache_dir)
    name = f'{variant}.{tag}'
    location = official_location(variant, tag)
    if _offline() and _local_path(location) is None and cached_entry(variant, tag, cache_dir) is None:
        raise PretrainedWeightsError(
            f'{name}: offline (HF_HUB_OFFLINE=1) and not cached; {location} is not fetched offline '
            f'(a local mirror in {ENV_CKPT_ROOT} is)'
        )
    lock = FileLock(str(root / '.locks' / f'{name}.lock'))
    try:
        (root / '.locks').mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=_WAIT_NOTICE_S)
        except Timeout:
            _logger.warning('%s: another process is fetching it; waiting for %s', name, lock.lock_file)
            lock.acquire()
    except OSError as err:
        raise PretrainedWeightsError(
            f'{root}: cannot write the weights cache ({err.strerror or err}); set {ENV_CACHE} to a writable folder'
        ) from None
    try:
        entry = cached_entry(variant, tag, cache_dir)
        if entry is not None:
            return entry
        started = time.perf_counter()
        try:
            entry = _make_entry(variant, tag, root, location, progress)
        except OSError as err:  # a full disk, a read-only folder: one line naming the path, not a traceback
            raise PretrainedWeightsError(
                f'{err.filename or root / name}: cannot fill the weights cache ({err.strerror or err})'
            ) from None
        entry.seconds, entry.fetched_now = time.perf_counter() - started, True
        return entry
    finally:
        lock.release()


def _progress_bars_disabled() -> bool:
    # The bar shows on a terminal only; HF_HUB_DISABLE_PROGRESS_BARS=1 silences it as it does the Hub's, for
    # create_model and `effnet-timm download` alike (an explicit progress=True still shows it).
    return env_flag('HF_HUB_DISABLE_PROGRESS_BARS')


def resolve_pretrained_file(variant: str, tag: str, hf_hub_id: str | None = None, cache_dir=None) -> Path:
    """The `model.safetensors` to load for `variant.tag`: cache, then the Hub where pinned, then the official
    tarball (converted and cached). Raises PretrainedWeightsError naming every source tried, why it failed, and
    the ways out.

    `hf_hub_id` (the registry cfg's) is not asked unless the TAGS row pins it: an unpinned repo is no source we can
    check. A repo the user names (`hf-hub:org/name`) never reaches this function."""
    del hf_hub_id
    started = time.perf_counter()
    name = f'{variant}.{tag}'
    entry, why = entry_state(variant, tag, cache_dir)
    if entry is not None:
        return entry.weights
    offline = _offline()
    tried = [f'cache {entry_dir(variant, tag, cache_dir)}: {why}']
    pin = hub_pin(variant, tag)
    if pin is not None:
        path, reason = _from_hub(hub_repo_id(variant, tag), pin, cache_dir, offline)
        if path is not None:
            return path
        tried.append(f'Hub {hub_repo_id(variant, tag)}@{pin.revision[:12]}: {reason}')
    try:
        return fill_entry(variant, tag, cache_dir).weights
    except PretrainedWeightsError as err:
        tried.append(f'official checkpoint: {_drop_name(first_line(err), name)}')
    ways = (
        f'fill the cache with `effnet-timm download {name}` where there is internet'
        if offline
        else f'set {ENV_CKPT_ROOT} to a mirror of the official bucket (a folder or URL laid out like it), fill the '
        f'cache with `effnet-timm download {name}` where there is internet'
    )
    raise PretrainedWeightsError(
        f'{name}: could not load pretrained weights ({time.perf_counter() - started:.0f} s); tried '
        f'{"; ".join(tried)}. Ways out: {ways}, or pass pretrained_cfg_overlay=dict(file=...) with a file made by '
        f'effnet-convert'
    )


def _drop_name(message: str, name: str) -> str:
    return message[len(name) + 2 :] if message.startswith(f'{name}: ') else message


# --- the Hub (pinned rows only) -------------------------------------------------------------------------------------


def _from_hub(repo_id: str, pin, cache_dir, offline: bool):
    """(local path, None) when the pinned commit of the repo (or its Hub cache copy) has the weights with the pinned
    sha256, else (None, why not). An unreachable Hub costs one HEAD within the etag timeout."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub import errors as hub_errors

    def fetch(local_only: bool) -> Path:
        return Path(
            hf_hub_download(
                repo_id, WEIGHTS_NAME, revision=pin.revision, cache_dir=cache_dir, local_files_only=local_only
            )
        )

    try:
        try:
            path = fetch(local_only=True)  # a pinned commit never changes: its cached copy needs no request
        except (hub_errors.LocalEntryNotFoundError, hub_errors.EntryNotFoundError, OSError, ValueError):
            if offline:
                return None, 'offline and not in the Hub cache'
            get_hf_file_metadata(
                hf_hub_url(repo_id, WEIGHTS_NAME, revision=pin.revision), timeout=constants.HF_HUB_ETAG_TIMEOUT
            )
            path = fetch(local_only=False)
    except hub_errors.RepositoryNotFoundError:
        return None, 'repository not found'
    except hub_errors.RevisionNotFoundError:
        return None, f'pinned revision {pin.revision} not found'
    except hub_errors.EntryNotFoundError:
        return None, f'no {WEIGHTS_NAME} at the pinned revision'
    except hub_errors.HfHubHTTPError as err:
        return None, first_line(err)
    except (hub_errors.OfflineModeIsEnabled, OSError, ValueError, ConnectionError) as err:
        return None, f'unreachable ({first_line(err)})'
    except Exception as err:  # noqa: BLE001 - httpx transport errors (timeouts, DNS) are not OSErrors
        if type(err).__module__.split('.')[0] not in ('httpx', 'httpx2', 'httpcore', 'httpcore2'):
            raise
        return None, f'unreachable ({first_line(err)})'
    memo = cache_root(cache_dir) / '.verified' / f'hub-{pin.sha256}.json'
    if not _matches_memo(path, memo, pin.sha256):
        before = _stat_key(path)
        found = sha256_file(path)
        if found != pin.sha256:
            _logger.warning(
                '%s@%s: %s has sha256 %s, the pin says %s; not used', repo_id, pin.revision, path, found, pin.sha256
            )
            return None, f'sha256 {found[:12]}… is not the pinned {pin.sha256[:12]}…'
        _write_memo(path, memo, pin.sha256, before)
    return path, None


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; a later change of the environment counts here too.
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or env_flag('HF_HUB_OFFLINE')


# --- verified-file memos: hash once, then compare stat ------------------------------------------------------------


def _stat_key(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return dict(size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, inode=st.st_ino)


def _matches_memo(path: Path, memo: Path, sha256: str) -> bool:
    try:
        record = json.loads(memo.read_text(encoding='utf-8'))
        return record == dict(_stat_key(path), sha256=sha256)
    except (OSError, ValueError):
        return False


def _write_memo(path: Path, memo: Path, sha256: str, before: dict[str, int] | None = None) -> None:
    """Record the stat of a file whose sha256 was just checked (best effort: a read-only cache re-hashes).

    `before`: the stat taken before hashing; when the file changed meanwhile nothing is recorded, so the next
    load hashes again rather than vouching for bytes that were not the ones hashed."""
    try:
        now = _stat_key(path)
        if before is not None and now != before:
            return
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, json.dumps(dict(now, sha256=sha256)) + '\n')
    except OSError:
        pass


def _host_pid() -> str:
    return f'{re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"}-{os.getpid()}'


# --- making an entry (the caller holds its lock) ------------------------------------------------------------------


def _make_entry(variant: str, tag: str, root: Path, location: str, progress: bool | None) -> CacheEntry:
    name = f'{variant}.{tag}'
    work = root / '.tmp' / name
    download_dir = work / 'download'  # survives a killed process: its `.part` is resumed, a verified tarball reused
    _clear_except(work, download_dir)  # staging of killed earlier holders of the lock (any host)
    stage = work / f'{_host_pid()}-{time.monotonic_ns()}'
    local = _local_path(location)
    pin = tarball_pin(variant, tag)
    _logger.info('%s: not cached; fetching %s and converting it into %s', name, location, root / name)
    goog_hash: dict[str, str] = {}
    try:
        if local is None:
            tarball = download_dir / Path(urlparse(location).path).name
            kept = _kept_download(tarball, location, pin)
            if kept is None:
                got = download(
                    location,
                    tarball,
                    progress,
                    desc=name,
                    sha256=pin.sha256 if pin else None,
                    size=pin.size if pin else None,
                    require_hash=not _allow_unverified(),
                )
                kept = dict(source=location, sha256=got.sha256, bytes=got.size, x_goog_hash=got.goog_hash)
                _write_json(_sidecar(tarball), kept)
            sha256, size, goog_hash = kept['sha256'], kept['bytes'], kept['x_goog_hash']
        else:
            if not local.is_file():
                raise PretrainedWeightsError(f'{location}: no such file (mirror {ENV_CKPT_ROOT}={ckpt_root()})')
            tarball, size = local, local.stat().st_size
            sha256 = sha256_file(local) if pin else None
            if pin and (sha256, size) != (pin.sha256, pin.size):
                raise PretrainedWeightsError(
                    f'{location}: sha256 {sha256} ({size} bytes) is not the pinned official file '
                    f'({pin.sha256}, {pin.size} bytes)'
                )
        return _convert_and_install(variant, tag, root, location, tarball, local, sha256, size, goog_hash, stage)
    finally:
        _remove_quietly(stage)
        _remove_empty(download_dir, work, root / '.tmp')


def _convert_and_install(
    variant, tag, root: Path, location: str, tarball: Path, local, sha256, size, goog_hash, stage: Path
) -> CacheEntry:
    name = f'{variant}.{tag}'
    # The downloaded tarball goes once converted, or once refused for its content; a failure to write the output
    # (a full disk, a file-size limit, Ctrl-C) keeps it for the next call, which reuses it after checking its sha256.
    discard = False
    try:
        try:
            staging = _convert(tarball, stage / 'entry', variant, tag, location)
            sha256 = _check_recorded_sha256(staging, tarball.name, sha256, location)
        except _NotTheTarballsFault:
            raise
        except PretrainedWeightsError:
            discard = True
            raise
        _record(
            staging,
            dict(
                source=location,
                tarball_sha256=sha256,
                tarball_bytes=size,
                x_goog_hash=goog_hash,
                pinned=tarball_pin(variant, tag) is not None,
                fetched=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
            ),
        )
        final = root / name
        if final.exists():  # an untrusted leftover (damaged, or from an older layout): replaced, not reused
            final.rename(stage / 'replaced')
        os.rename(staging, final)
        _write_memo(final / WEIGHTS_NAME, final / STAT_NAME, _recorded_weights_sha256(final))
        discard = True
    finally:
        if local is None and discard:
            tarball.unlink(missing_ok=True)
            _sidecar(tarball).unlink(missing_ok=True)
    return CacheEntry(name, final, location, sha256, size)


def _allow_unverified() -> bool:
    return env_flag(ENV_ALLOW_UNVERIFIED)


def _sidecar(tarball: Path) -> Path:
    # Written only after download() verified the tarball (pin or X-Goog-Hash, length): what makes it reusable.
    return tarball.with_name(tarball.name + '.verified.json')


def _kept_download(tarball: Path, location: str, pin) -> dict[str, object] | None:
    """The record of a verified tarball that a killed or failed earlier fill left, if its bytes still match it."""
    record_path = _sidecar(tarball)
    try:
        record = json.loads(record_path.read_text(encoding='utf-8'))
        size = tarball.stat().st_size
        if (
            isinstance(record, dict)
            and record.get('source') == location
            and record.get('bytes') == size
            and isinstance(record.get('x_goog_hash'), dict)
            and (pin is None or (record.get('sha256'), size) == (pin.sha256, pin.size))
            # verified by a pin or the bucket's hash; kept under EFFNET_TIMM_ALLOW_UNVERIFIED only while it is set
            and (pin is not None or bool(record['x_goog_hash']) or _allow_unverified())
            and record.get('sha256') == sha256_file(tarball)
        ):
            _logger.info('%s: reusing the verified download %s', location, tarball)
            return record
    except (OSError, ValueError):
        pass
    record_path.unlink(missing_ok=True)  # bytes of unknown or changed content are fetched again
    tarball.unlink(missing_ok=True)
    return None


def _write_json(path: Path, value: object) -> None:
    write_atomic(path, json.dumps(value) + '\n')


def _convert(tarball: Path, out: Path, variant: str, tag: str, location: str) -> Path:
    from .converter import tf_checkpoint_converter  # effnet_convert by entry point, never imported: see there

    convert = tf_checkpoint_converter()

    try:
        # variant= makes the converter refuse a tarball that holds another architecture.
        convert(str(tarball), out, variant=variant, tag=tag)
    except OutputError as err:  # writing failed (full disk, size limit, permissions): not the tarball's fault
        raise _NotTheTarballsFault(_about_tarball(first_line(err), location, tarball, out)) from None
    except (CheckpointError, InputError) as err:
        raise PretrainedWeightsError(_about_tarball(first_line(err), location, tarball, out)) from None
    return out


class _NotTheTarballsFault(PretrainedWeightsError):
    """The conversion failed for a reason outside the tarball (disk full, read-only): the tarball is kept."""


def _check_recorded_sha256(folder: Path, tarball_name: str, sha256: str | None, location: str) -> str:
    """The tarball's sha256 as the converter recorded it in the provenance; equal to the one streamed."""
    sources = _config(folder).get('effnet_timm', {}).get('source_files') or []
    recorded = next((s.get('sha256') for s in sources if s.get('name') == tarball_name), None)
    if not recorded or (sha256 and recorded != sha256):
        raise PretrainedWeightsError(
            f"{location}: sha256 recorded by the converter ({recorded}) is not the downloaded tarball's ({sha256})"
        )
    return recorded


def _record(folder: Path, cache: dict[str, object]) -> None:
    """Integrity records and, last, the cache record that makes the entry trusted."""
    config = _config(folder)
    block = config.setdefault('effnet_timm', {})
    if 'files' not in block:  # the converter records them; hashing a large file twice is not free
        block['files'] = file_digests(folder)
    block['cache'] = cache
    write_atomic(folder / 'config.json', json.dumps(config, indent=2) + '\n')


def _recorded_weights_sha256(folder: Path) -> str:
    return _config(folder)['effnet_timm']['files'][WEIGHTS_NAME]['sha256']


def _untrusted_reason(folder: Path, variant: str, tag: str, rehash: bool = False) -> str | None:
    try:
        config = _config(folder)
        block = config.get('effnet_timm') or {}
        cache = block.get('cache')
        if not isinstance(cache, dict) or not cache.get('tarball_sha256'):
            return 'no cache record: incomplete'
        record = (block.get('files') or {}).get(WEIGHTS_NAME)
        if not isinstance(record, dict) or not isinstance(record.get('sha256'), str):
            return f'no integrity record of {WEIGHTS_NAME}'
        if config.get('architecture') != variant or (config.get('pretrained_cfg') or {}).get('tag') != tag:
            return f'holds {config.get("architecture")}.{(config.get("pretrained_cfg") or {}).get("tag")}'
        weights, memo = folder / WEIGHTS_NAME, folder / STAT_NAME
        if rehash or not _matches_memo(weights, memo, record['sha256']):
            before = _stat_key(weights)
            verify_folder(folder)
            _write_memo(weights, memo, record['sha256'], before)
    except (OSError, ValueError, AttributeError, KeyError, TypeError, InputError) as err:
        return first_line(err)
    return None


def _config(folder: Path) -> dict:
    return json.loads((folder / 'config.json').read_text(encoding='utf-8'))


def _clear_except(work: Path, keep: Path) -> None:
    """Remove what killed or failed fills left in `work` (staging folders), keeping the resumable download."""
    if not work.is_dir():
        return
    for child in work.iterdir():
        if child != keep:
            _remove_quietly(child)


def _remove_quietly(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _remove_empty(*folders: Path) -> None:
    """Remove these folders, innermost first, where empty: a failed first use leaves no empty `.tmp/` behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _local_path(location: str) -> Path | None:
    """A mirror on this machine (file:// URL or a plain folder) as a path; None for http(s) URLs."""
    if location.startswith(('http://', 'https://')):
        return None
    if location.startswith('file://'):
        return Path(unquote(urlparse(location).path))
    if '://' in location:
        raise PretrainedWeightsError(
            f'{ENV_CKPT_ROOT}={ckpt_root()}: expected an http(s):// or file:// URL, or a local folder'
        )
    return Path(location).expanduser()


def _about_tarball(message: str, location: str, tarball: Path, out: Path) -> str:
    """The converter's message about the tarball as the user knows it: by its URL (the downloaded copy may be
    gone), and a member by `<URL>:<member>` instead of the temporary folder it was unpacked into."""
    message = message.replace(str(tarball), location)
    unpacked = re.escape(str(out.parent)) + r'/[^ ]*?/source/[^/ ]+/'
    message = re.sub(unpacked, lambda _: f'{location}:', message)
    message = message.replace(str(out.parent) + os.sep, '')
    return message if message.startswith(location) else f'{location}: {message}'


def _check_known(variant: str, tag: str) -> None:
    if tag not in TAGS:
        raise InputError(f"unknown tag '{tag}' (known: {', '.join(TAGS)})")
    if variant not in TAGS[tag].variants:
        raise InputError(f"tag '{tag}' has no official {variant} checkpoint (it has: {', '.join(TAGS[tag].variants)})")


def official_names(tag: str | None = None) -> list[str]:
    """Every registered `variant.tag` (of one tag when given), in the tag table's order."""
    return [f'{v}.{t}' for t, spec in TAGS.items() if tag in (None, t) for v in spec.variants]
