"""Official checkpoint → a folder timm loads: `model.safetensors`, `config.json`, `README.md`."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import effnet_timm  # noqa: F401  (registers the architectures with timm)
from effnet_timm.files import new_file_mode
from effnet_timm.models.config import ALL_VARIANTS
from effnet_timm.weights.integrity import file_digests, sha256_file
from effnet_timm.weights.tags import (
    TAGS,
    family_cfg,
    official_url,
    pretrained_cfg,
    tag_of_official_path,
    tag_of_sha256,
)

from .errors import CheckpointError, OutputError
from .mapping import EMA_SUFFIX, RMSPROP_SUFFIXES, Architecture, detect_architecture, to_torch_layout
from .sources import ResolvedSource, resolve_source
from .tf_bundle import TensorBundle

CONVERTER_VERSION = effnet_timm.__version__
NO_TAG = 'none'  # tag=NO_TAG: convert without a checkpoint family (ImageNet mean/std written, no tag recorded)
MAX_IMAGE_SIZE = 4096  # beyond any official eval size (L2: 800) by 5x; larger is a typo, not a config


@dataclass
class Weights:
    """The state dict read from a checkpoint, with the official variables it came from."""

    architecture: Architecture
    state_dict: dict[str, torch.Tensor]
    official: dict[str, np.ndarray]  # '<scope>/<name>' → chosen value in TF layout, if kept (TF references)
    ema_used: bool
    global_step: int | None
    raw_fallback: list[str] = field(default_factory=list)  # with --allow-partial-ema: variables without shadows

    @property
    def ema_label(self) -> str:
        """'true', 'false' or 'partial' (EMA shadows where present, raw values for `raw_fallback`)."""
        return 'partial' if self.ema_used and self.raw_fallback else str(self.ema_used).lower()


@dataclass
class ConversionResult:
    out_dir: Path
    architecture: Architecture
    tag: str | None
    ema_used: bool
    num_tensors: int
    num_parameters: int
    seconds: float
    sources: list[dict[str, str]]
    verification: dict[str, object] | None = None
    notes: list[str] = field(default_factory=list)
    raw_fallback: list[str] = field(default_factory=list)


def read_weights(
    bundle: TensorBundle,
    variant: str | None = None,
    ema: bool = True,
    allow_partial_ema: bool = False,
    progress: bool = False,
    keep_official: bool = True,
    tag: str | None = None,
) -> Weights:
    """Fill every tensor of the detected architecture exactly once; anything unexpected is an error.

    `tag` is checked against the detected variant before any tensor is read."""
    shapes = {name: bundle.shape(name) for name in bundle.keys()}
    try:
        arch = detect_architecture(shapes, variant)
    except CheckpointError as err:
        raise CheckpointError(f'{bundle.index_path}: {err}') from None
    if tag is not None:
        check_tag(tag, arch.variant)
    global_step = bundle.global_step  # checked (an int64 scalar) before the long read
    slots = arch.layout()
    names = {slot: arch.tf_name(slot) for slot in slots}
    ema_used = ema and _use_ema(names.values(), shapes, bundle, allow_partial_ema)

    state: dict[str, torch.Tensor] = {}
    official: dict[str, np.ndarray] = {}
    used = set()
    raw_fallback = []
    for slot in _progress(slots, progress, 'reading tensors'):
        name = names[slot]
        source = name + EMA_SUFFIX if ema_used and name + EMA_SUFFIX in shapes else name
        if ema_used and source == name:
            raw_fallback.append(name)
        value = _read_variable(bundle, source, slot.tf_shape)
        state[slot.key] = torch.from_numpy(to_torch_layout(value, slot.layout, slot.expert_shape))
        if keep_official:  # a second copy of the weights: only --verify needs it
            official[name] = value
        used.add(source)
    _check_leftovers(bundle, shapes, used, names.values())
    for name in shapes.keys() - used:
        bundle.get(name)  # CRC-checks the tensors not converted too: a damaged file is not to be trusted
    return Weights(arch, state, official, ema_used, global_step, raw_fallback)


def _read_variable(bundle: TensorBundle, source: str, shape: tuple[int, ...]) -> np.ndarray:
    """One model variable as the official graph stores it: float32, the layout's shape, finite values.

    A cast would hide what the file holds (float16 rounding, int32 truncation), and NaN/Inf in a weight
    gives NaN logits: both are refused, not repaired."""
    if bundle.shape(source) != shape:
        raise CheckpointError(f"{bundle.index_path}: tensor '{source}': shape {bundle.shape(source)}, expected {shape}")
    dtype = bundle.dtype(source)
    if dtype != np.float32:
        raise CheckpointError(
            f"{bundle.index_path}: tensor '{source}': dtype {dtype}, expected float32 "
            f"(the official variables' dtype; not cast)"
        )
    value = bundle.get(source)
    finite = np.isfinite(value)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise CheckpointError(
            f"{bundle.data_path(source)}: tensor '{source}': {bad} of {value.size} values are "
            f'NaN or Inf (first at index {first}: {value[first]})'
        )
    return value


def _use_ema(names, shapes, bundle: TensorBundle, allow_partial: bool) -> bool:
    names = list(names)
    missing = [n for n in names if n + EMA_SUFFIX not in shapes]
    if len(missing) == len(names):
        return False  # no shadows at all (e.g. an `--export_ckpt` re-save): the raw values are the weights
    if missing and not allow_partial:
        raise CheckpointError(
            f'{bundle.index_path}: only {len(names) - len(missing)} of {len(names)} variables have '
            f"{EMA_SUFFIX} shadows (first missing: '{missing[0]}'); pass --allow-partial-ema to use raw values "
            f'for those, or --no-ema'
        )
    return True


def _check_leftovers(bundle: TensorBundle, shapes, used, model_names) -> None:
    """Only bookkeeping may stay unread: global_step, optimizer slots and the EMA/raw copies not chosen."""
    model_names = set(model_names)
    unexpected = []
    for name in shapes:
        if name in used or name == 'global_step' or name.endswith(RMSPROP_SUFFIXES):
            continue
        base = name[: -len(EMA_SUFFIX)] if name.endswith(EMA_SUFFIX) else name
        if base in model_names:
            continue
        unexpected.append(name)
    if unexpected:
        more = f' and {len(unexpected) - 3} more' if len(unexpected) > 3 else ''
        raise CheckpointError(
            f'{bundle.index_path}: {len(unexpected)} unexpected variables: {", ".join(unexpected[:3])}{more}'
        )


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit='tensor', leave=False)


def build_model(arch: Architecture, tag: str | None = None, image_size: int | None = None) -> torch.nn.Module:
    """The timm model for `arch`, with the pretrained cfg (preprocessing) of `tag`."""
    import timm

    cfg = _pretrained_cfg(arch, tag, image_size)
    return timm.create_model(arch.variant, pretrained=False, pretrained_cfg=cfg, **arch.model_args).eval()


def _pretrained_cfg(arch: Architecture, tag: str | None, image_size: int | None) -> dict[str, object]:
    if tag is not None:
        check_tag(tag, arch.variant)
    overrides = {**family_cfg(arch.family), 'architecture': arch.variant, 'num_classes': arch.num_classes}
    overrides.pop('label_offset', None)  # the converted file keeps every official logit (see _label_offset)
    cfg = pretrained_cfg(arch.variant, tag, image_size, **overrides)
    cfg.pop('hf_hub_id', None)  # the converted folder is the weight source, not the Hub
    return cfg


def check_tag(tag: str, variant: str | None = None) -> None:
    """`tag` names a checkpoint family (that has `variant`, when given) or is NO_TAG, or CheckpointError."""
    if tag == NO_TAG:
        return
    if tag not in TAGS:
        raise CheckpointError(f"unknown tag '{tag}' (known: {', '.join(TAGS)})")
    if variant is not None and variant not in TAGS[tag].variants:
        raise CheckpointError(
            f"tag '{tag}' has no official {variant} checkpoint (it has: {', '.join(TAGS[tag].variants)})"
        )


def check_image_size(image_size: int | None) -> None:
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE
    ):
        raise CheckpointError(f'image size {image_size!r}: expected a whole number of pixels, 1 to {MAX_IMAGE_SIZE}')


def tag_of_source(resolved: ResolvedSource, variant: str) -> str | None:
    """The checkpoint family of `resolved`, never guessed from free text: its official location
    (`.../<family folder>/<official file name>`, as in TAGS) or its pinned sha256; None when neither tells.

    Raises CheckpointError (asking for --tag) when neither tells and `variant`'s families differ in mean/std:
    the wrong one would give silently wrong accuracy that --verify cannot see."""
    tag = tag_of_official_path(resolved.origin, variant)
    if tag is None and resolved.archive_sha256:
        tag = tag_of_sha256(resolved.archive_sha256, variant)
    if tag is not None:
        return tag
    families = [t for t, spec in TAGS.items() if variant in spec.variants]
    if len({(TAGS[t].mean, TAGS[t].std) for t in families}) > 1:
        raise CheckpointError(
            f'{resolved.origin}: which {variant} checkpoint family is this? Its path is not an official one and '
            f'its sha256 is not pinned, and the families differ in input normalization: pass --tag '
            f'({", ".join(families)}, or {NO_TAG})'
        )
    return None


def convert(
    source: str,
    out_dir: os.PathLike,
    variant: str | None = None,
    tag: str | None = None,
    ema: bool = True,
    allow_partial_ema: bool = False,
    image_size: int | None = None,
    sha256: str | None = None,
    verify: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionResult:
    """Convert an official checkpoint (dir, prefix, tarball or URL) into `out_dir`, atomically.

    Everything is written into a temporary folder beside `out_dir` (named `.<name>.tmp-<host>-<pid>-<rand>`;
    a later run removes those whose process is dead) and renamed into place at the end, under a lock on the
    parent folder: of several conversions to one `out_dir`, exactly one wins and the others raise. Nothing is
    left behind on failure, including parent folders this call created.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    check_image_size(image_size)
    if tag is not None:
        check_tag(tag)  # an unknown name fails before any download or read
    _remove_stale_temps(out_dir)  # first: it may put back a folder a killed --overwrite run had moved aside
    if os.path.lexists(out_dir) and not overwrite:
        raise CheckpointError(f'{out_dir}: already exists (pass --overwrite to replace it)')
    created = _make_parents(out_dir.parent)
    done = False
    try:
        work = _output_call(out_dir, lambda: Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir), dir=out_dir.parent)))
        try:
            result = _convert_into(
                work,
                source,
                out_dir,
                variant,
                tag,
                ema,
                allow_partial_ema,
                image_size,
                sha256,
                verify,
                overwrite,
                progress,
            )
        finally:
            if not (os.path.lexists(work / _REPLACED) and not os.path.lexists(out_dir)):
                shutil.rmtree(work, ignore_errors=True)
            # else the swap failed both ways: the previous output stays in `work` for the next run to put back
        result.seconds = time.perf_counter() - started
        done = True
        return result
    finally:
        if not done:
            _remove_created(created)


def _convert_into(
    work: Path,
    source: str,
    out_dir: Path,
    variant: str | None,
    tag: str | None,
    ema: bool,
    allow_partial_ema: bool,
    image_size: int | None,
    sha256: str | None,
    verify: bool,
    overwrite: bool,
    progress: bool,
) -> ConversionResult:
    resolved = resolve_source(source, work / 'source', sha256, max_unpacked=_unpack_cap(variant))
    with TensorBundle(resolved.prefix) as bundle:
        weights = read_weights(bundle, variant, ema, allow_partial_ema, progress, keep_official=verify, tag=tag)
    notes = []
    if tag is None:
        tag = tag_of_source(resolved, weights.architecture.variant)
    elif tag == NO_TAG:
        tag = None
    if tag is None:
        notes.append('no checkpoint family: ImageNet mean/std written (choose the preprocessing when loading)')
    if weights.raw_fallback:
        notes.append(
            f'--allow-partial-ema: {len(weights.raw_fallback)} variables have no EMA shadow and use raw '
            f'values (first: {weights.raw_fallback[0]})'
        )
    model = build_model(weights.architecture, tag, image_size)
    model.load_state_dict(weights.state_dict, strict=True, assign=True)  # adopt the arrays, no copy
    sources = _source_files(resolved)
    verification = None
    if verify:
        from .verify import verify_against_tensorflow

        verification = verify_against_tensorflow(model, weights)
    result = ConversionResult(
        out_dir,
        weights.architecture,
        tag,
        weights.ema_used,
        len(weights.state_dict),
        sum(p.numel() for p in model.parameters()),
        0.0,
        sources,
        verification,
        notes,
        weights.raw_fallback,
    )
    staging = work / 'out'
    _output_call(out_dir, lambda: staging.mkdir())
    _output_call(out_dir, lambda: _write_folder(staging, model, weights, result, resolved))
    _output_call(out_dir, lambda: _move_into_place(staging, out_dir, work, overwrite))
    return result


def _label_offset(config_path: Path, arch: Architecture) -> None:
    """EdgeTPU: the file keeps the official 1001 logits (0: background); the config asks timm for a 1000-class
    model and `label_offset` 1 (timm's convention: loading drops the first row), so logits are ImageNet's."""
    offset = family_cfg(arch.family).get('label_offset', 0)
    if not offset or arch.num_classes != 1000 + offset:
        return
    config = json.loads(config_path.read_text())
    config['num_classes'] = config['model_args']['num_classes'] = config['pretrained_cfg']['num_classes'] = 1000
    config['pretrained_cfg']['label_offset'] = offset
    config_path.write_text(json.dumps(config, indent=4))


def _unpack_cap(variant: str | None) -> int | None:
    """Bytes of checkpoint files an official `variant` can need: 4-byte values of every tensor, four times over
    (raw, EMA shadow, two RMSProp slots), plus room for the index. None when no variant is expected."""
    if variant not in ALL_VARIANTS:
        return None
    import timm

    with torch.device('meta'):
        numel = sum(t.numel() for t in timm.create_model(variant).state_dict().values())
    return numel * 4 * 4 + (16 << 20)


def _output_call(out_dir: Path, write):
    """Run an output step; an OS error (read-only, full disk, a file in the way) becomes one line."""
    try:
        return write()
    except OSError as err:
        where = err.filename or out_dir
        raise OutputError(
            f'{out_dir}: cannot write the output ({where}: '
            f'{err.strerror or errno.errorcode.get(err.errno or 0, str(err))})'
        ) from None
    except SafetensorError as err:  # safetensors reports its own I/O errors (a full disk, a size limit) this way
        raise OutputError(f'{out_dir}: cannot write the output ({" ".join(str(err).split())})') from None


def _make_parents(parent: Path) -> list[Path]:
    """Create `parent` and its missing ancestors; returns those created, outermost first."""
    missing = []
    for path in (parent, *parent.parents):
        if os.path.lexists(path):
            break
        missing.append(path)
    created = []
    try:
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:  # another conversion made it meanwhile: use it, but it is not ours to remove
                continue
            created.append(path)
        if not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
    except OSError as err:
        _remove_created(created)
        raise OutputError(
            f'{parent}: cannot create the output folder here ({err.filename or parent}: {err.strerror or err})'
        ) from None
    return created


def _remove_created(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            path.rmdir()  # only if still empty: another process may have put something there meanwhile
        except OSError:
            break


_REPLACED = 'replaced'  # inside a temp folder: the previous out_dir while --overwrite swaps it


def _host() -> str:
    return re.sub(r'[^A-Za-z0-9.]', '_', socket.gethostname()) or 'host'


def _temp_prefix(out_dir: Path) -> str:
    return f'.{out_dir.name}.tmp-{_host()}-{os.getpid()}-'


def _remove_stale_temps(out_dir: Path) -> None:
    """Remove temp folders of earlier conversions to `out_dir` on this host whose process is gone (killed).

    One killed between moving the old `out_dir` aside and renaming the new one in (`_move_into_place`) holds
    the previous output: that is put back, not deleted."""
    pattern = re.compile(rf'^\.{re.escape(out_dir.name)}\.tmp-{re.escape(_host())}-(\d+)-[A-Za-z0-9_]+$')
    try:
        names = os.listdir(out_dir.parent)
    except OSError:
        return
    for name in names:
        match = pattern.match(name)
        if match and not _alive(int(match.group(1))):
            stale = out_dir.parent / name
            replaced = stale / _REPLACED
            if os.path.lexists(replaced):
                try:
                    if not os.path.lexists(out_dir):
                        os.rename(replaced, out_dir)  # refused, not merged, if another run put one there meanwhile
                except OSError:
                    continue  # leave it all for a person to look at rather than delete the only copy
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _move_into_place(staging: Path, out_dir: Path, work: Path, overwrite: bool) -> None:
    """Rename the finished folder to `out_dir`. No lock (a directory lock fails on NFS): a rename onto a folder
    that is not empty fails atomically, so of concurrent conversions to one folder exactly one wins."""
    if os.path.lexists(out_dir):
        if not overwrite:
            raise _taken(out_dir)
        old = work / _REPLACED
        os.rename(out_dir, old)  # moved aside, not deleted, until the new folder is in place
        try:
            os.rename(staging, out_dir)
        except OSError:
            os.rename(old, out_dir)
            raise
    else:
        try:
            os.rename(staging, out_dir)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise _taken(out_dir) from None
            raise


def _taken(out_dir: Path) -> CheckpointError:
    return CheckpointError(
        f'{out_dir}: was created by another process while converting; left as it is (pass --overwrite to replace it)'
    )


def _source_files(resolved: ResolvedSource) -> list[dict[str, str]]:
    files = [dict(name=p.name, sha256=sha256_file(p)) for p in resolved.files]
    if resolved.archive_sha256:
        files.insert(0, dict(name=Path(resolved.origin).name, sha256=resolved.archive_sha256))
    return files


def _write_folder(
    folder: Path, model: torch.nn.Module, weights: Weights, result: ConversionResult, resolved: ResolvedSource
) -> None:
    from effnet_timm.compat import save_config_for_hf

    arch = weights.architecture
    metadata = {
        'format': 'pt',
        'variant': arch.variant,
        'width_coefficient': str(arch.width),
        'depth_coefficient': str(arch.depth),
        'tag': result.tag or '',
        'ema': weights.ema_label,
        **({'ema_raw_fallback': json.dumps(weights.raw_fallback)} if weights.raw_fallback else {}),
        'tf_scope': arch.scope,
        **({'family': arch.family, 'num_experts': str(arch.num_experts)} if arch.family != 'efficientnet' else {}),
        'global_step': '' if weights.global_step is None else str(weights.global_step),
        'source': _public_source(resolved.origin),
        'source_files': json.dumps(result.sources),
        'converter': f'effnet-timm {CONVERTER_VERSION}',
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    save_file(state, str(folder / 'model.safetensors'), metadata=metadata)
    os.chmod(folder / 'model.safetensors', new_file_mode(folder))  # safetensors creates it private
    save_config_for_hf(model, str(folder / 'config.json'), model_args=arch.model_args)
    _label_offset(folder / 'config.json', arch)
    _add_provenance(folder / 'config.json', metadata, result, file_digests(folder))
    from .model_card import model_card

    (folder / 'README.md').write_text(model_card(model, metadata, result))


def _public_source(origin: str) -> str:
    """The source as it may be published: a URL as given, a local path by its name only."""
    return origin if '://' in origin else Path(origin.rstrip('/')).name


def _add_provenance(
    config_path: Path, metadata: dict[str, str], result: ConversionResult, files: dict[str, dict[str, object]]
) -> None:
    # Root-level keys: timm ignores them when loading, unlike unknown keys inside pretrained_cfg.
    config = json.loads(config_path.read_text())
    if result.tag:
        config['pretrained_cfg']['tag'] = result.tag  # local-dir:/hf-hub: loads then report the tag too
    config['effnet_timm'] = {
        'source': metadata['source'],
        'source_files': result.sources,
        'ema': True if metadata['ema'] == 'true' else False if metadata['ema'] == 'false' else 'partial',
        'tf_scope': metadata['tf_scope'],
        'converter': metadata['converter'],
        'verification': result.verification,
        'files': files,  # size and sha256 of model.safetensors: effnet_timm.weights.integrity.verify_folder
    }
    if result.raw_fallback:
        config['effnet_timm']['ema_raw_fallback'] = result.raw_fallback
    if result.tag and result.architecture.variant in TAGS[result.tag].variants:
        config['effnet_timm']['official_url'] = official_url(result.architecture.variant, result.tag)
    config_path.write_text(json.dumps(config, indent=2) + '\n')
