"""Publish converted folders on the Hugging Face Hub: one commit per model, and whole checkpoint families.

A published repo holds exactly what `effnet-convert` wrote: `model.safetensors`, `config.json` (timm's Hub
layout, so `hf-hub:ORG/NAME` loads it) and the `README.md` model card. The token is whatever
huggingface_hub finds (HF_TOKEN, `hf auth login`); it is never printed.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import timm
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from effnet_timm.errors import first_line
from effnet_timm.weights.integrity import digest_file, verify_folder
from effnet_timm.weights.tags import HUB_ORG, TAGS, hub_repo_id, official_url

from .converter import CONVERTER_VERSION, convert
from .errors import CheckpointError
from .sources import sha256_file

__all__ = [
    'HUB_FILES',
    'HubError',
    'ConvertedFolder',
    'PushResult',
    'FamilyRow',
    'read_folder',
    'push_folder',
    'publish_family',
]

HUB_FILES = ('model.safetensors', 'config.json', 'README.md')
DEFAULT_BRANCH = 'main'
_PREPROCESSING = ('input_size', 'crop_pct', 'crop_mode', 'interpolation', 'mean', 'std')
_SHA256 = re.compile(r'[0-9a-f]{64}')


class HubError(Exception):
    """The Hub refused or failed a request; the message is one line."""


@dataclass(frozen=True)
class ConvertedFolder:
    """A folder written by effnet-convert, with the provenance its safetensors metadata declares."""

    path: Path
    variant: str
    tag: str | None
    sources: list[dict[str, str]]  # the archive (if any) first, then the checkpoint files, each with sha256
    converter: str

    @property
    def name(self) -> str:
        return f'{self.variant}.{self.tag}' if self.tag else self.variant

    def default_repo_id(self) -> str:
        if not self.tag:
            raise CheckpointError(
                f'{self.path}: converted without --tag, so it has no official repo id; pass --repo-id ORG/NAME'
            )
        return hub_repo_id(self.variant, self.tag)


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit: str  # the branch head after the push
    changed: bool  # False: the branch already held these exact files, nothing was committed


@dataclass(frozen=True)
class FamilyRow:
    tarball: str
    repo_id: str
    status: str  # 'pushed', 'up to date', 'failed', 'not attempted' or 'ignored'
    detail: str  # the commit, or why


# --- what may be published ------------------------------------------------------------------------------------


def read_folder(folder: str | Path) -> ConvertedFolder:
    """The folder's provenance, once it is shown complete, recorded and strictly loadable into its architecture."""
    path = Path(folder).absolute()
    missing = [name for name in HUB_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f'{path}: missing {", ".join(missing)} (not a folder written by effnet-convert)')
    converted = _provenance(path, _safetensors_metadata(path / 'model.safetensors'))
    _check_config(path / 'config.json', converted)
    _check_strict_load(path, converted)
    verify_folder(path)  # sizes and sha256 recorded at conversion: a flipped weight still loads strictly
    return converted


def _safetensors_metadata(file: Path) -> dict[str, str]:
    try:
        with safe_open(str(file), 'pt') as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f'{file}: not a readable safetensors file ({err})') from None


def _provenance(path: Path, metadata: dict[str, str]) -> ConvertedFolder:
    where = path / 'model.safetensors'
    absent = [key for key in ('variant', 'converter', 'source_files') if not metadata.get(key)]
    if absent:
        raise CheckpointError(
            f'{where}: metadata lacks provenance ({", ".join(absent)}); convert it with effnet-convert'
        )
    try:
        sources = json.loads(metadata['source_files'])
    except json.JSONDecodeError:
        sources = None
    if not (isinstance(sources, list) and sources and all(_is_source_entry(s) for s in sources)):
        raise CheckpointError(f"{where}: metadata 'source_files' must list every source file with its sha256")
    variant, tag = metadata['variant'], metadata.get('tag') or None
    if tag and (tag not in TAGS or variant not in TAGS[tag].variants):
        raise CheckpointError(f"{where}: metadata tag '{tag}' is not an official checkpoint family of {variant}")
    return ConvertedFolder(path, variant, tag, sources, metadata['converter'])


def _is_source_entry(entry: object) -> bool:
    return isinstance(entry, dict) and bool(entry.get('name')) and bool(_SHA256.fullmatch(str(entry.get('sha256'))))


def _check_config(file: Path, converted: ConvertedFolder) -> None:
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f'{file}: not valid JSON ({err})') from None
    if config.get('architecture') != converted.variant:
        raise CheckpointError(
            f"{file}: architecture '{config.get('architecture')}' differs from the weights' "
            f"variant '{converted.variant}'"
        )
    verification = (config.get('effnet_timm') or {}).get('verification')
    if verification and not verification.get('passed'):
        raise CheckpointError(f'{file}: the conversion failed its verification against TensorFlow')


def _check_strict_load(path: Path, converted: ConvertedFolder) -> None:
    # The structure alone, as `local-dir:` builds it (architecture + model_args from config.json): the
    # recorded sizes/sha256 are verified separately, so a damaged file and a wrong one each get their message.
    from safetensors.torch import load_file

    try:
        config = json.loads((path / 'config.json').read_text())
        model = timm.create_model(config['architecture'], pretrained=False, **config.get('model_args', {}))
        model.load_state_dict(load_file(str(path / 'model.safetensors')), strict=True)
    except (RuntimeError, ValueError, TypeError, KeyError, OSError, SafetensorError) as err:
        reason = first_line(err, whole=True)
        raise CheckpointError(
            f'{path}: model.safetensors does not load strictly into {converted.variant} as '
            f'config.json declares it: {reason[:300]}'
        ) from None


def _check_official_preprocessing(converted: ConvertedFolder) -> None:
    """An official repo id is also what the registered tag downloads: both must describe the same eval."""
    registered = timm.models.get_pretrained_cfg(converted.name).to_dict()
    declared = json.loads((converted.path / 'config.json').read_text())['pretrained_cfg']
    differing = [k for k in _PREPROCESSING if _as_tuple(declared.get(k)) != _as_tuple(registered.get(k))]
    if differing:
        raise CheckpointError(
            f'{converted.path / "config.json"}: {", ".join(differing)} differ from the registered '
            f'{converted.name} (converted with another --image-size?); pass --repo-id to publish '
            f'it elsewhere'
        )


def _as_tuple(value: object) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)  # JSON gives lists, the registry tuples


# --- one folder --------------------------------------------------------------------------------------------------


def push_folder(
    folder: str | Path,
    repo_id: str | None = None,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Publish a converted folder in one commit (creating the repo, and the branch `revision`, if missing).

    A branch that already holds these exact files gets no new commit. Bad folders raise CheckpointError before
    anything is sent; Hub failures raise HubError.
    """
    converted = read_folder(folder)
    official = converted.default_repo_id() if converted.tag else None
    repo_id = repo_id or converted.default_repo_id()
    if repo_id == official:
        _check_official_preprocessing(converted)
    if token is None and get_token() is None:
        raise HubError('no Hugging Face token: set HF_TOKEN or run `hf auth login`')
    branch = revision or DEFAULT_BRANCH
    api = HfApi(token=token, library_name='effnet-timm', library_version=CONVERTER_VERSION)
    with _hub_errors(repo_id, api.endpoint):
        # private=None lets a new repo take the Hub's (or the org's) default visibility.
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if branch != DEFAULT_BRANCH:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        if _remote_holds(api, repo_id, branch, converted.path):
            return PushResult(repo_id, branch, api.repo_info(repo_id, revision=branch).sha, changed=False)
        title, description = _commit_message(converted)
        info = api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(name, str(converted.path / name)) for name in HUB_FILES],
            commit_message=title,
            commit_description=description,
            revision=branch,
        )
    return PushResult(repo_id, branch, info.oid, changed=True)


def _remote_holds(api: HfApi, repo_id: str, branch: str, path: Path) -> bool:
    """Whether the branch has every file with the same content: LFS/Xet files by sha256, others by git blob id."""
    remote = {f.path: f for f in api.get_paths_info(repo_id, list(HUB_FILES), revision=branch)}
    for name in HUB_FILES:
        entry = remote.get(name)
        if entry is None:
            return False
        sha256, blob_id = _digests(path / name)
        if (entry.lfs.sha256 if entry.lfs else entry.blob_id) != (sha256 if entry.lfs else blob_id):
            return False
    return True


def _digests(file: Path) -> tuple[str, str]:
    """sha256 and git blob id of a file, in one read."""
    found = digest_file(file, ('sha256', 'git_blob'))
    return found['sha256'], found['git_blob']


def _commit_message(converted: ConvertedFolder) -> tuple[str, str]:
    checkpoint = converted.sources[0]  # the archive, or the checkpoint index for an unpacked source
    title = f'Add {converted.name} converted from {checkpoint["name"]} (sha256 {checkpoint["sha256"]})'
    description = '\n'.join(
        [f'Converted by {converted.converter} from the official TensorFlow checkpoint:']
        + [f'- {s["name"]} sha256 {s["sha256"]}' for s in converted.sources]
    )
    return title, description


@contextmanager
def _hub_errors(repo_id: str, endpoint: str) -> Iterator[None]:
    """huggingface_hub's multi-line errors → one line saying what failed and that nothing was pushed."""
    try:
        yield
    except HfHubHTTPError as err:
        raise HubError(_http_error_line(repo_id, err)) from None
    except _network_errors() as err:
        raise HubError(f'{repo_id}: cannot reach the Hub at {endpoint} ({err}); nothing was pushed') from None


def _http_error_line(repo_id: str, err: HfHubHTTPError) -> str:
    status, request = err.response.status_code, err.response.request
    server = ' '.join((err.server_message or '').split()) or str(err).strip().splitlines()[0]
    hint = {
        401: ' (check the token: HF_TOKEN or `hf auth login`)',
        403: ' (the token may not write to this namespace)',
    }.get(status, '')
    return (
        f'{repo_id}: the Hub answered HTTP {status} to {request.method} '
        f'{urllib.parse.urlsplit(str(request.url)).path}: {server}{hint}; nothing was pushed'
    )


def _network_errors() -> tuple[type, ...]:
    # huggingface_hub < 1.0 speaks through requests (its errors are OSErrors), later ones through httpx/httpx2.
    return (OSError,) + tuple(sys.modules[m].TransportError for m in ('httpx', 'httpx2') if m in sys.modules)


# --- a whole family --------------------------------------------------------------------------------------------


def _family_repo_id(variant: str, tag: str, org: str) -> str:
    """The registry's repo name for `variant.tag`, under `org` (only HUB_ORG's are what registered tags load)."""
    return f'{org}/{hub_repo_id(variant, tag).partition("/")[2]}'


def _family_tarballs(tarball_dir: str | Path, tag: str) -> tuple[list[tuple[Path, str]], list[Path]]:
    """(tarball, variant) for every official file name of `tag` in the folder, and the other tarballs."""
    if tag not in TAGS:
        raise CheckpointError(f"unknown tag '{tag}' (known: {', '.join(TAGS)})")
    directory = Path(tarball_dir)
    if not directory.is_dir():
        raise CheckpointError(f'{directory}: not a directory')
    official = {PurePosixPath(official_url(variant, tag)).name: variant for variant in TAGS[tag].variants}
    tarballs = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(('.tar.gz', '.tgz', '.tar')))
    planned = sorted(
        ((p, official[p.name]) for p in tarballs if p.name in official),
        key=lambda item: TAGS[tag].variants.index(item[1]),
    )
    return planned, [p for p in tarballs if p.name not in official]


def publish_family(
    tarball_dir: str | Path,
    tag: str,
    *,
    org: str = HUB_ORG,
    out_dir: str | Path | None = None,
    private: bool = False,
    verify: bool = False,
    progress: bool = False,
) -> list[FamilyRow]:
    """Convert and publish every official `tag` tarball in `tarball_dir` to `org/<variant>.<tag>`.

    Conversions are kept in `out_dir` (default TARBALL_DIR/converted) and reused on the next run, whose pushes
    then find the repos up to date: a run resumes where the last one stopped. A bad tarball fails its row and
    the others go on; a Hub error stops the run (the Hub is what every row needs).
    """
    planned, others = _family_tarballs(tarball_dir, tag)
    if not planned:
        example = PurePosixPath(official_url(TAGS[tag].variants[0], tag)).name
        raise CheckpointError(f'{tarball_dir}: no {tag} checkpoint tarballs (official names, e.g. {example})')
    out = Path(out_dir) if out_dir else Path(tarball_dir) / 'converted'
    rows = []
    stopped = ''
    # disable=None: the bar shows only when stderr is a terminal.
    for tarball, variant in tqdm(planned, desc='publishing', unit='model', disable=None if progress else True):
        repo_id = _family_repo_id(variant, tag, org)
        if stopped:
            rows.append(FamilyRow(tarball.name, repo_id, 'not attempted', stopped))
            continue
        try:
            folder = _converted(tarball, variant, tag, out / f'{variant}.{tag}', verify)
            result = push_folder(folder, repo_id, private=private)
        except CheckpointError as err:
            rows.append(FamilyRow(tarball.name, repo_id, 'failed', str(err)))
        except HubError as err:
            rows.append(FamilyRow(tarball.name, repo_id, 'failed', str(err)))
            stopped = 'the run stopped at a Hub error; run again to resume'
        else:
            rows.append(FamilyRow(tarball.name, repo_id, 'pushed' if result.changed else 'up to date', result.commit))
    return rows + [FamilyRow(p.name, '', 'ignored', f'not an official {tag} file name') for p in others]


def _converted(tarball: Path, variant: str, tag: str, folder: Path, verify: bool) -> Path:
    """The conversion of `tarball`, reusing one from an earlier run: converting again costs minutes for the
    large variants and writes the safetensors header in another order, so it would never match what was pushed."""
    if not (folder.is_dir() and _reusable(folder, tarball, verify)):
        convert(str(tarball), folder, variant=variant, tag=tag, verify=verify, overwrite=True)
    return folder


def _reusable(folder: Path, tarball: Path, verify: bool) -> bool:
    try:
        metadata = _safetensors_metadata(folder / 'model.safetensors')
        config = json.loads((folder / 'config.json').read_text())
        archive = json.loads(metadata['source_files'])[0]
    except (CheckpointError, OSError, json.JSONDecodeError, KeyError, IndexError):
        return False  # not a complete earlier conversion: convert again
    return (
        metadata.get('converter') == f'effnet-timm {CONVERTER_VERSION}'
        and (not verify or bool((config.get('effnet_timm') or {}).get('verification')))
        and archive.get('name') == tarball.name
        and archive.get('sha256') == sha256_file(tarball)
    )
