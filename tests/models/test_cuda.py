"""CUDA: the memory-lean training path and `validate` under nccl, wherever a GPU is present.

On CPU the BatchNorm kernel itself computes `x * alpha + beta`, which is exactly what the memory-lean path
recomputes in backward, so CPU gradients match plain autograd closely. On CUDA the forward kernel (cuDNN or
the native one) rounds differently from the recomputation, and autocast and GradScaler add their own
rounding: this module checks that the memory-lean path stays as close to the exact result as plain autograd.

Reference: timm's `tf_efficientnet` (plain autograd, TF's decay 0.99 set as momentum 0.01) with the same weights
in float64 on the GPU. Tolerance, per parameter gradient and per BatchNorm buffer: the memory-lean error is at
most twice plain autograd's error at the same precision (both are rounding: the recomputed `x * scale + shift`
differs from the kernel's output by an ulp or so of its dtype, which a gradient can pass on but not amplify
beyond what the rounding of the rest of the step does), plus a floor for values that are rounding noise
themselves (the gradient of a bias followed by a training BatchNorm is zero in exact arithmetic).

The whole module is skipped only where no CUDA GPU is visible, and says so; it is not skipped in CI otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import FIXTURES, REPO, SAMPLES, load_manifest, realistic_init_

import effnet_timm  # noqa: F401  (registers the models)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason='needs a CUDA GPU: torch.cuda.is_available() is False on this machine',
)

DEVICE = 'cuda'
HALF = dict(width_coefficient=0.5, depth_coefficient=0.5)
# mode: (autocast dtype or None, GradScaler, channels_last, floor relative to the reference's norm)
MODES: dict[str, tuple[torch.dtype | None, bool, bool, float]] = {
    'fp32': (None, False, False, 1e-5),
    'fp32_channels_last': (None, False, True, 1e-5),
    'bf16_autocast': (torch.bfloat16, False, False, 1e-2),  # bf16 keeps 8 significant bits: 2^-8 = 0.4 %
    'bf16_autocast_channels_last': (torch.bfloat16, False, True, 1e-2),
    'fp16_autocast_grad_scaler': (torch.float16, True, False, 1e-3),  # fp16: 11 bits, 2^-11 = 0.05 %
}


@pytest.fixture(autouse=True)
def _exact_fp32() -> Iterator[None]:
    """No TF32 (fp32 convs and matmuls in 10-bit mantissas would swamp what is checked), a fixed algorithm."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = flags


@pytest.fixture(scope='module')
def half_state() -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():
        model = timm.create_model('effnet_v1', **HALF, drop_rate=0.0, drop_path_rate=0.0)
        return realistic_init_(model, calib_size=64).state_dict()


def _ours(state: dict, memory_efficient: bool = True) -> torch.nn.Module:
    model = timm.create_model('effnet_v1', **HALF, drop_rate=0.0, drop_path_rate=0.0)
    model.load_state_dict(state)
    model.set_memory_efficient(memory_efficient)
    return model.to(DEVICE)


def _timm_reference(state: dict) -> torch.nn.Module:
    from timm.models.efficientnet import _gen_efficientnet

    model = _gen_efficientnet(
        'tf_efficientnet_b0',
        channel_multiplier=0.5,
        depth_multiplier=0.5,
        pretrained=False,
        bn_eps=1e-3,
        pad_type='same',
        drop_rate=0.0,
        drop_path_rate=0.0,
    )
    model.load_state_dict(state)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.01  # TF's decay 0.99 (timm keeps PyTorch's 0.1 for tf_* models)
    return model.to(DEVICE, torch.float64)


def _input() -> torch.Tensor:
    return torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)


def _step(model: torch.nn.Module, x: torch.Tensor, mode: str) -> tuple[dict, dict]:
    """One training step's parameter gradients (unscaled, fp64) and BatchNorm buffers (fp64) after it."""
    dtype, scaled, channels_last, _ = MODES.get(mode, (None, False, False, 0.0))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    device_type = torch.device(DEVICE).type
    autocast = torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    scale = 2.0**16 if scaled else 1.0
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    while True:
        model.train().zero_grad()
        with autocast:
            loss = model(x.to(next(model.parameters()).dtype)).float().square().mean()
        if not scaled:
            loss.backward()
            break
        # GradScaler's loop: a step whose scaled fp16 gradients overflow is skipped and the scale lowered.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler(device_type, init_scale=scale)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # gradients divided by the scale, as before optimizer.step()
        if all(torch.isfinite(p.grad).all() for p in model.parameters()) or scale <= 1.0:
            break
        scale /= 2.0**4
        with torch.no_grad():  # the skipped step's forward updated the statistics: undo it
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values()), f'{mode}: a non-finite gradient'
    return grads, {n: b.double() for n, b in model.named_buffers()}


def _no_further_than_plain(got: dict, plain: dict, exact: dict, floor: float, what: str) -> None:
    scale = torch.cat([t.flatten() for t in exact.values()]).norm()
    worse = {}
    for name, ref in exact.items():
        if not ref.is_floating_point():
            continue
        err, plain_err = (got[name] - ref).norm(), (plain[name] - ref).norm()
        if err > 2 * plain_err + floor * ref.norm() + 1e-7 * scale:
            worse[name] = f'{float(err / ref.norm()):.2e} vs plain {float(plain_err / ref.norm()):.2e}'
    assert not worse, f'{what} further from exact than plain autograd: {worse}'


@pytest.mark.parametrize('mode', list(MODES))
def test_memory_lean_training_on_cuda_is_as_exact_as_plain_autograd(half_state, mode):
    x = _input()
    exact_grads, exact_buffers = _step(_timm_reference(half_state), x.double(), 'fp64')
    lean_grads, lean_buffers = _step(_ours(half_state), x, mode)
    plain_grads, plain_buffers = _step(_ours(half_state, memory_efficient=False), x, mode)
    floor = MODES[mode][3]
    _no_further_than_plain(lean_grads, plain_grads, exact_grads, floor, f'{mode} gradients')
    _no_further_than_plain(lean_buffers, plain_buffers, exact_buffers, floor, f'{mode} BatchNorm buffers')
    counts = {n: int(b) for n, b in lean_buffers.items() if n.endswith('num_batches_tracked')}
    assert counts == {n: int(b) for n, b in exact_buffers.items() if n.endswith('num_batches_tracked')}


@pytest.mark.parametrize('mode', ['fp32', 'bf16_autocast'])
def test_checkpointed_step_on_cuda_leaves_buffers_of_a_plain_step(half_state, mode):
    """Gradient checkpointing re-runs the BatchNorms in backward; their buffers must hold one update, bit-equal
    to a plain (not checkpointed) step, whose forward runs the same kernels."""
    x = _input()
    plain_grads, plain_buffers = _step(_ours(half_state, memory_efficient=False), x, mode)
    model = _ours(half_state)
    model.set_grad_checkpointing(True)
    grads, buffers = _step(model, x, mode)
    assert not [n for n, b in buffers.items() if not torch.equal(b, plain_buffers[n])]
    # cuDNN may sum weight gradients in another order from run to run: 1e-6 of each gradient's norm.
    for name, g in grads.items():
        assert (g - plain_grads[name]).norm() <= 1e-6 * plain_grads[name].norm() + 1e-12, name


def test_batch_of_one_per_channel_raises_on_cuda(half_state):
    with pytest.raises(ValueError, match='Expected more than 1 value per channel when training'):
        _ours(half_state).train()(torch.randn(1, 3, 32, 32, device=DEVICE))


# ----------------------------------------------------------------------------- validate under torchrun + nccl

TINY = FIXTURES / 'efficientnet-tiny'


def _val_folder(root: Path) -> int:
    """The sample photos filed under the synset of the official graph's top-1 (96 px, crop fraction 0.875)."""
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo('imagenet-1k').label_names()
    logits = np.load(TINY / 'logits_ema.npy')
    names = [image['name'] for image in load_manifest(TINY / 'manifest.json')['images']]
    for name, row in zip(names, logits):
        folder = root / synsets[int(row.argmax())]
        folder.mkdir(parents=True, exist_ok=True)
        for copy in range(2):  # 2 copies each: an odd split over ranks needs no more
            shutil.copy(SAMPLES / f'{name}.jpg', folder / f'{name}_{copy}.JPEG')
    return 2 * len(names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=f'needs two CUDA GPUs for torchrun with nccl: {torch.cuda.device_count()} visible',
)
def test_validate_under_torchrun_with_nccl_gives_the_one_process_numbers(tmp_path, converted_tiny):
    val = tmp_path / 'val'
    n = _val_folder(val)
    script = str(Path(sys.executable).parent / 'effnet-timm')
    common = [val, '--weights', converted_tiny, '--crop', 'fraction', '-b', 3, '-j', 0, '--no-progress']
    common += ['--device', 'cuda']
    one = _run([script, 'validate', *map(str, common), '--per-image', str(tmp_path / 'one.csv'), '--json'])
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2', '--master-addr', '127.0.0.1']
    torchrun += ['--master-port', str(_free_port()), '--no-python', script, 'validate']
    two = _run([*torchrun, *map(str, common), '--per-image', str(tmp_path / 'two.csv'), '--json'])
    assert two.returncode == 0, two.stderr[-3000:]
    one_result, two_result = json.loads(one.stdout), json.loads(two.stdout)
    assert (two_result['processes'], two_result['device']) == (2, 'cuda')
    assert two_result['num_images'] == one_result['num_images'] == n
    assert two_result['top1_count'] == one_result['top1_count'] == n  # each photo under its official top-1
    assert (tmp_path / 'two.csv').read_text() == (tmp_path / 'one.csv').read_text()
