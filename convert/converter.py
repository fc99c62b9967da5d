"""Official checkpoint → a folder timm loads: `model.safetensors`, `config.json`, `README.md`."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import save_file

import effnet_timm  # noqa: F401  (registers the architectures with timm)
from effnet_timm.pretrained import TAGS, official_url, pretrained_cfg

from .errors import CheckpointError
from .mapping import EMA_SUFFIX, RMSPROP_SUFFIXES, Architecture, Slot, detect_architecture, official_layout, \
    to_torch_layout
from .sources import ResolvedSource, resolve_source, sha256_file
from .tf_bundle import TensorBundle

CONVERTER_VERSION = effnet_timm.__version__


@dataclass
class Weights:
    """The state dict read from a checkpoint, with the official variables it came from."""
    architecture: Architecture
    state_dict: Dict[str, torch.Tensor]
    official: Dict[str, np.ndarray]  # '<scope>/<name>' → chosen value in TF layout, if kept (TF references)
    ema_used: bool
    global_step: Optional[int]


@dataclass
class ConversionResult:
    out_dir: Path
    architecture: Architecture
    tag: Optional[str]
    ema_used: bool
    num_tensors: int
    num_parameters: int
    seconds: float
    sources: List[Dict[str, str]]
    verification: Optional[Dict[str, object]] = None
    notes: List[str] = field(default_factory=list)


def read_weights(
        bundle: TensorBundle, variant: Optional[str] = None, ema: bool = True,
        allow_partial_ema: bool = False, progress: bool = False, keep_official: bool = True,
) -> Weights:
    """Fill every tensor of the detected architecture exactly once; anything unexpected is an error."""
    shapes = {name: bundle.shape(name) for name in bundle.keys()}
    arch = detect_architecture(shapes, variant)
    slots = official_layout(arch.width, arch.depth, arch.num_classes, arch.bn)
    names = {slot: f'{arch.scope}/{slot.tf_name}' for slot in slots}
    ema_used = ema and _use_ema(names.values(), shapes, bundle, allow_partial_ema)

    state: Dict[str, torch.Tensor] = {}
    official: Dict[str, np.ndarray] = {}
    used = set()
    for slot in _progress(slots, progress, 'reading tensors'):
        name = names[slot]
        source = name + EMA_SUFFIX if ema_used and name + EMA_SUFFIX in shapes else name
        value = bundle.get(source)
        if value.shape != slot.tf_shape:
            raise CheckpointError(f"{bundle.index_path}: tensor '{source}': shape {value.shape}, expected {slot.tf_shape}")
        value = value.astype(np.float32, copy=False)
        state[slot.key] = torch.from_numpy(to_torch_layout(value, slot.layout))
        if keep_official:  # a second copy of the weights: only --verify needs it
            official[name] = value
        used.add(source)
    _check_leftovers(bundle, shapes, used, names.values())
    for name in shapes.keys() - used:
        bundle.get(name)  # CRC-checks the tensors not converted too: a damaged file is not to be trusted
    return Weights(arch, state, official, ema_used, bundle.global_step)


def _use_ema(names, shapes, bundle: TensorBundle, allow_partial: bool) -> bool:
    names = list(names)
    missing = [n for n in names if n + EMA_SUFFIX not in shapes]
    if len(missing) == len(names):
        return False  # no shadows at all (e.g. an `--export_ckpt` re-save): the raw values are the weights
    if missing and not allow_partial:
        raise CheckpointError(
            f"{bundle.index_path}: only {len(names) - len(missing)} of {len(names)} variables have "
            f"{EMA_SUFFIX} shadows (first missing: '{missing[0]}'); pass --allow-partial-ema to use raw values "
            f"for those, or --no-ema")
    return True


def _check_leftovers(bundle: TensorBundle, shapes, used, model_names) -> None:
    """Only bookkeeping may stay unread: global_step, optimizer slots and the EMA/raw copies not chosen."""
    model_names = set(model_names)
    unexpected = []
    for name in shapes:
        if name in used or name == 'global_step' or name.endswith(RMSPROP_SUFFIXES):
            continue
        base = name[:-len(EMA_SUFFIX)] if name.endswith(EMA_SUFFIX) else name
        if base in model_names:
            continue
        unexpected.append(name)
    if unexpected:
        more = f' and {len(unexpected) - 3} more' if len(unexpected) > 3 else ''
        raise CheckpointError(
            f"{bundle.index_path}: {len(unexpected)} unexpected variables: {', '.join(unexpected[:3])}{more}")


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit='tensor', leave=False)


def build_model(arch: Architecture, tag: Optional[str] = None, image_size: Optional[int] = None) -> torch.nn.Module:
    """The timm model for `arch`, with the pretrained cfg (preprocessing) of `tag`."""
    import timm
    cfg = _pretrained_cfg(arch, tag, image_size)
    return timm.create_model(arch.variant, pretrained=False, pretrained_cfg=cfg, **arch.model_args).eval()


def _pretrained_cfg(arch: Architecture, tag: Optional[str], image_size: Optional[int]) -> Dict[str, object]:
    if tag is not None:
        if tag not in TAGS:
            raise CheckpointError(f"unknown tag '{tag}' (known: {', '.join(TAGS)})")
        if arch.variant not in TAGS[tag].variants:
            raise CheckpointError(f"tag '{tag}' has no official {arch.variant} checkpoint "
                                  f"(it has: {', '.join(TAGS[tag].variants)})")
    cfg = pretrained_cfg(arch.variant, tag, image_size, architecture=arch.variant, num_classes=arch.num_classes)
    cfg.pop('hf_hub_id', None)  # the converted folder is the weight source, not the Hub
    return cfg


def guess_tag(origin: str) -> Optional[str]:
    """The checkpoint family an official tarball's name or URL reveals, if any."""
    text = origin.lower().replace('-', '_')
    if 'noisy_student' in text:
        return 'ns_jft_in1k_475' if '_475' in text else 'ns_jft_in1k'
    for marker, tag in (('randaug', 'ra_in1k'), ('advprop', 'ap_in1k'), ('ckptsaug', 'aa_in1k'), ('/ckpts/', 'in1k')):
        if marker in text:
            return tag
    return None


def convert(
        source: str,
        out_dir: os.PathLike,
        variant: Optional[str] = None,
        tag: Optional[str] = None,
        ema: bool = True,
        allow_partial_ema: bool = False,
        image_size: Optional[int] = None,
        sha256: Optional[str] = None,
        verify: bool = False,
        overwrite: bool = False,
        progress: bool = False,
) -> ConversionResult:
    """Convert an official checkpoint (dir, prefix, tarball or URL) into `out_dir`, atomically."""
    started = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f'{out_dir}: already exists (pass --overwrite to replace it)')
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    try:
        resolved = resolve_source(source, work / 'source', sha256)
        with TensorBundle(resolved.prefix) as bundle:
            weights = read_weights(bundle, variant, ema, allow_partial_ema, progress, keep_official=verify)
        notes = []
        if tag is None:
            tag = guess_tag(resolved.origin)
            if tag is not None and weights.architecture.variant not in TAGS[tag].variants:
                tag = None
        if tag is None:
            notes.append('no --tag: ImageNet mean/std assumed (AdvProp checkpoints need --tag ap_in1k)')
        model = build_model(weights.architecture, tag, image_size)
        model.load_state_dict(weights.state_dict, strict=True, assign=True)  # adopt the arrays, no copy
        sources = _source_files(resolved)
        verification = None
        if verify:
            from .verify import verify_against_tensorflow
            verification = verify_against_tensorflow(model, weights)
        staging = work / 'out'
        staging.mkdir()
        result = ConversionResult(
            out_dir, weights.architecture, tag, weights.ema_used, len(weights.state_dict),
            sum(p.numel() for p in model.parameters()), 0.0, sources, verification, notes)
        _write_folder(staging, model, weights, result, resolved)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
        result.seconds = time.perf_counter() - started
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _source_files(resolved: ResolvedSource) -> List[Dict[str, str]]:
    files = [dict(name=p.name, sha256=sha256_file(p)) for p in resolved.files]
    if resolved.archive_sha256:
        files.insert(0, dict(name=Path(resolved.origin).name, sha256=resolved.archive_sha256))
    return files


def _write_folder(folder: Path, model: torch.nn.Module, weights: Weights, result: ConversionResult,
                  resolved: ResolvedSource) -> None:
    from timm.models._hub import save_config_for_hf
    arch = weights.architecture
    metadata = {
        'format': 'pt',
        'variant': arch.variant,
        'width_coefficient': str(arch.width),
        'depth_coefficient': str(arch.depth),
        'tag': result.tag or '',
        'ema': str(weights.ema_used).lower(),
        'tf_scope': arch.scope,
        'global_step': '' if weights.global_step is None else str(weights.global_step),
        'source': _public_source(resolved.origin),
        'source_files': json.dumps(result.sources),
        'converter': f'effnet-timm {CONVERTER_VERSION}',
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    save_file(state, str(folder / 'model.safetensors'), metadata=metadata)
    os.chmod(folder / 'model.safetensors', 0o666 & ~_umask())  # safetensors creates it private
    save_config_for_hf(model, str(folder / 'config.json'), model_args=arch.model_args)
    _add_provenance(folder / 'config.json', metadata, result)
    from .model_card import model_card
    (folder / 'README.md').write_text(model_card(model, metadata, result))


def _public_source(origin: str) -> str:
    """The source as it may be published: a URL as given, a local path by its name only."""
    return origin if '://' in origin else Path(origin.rstrip('/')).name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _add_provenance(config_path: Path, metadata: Dict[str, str], result: ConversionResult) -> None:
    # Root-level keys: timm ignores them when loading, unlike unknown keys inside pretrained_cfg.
    config = json.loads(config_path.read_text())
    config['effnet_timm'] = {
        'source': metadata['source'],
        'source_files': result.sources,
        'ema': result.ema_used,
        'tf_scope': metadata['tf_scope'],
        'converter': metadata['converter'],
        'verification': result.verification,
    }
    if result.tag and result.architecture.variant in TAGS[result.tag].variants:
        config['effnet_timm']['official_url'] = official_url(result.architecture.variant, result.tag)
    config_path.write_text(json.dumps(config, indent=2) + '\n')
