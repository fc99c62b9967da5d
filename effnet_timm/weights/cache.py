"""Pretrained weights of registered tags on first use: where they come from and how they are cached.

Resolution order for `effnet_v1_bN.<tag>` with `pretrained=True` (explicit files are handled by timm before):
our cache of an earlier conversion (no network) -> the published Hub repo -> the official TensorFlow tarball at
`EFFNET_TIMM_CKPT_ROOT` (default: the official bucket), converted without TensorFlow and cached.

Cache layout (root: `EFFNET_TIMM_CACHE`, else `$XDG_CACHE_HOME/effnet_timm`, else `~/.cache/effnet_timm`):

    <root>/effnet_v1_b0.aa_in1k/{model.safetensors,config.json,README.md}   one entry per family and variant
    <root>/.locks/effnet_v1_b0.aa_in1k.lock                                  held while an entry is made
    <root>/.tmp/effnet_v1_b0.aa_in1k/                                        download and staging

The download folder keeps the resumable `.part`, and a verified tarball whose conversion failed for a reason
other than its content (reused after its sha256 is checked against the `.verified.json` written beside it).

An entry appears by one `os.rename` of a complete folder, and is trusted only when its config.json carries the
`effnet_timm.cache` record (written last, before the rename) and the sizes + sha256 recorded for its files match
(`integrity.verify_folder`). The lock is an fcntl lock: it dies with its process, so a killed download never
blocks; whoever takes the lock next clears the staging left behind and resumes the `.part` download.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import InputError, PretrainedWeightsError, first_line
from .integrity import file_digests, verify_folder
from .tags import OFFICIAL_CKPT_ROOT, TAGS, official_url

__all__ = [
    'CacheEntry',
    'cache_root',
    'cached_entry',
    'ckpt_root',
    'entry_dir',
    'fill_entry',
    'official_location',
    'resolve_pretrained_file',
]

_logger = logging.getLogger(__name__)

ENV_CACHE = 'EFFNET_TIMM_CACHE'
ENV_CKPT_ROOT = 'EFFNET_TIMM_CKPT_ROOT'
WEIGHTS_NAME = 'model.safetensors'
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


def cached_entry(variant: str, tag: str, cache_dir=None) -> CacheEntry | None:
    """The trusted cache entry of `variant.tag`, or None. Reads no network; checks sizes and sha256."""
    folder = entry_dir(variant, tag, cache_dir)
    if not folder.is_dir():
        return None
    reason = _untrusted_reason(folder, variant, tag)
    if reason:
        _logger.warning('%s: not used (%s); it will be made again', folder, reason)
        return None
    record = _config(folder)['effnet_timm']['cache']
    return CacheEntry(folder.name, folder, record['source'], record['tarball_sha256'], record['tarball_bytes'])


def fill_entry(variant: str, tag: str, cache_dir=None, progress: bool | None = None) -> CacheEntry:
    """Make the cache entry of `variant.tag` from the official tarball, unless it is there (or another process
    makes it meanwhile: one process downloads, the others wait for the lock and then find it)."""
    from filelock import FileLock, Timeout

    _check_known(variant, tag)
    if progress is None and _progress_bars_disabled():
        progress = False
    root = cache_root(cache_dir)
    name = f'{variant}.{tag}'
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
            entry = _make_entry(variant, tag, root, progress)
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
    return os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS', '').strip().lower() in ('1', 'true', 'yes', 'on')


def resolve_pretrained_file(variant: str, tag: str, hf_hub_id: str | None = None, cache_dir=None) -> Path:
    """The `model.safetensors` to load for `variant.tag`: cache, then Hub, then the official tarball (converted
    and cached). Raises PretrainedWeightsError naming every source tried and why it failed."""
    name = f'{variant}.{tag}'
    entry = cached_entry(variant, tag, cache_dir)
    if entry is not None:
        return entry.weights
    offline = _offline()
    tried = [f'cache {entry_dir(variant, tag, cache_dir)}: not there']
    if hf_hub_id:
        path, reason = _from_hub(hf_hub_id, cache_dir, offline)
        if path is not None:
            return path
        tried.append(f'Hub {hf_hub_id}: {reason}')
    if offline:
        raise PretrainedWeightsError(
            f'{name}: could not load pretrained weights: offline (HF_HUB_OFFLINE=1) and not cached '
            f'({"; ".join(tried)}); fill the cache with '
            f'`effnet-timm download {name}` where there is internet, or pass pretrained_cfg_overlay=dict(file=...) '
            f'with a file made by effnet-convert'
        )
    try:
        return fill_entry(variant, tag, cache_dir).weights
    except PretrainedWeightsError as err:
        tried.append(f'official checkpoint: {first_line(err)}')
    raise PretrainedWeightsError(f'{name}: could not load pretrained weights; tried {"; ".join(tried)}')


# --- the Hub ------------------------------------------------------------------------------------------------------


def _from_hub(hf_hub_id: str, cache_dir, offline: bool):
    """(local path, None) when the published repo (or its Hub cache copy, offline) has the weights, else
    (None, why not). A missing repo answers at once; an unreachable Hub costs one HEAD within the etag timeout
    (hf_hub_download alone would retry with backoff for ~25 s before giving up)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub import errors as hub_errors

    repo_id, _, revision = hf_hub_id.partition('@')
    revision = revision or None
    try:
        if not offline:
            get_hf_file_metadata(
                hf_hub_url(repo_id, WEIGHTS_NAME, revision=revision), timeout=constants.HF_HUB_ETAG_TIMEOUT
            )
        return Path(
            hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir, local_files_only=offline)
        ), None
    except hub_errors.RepositoryNotFoundError:
        return None, 'repository not found'
    except hub_errors.RevisionNotFoundError:
        return None, f'revision {revision} not found'
    except hub_errors.LocalEntryNotFoundError:
        return None, 'not in the Hub cache'
    except hub_errors.EntryNotFoundError:
        return None, f'no {WEIGHTS_NAME} in the repository'
    except hub_errors.HfHubHTTPError as err:
        return None, first_line(err)
    except (hub_errors.OfflineModeIsEnabled, OSError, ValueError, ConnectionError) as err:
        return _hub_cache_copy(repo_id, revision, cache_dir, f'unreachable ({first_line(err)})')
    except Exception as err:  # noqa: BLE001 - httpx transport errors (timeouts, DNS) are not OSErrors
        if type(err).__module__.split('.')[0] not in ('httpx', 'httpx2', 'httpcore', 'httpcore2'):
            raise
        return _hub_cache_copy(repo_id, revision, cache_dir, f'unreachable ({first_line(err)})')


def _hub_cache_copy(repo_id: str, revision, cache_dir, reason: str):
    # As huggingface_hub itself does when the Hub cannot be reached: a copy already in its cache is used.
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir, local_files_only=True)
        ), None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.EntryNotFoundError, OSError, ValueError):
        return None, reason


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; a later change of the environment counts here too.
    from huggingface_hub import constants

    value = os.environ.get('HF_HUB_OFFLINE', '').strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or value in ('1', 'true', 'yes', 'on')


# --- making an entry (the caller holds its lock) ------------------------------------------------------------------


def _make_entry(variant: str, tag: str, root: Path, progress: bool | None) -> CacheEntry:
    name = f'{variant}.{tag}'
    work = root / '.tmp' / name
    download_dir = work / 'download'  # survives a killed process: its `.part` is resumed, a verified tarball reused
    _clear_except(work, download_dir)
    location = official_location(variant, tag)
    local = _local_path(location)
    _logger.info('%s: not cached; fetching %s and converting it into %s', name, location, root / name)
    goog_hash: dict[str, str] = {}
    if local is None:
        tarball = download_dir / Path(urlparse(location).path).name
        kept = _kept_download(tarball, location)
        if kept is None:
            from .download import download

            got = download(location, tarball, progress, desc=name)
            kept = dict(source=location, sha256=got.sha256, bytes=got.size, x_goog_hash=got.goog_hash)
            _write_json(_sidecar(tarball), kept)
        sha256, size, goog_hash = kept['sha256'], kept['bytes'], kept['x_goog_hash']
    else:
        if not local.is_file():
            raise PretrainedWeightsError(f'{location}: no such file (mirror {ENV_CKPT_ROOT}={ckpt_root()})')
        tarball, sha256, size = local, None, local.stat().st_size
    # The downloaded tarball goes once converted, or once refused for its content; any other failure (Ctrl-C,
    # a full disk while converting) keeps it for the next call, which reuses it after checking its sha256.
    discard = False
    try:
        try:
            staging = _convert(tarball, work / 'entry', variant, tag, location)
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
                fetched=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
            ),
        )
        final = root / name
        if final.exists():  # an untrusted leftover (damaged, or from an older layout): replaced, not reused
            final.rename(work / 'replaced')
        os.rename(staging, final)
        discard = True
    finally:
        if local is None and discard:
            tarball.unlink(missing_ok=True)
            _sidecar(tarball).unlink(missing_ok=True)
        _clear_except(work, download_dir)
    return CacheEntry(name, final, location, sha256, size)


def _sidecar(tarball: Path) -> Path:
    # Written only after download() verified the tarball (length, X-Goog-Hash): what makes it reusable.
    return tarball.with_name(tarball.name + '.verified.json')


def _kept_download(tarball: Path, location: str) -> dict[str, object] | None:
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
            and record.get('sha256') == _sha256(tarball)
        ):
            _logger.info('%s: reusing the verified download %s', location, tarball)
            return record
    except (OSError, ValueError):
        pass
    record_path.unlink(missing_ok=True)  # bytes of unknown or changed content are fetched again
    tarball.unlink(missing_ok=True)
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(value) + '\n')
    os.replace(tmp, path)


def _convert(tarball: Path, out: Path, variant: str, tag: str, location: str) -> Path:
    from .converter import tf_checkpoint_converter  # effnet_convert by entry point, never imported: see there

    convert = tf_checkpoint_converter()

    try:
        # variant= makes the converter refuse a tarball that holds another architecture.
        convert(str(tarball), out, variant=variant, tag=tag)
    except InputError as err:  # the converter's CheckpointError is one
        message = f'{location}: {_strip_paths(first_line(err), tarball, out)}'
        # The converter reports a full disk while unpacking or writing as a CheckpointError too (raised from
        # None: the OSError stays its __context__); that is no fault of the tarball, which is then kept.
        cause = err.__context__
        if isinstance(cause, OSError) and not isinstance(cause, (FileNotFoundError, gzip.BadGzipFile)):
            raise _NotTheTarballsFault(message) from None
        raise PretrainedWeightsError(message) from None
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
    tmp = folder / 'config.json.tmp'
    tmp.write_text(json.dumps(config, indent=2) + '\n')
    os.replace(tmp, folder / 'config.json')


def _untrusted_reason(folder: Path, variant: str, tag: str) -> str | None:
    try:
        config = _config(folder)
        block = config.get('effnet_timm') or {}
        cache = block.get('cache')
        if not isinstance(cache, dict) or not cache.get('tarball_sha256'):
            return 'no cache record: incomplete'
        if WEIGHTS_NAME not in (block.get('files') or {}):
            return f'no integrity record of {WEIGHTS_NAME}'
        if config.get('architecture') != variant or (config.get('pretrained_cfg') or {}).get('tag') != tag:
            return f'holds {config.get("architecture")}.{(config.get("pretrained_cfg") or {}).get("tag")}'
        verify_folder(folder)
    except (OSError, ValueError, AttributeError, InputError) as err:
        return first_line(err)
    return None


def _config(folder: Path) -> dict:
    return json.loads((folder / 'config.json').read_text(encoding='utf-8'))


def _clear_except(work: Path, keep: Path) -> None:
    """Remove what a killed or failed fill left in `work` (staging folders), keeping the resumable download."""
    if not work.is_dir():
        return
    for child in work.iterdir():
        if child != keep:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink(missing_ok=True)


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


def _strip_paths(message: str, *paths: Path) -> str:
    # The converter names its working files; the user knows the tarball by its URL.
    for path in paths:
        message = message.replace(str(path.parent) + os.sep, '')
    return message


def _check_known(variant: str, tag: str) -> None:
    if tag not in TAGS:
        raise InputError(f"unknown tag '{tag}' (known: {', '.join(TAGS)})")
    if variant not in TAGS[tag].variants:
        raise InputError(f"tag '{tag}' has no official {variant} checkpoint (it has: {', '.join(TAGS[tag].variants)})")


def official_names(tag: str | None = None) -> list[str]:
    """Every registered `variant.tag` (of one tag when given), in the tag table's order."""
    return [f'{v}.{t}' for t, spec in TAGS.items() if tag in (None, t) for v in spec.variants]
