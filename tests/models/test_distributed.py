"""DDP and FSDP2 (2 ranks, gloo, CPU) compute the gradients of the same micro-batches run in one process.

One `torchrun` launch runs every configuration (this file is also the worker script: `python -m
torch.distributed.run ... tests/models/test_distributed.py OUT`); the test process computes the reference without any
distributed code: the same initial weights, each rank's micro-batch run on its own (BatchNorm uses per-micro-batch
statistics under DDP and FSDP), the gradients averaged over the micro-batches. Dropout and stochastic depth stay
on, seeded per micro-batch identically on both sides. The reference is never checkpointed: a checkpointed
configuration must leave the BatchNorm buffers (updated once) and the gradients of a plain step.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchrun_util import failure_report, free_port, loopback_env

WORLD = 2
BATCH, SIZE, CLASSES = 4, 64, 10  # per rank; 64 px leaves a 2x2 map at the head, enough for batch statistics
MODEL = dict(width_coefficient=0.25, depth_coefficient=0.25, num_classes=CLASSES, drop_rate=0.2, drop_path_rate=0.2)
# name: (wrapper, FSDP2 unit, gradient checkpointing per '' / 'block' / 'stage', BatchNorm: 'ours' or 'syncbn'
# (timm's convert_sync_batchnorm, then a plain BatchNorm2d stand-in for each SyncBatchNorm: its synchronised
# forward needs CUDA)). The default (memory-lean) training path is on in all.
CONFIGS: dict[str, tuple[str, str, str, str]] = {
    'ddp': ('ddp', '', '', 'ours'),
    'ddp_ckpt': ('ddp', '', 'block', 'ours'),
    'ddp_stage_ckpt': ('ddp', '', 'stage', 'ours'),
    'ddp_syncbn_ckpt': ('ddp', '', 'block', 'syncbn'),
    'fsdp2_stage': ('fsdp2', 'stage', '', 'ours'),  # the usual FSDP2 recipe: one unit per stage, then the root
    'fsdp2_block_ckpt': ('fsdp2', 'block', 'block', 'ours'),
    'fsdp2_stage_ckpt': ('fsdp2', 'stage', 'block', 'ours'),
    'fsdp2_stage_stage_ckpt': ('fsdp2', 'stage', 'stage', 'ours'),
    'fsdp2_syncbn_stage_ckpt': ('fsdp2', 'stage', 'stage', 'syncbn'),
}
SEED = 1000


def create_model(checkpointing: str, norm: str = 'ours') -> torch.nn.Module:
    import timm

    import effnet_timm  # noqa: F401  (registers effnet_v1)

    model = timm.create_model('effnet_v1', **MODEL)
    # The default under test: memory-lean training (`EffNetV1.memory_efficient`, on unless switched off).
    assert getattr(model, 'memory_efficient', True), 'memory-lean training is not the default'
    if norm == 'syncbn':
        model = batch_norm_stand_in(timm.layers.convert_sync_batchnorm(model))
    if checkpointing == 'block':
        model.set_grad_checkpointing(True)
    elif checkpointing == 'stage':  # each stage checkpointed from outside
        from effnet_timm.models.recompute import checkpoint

        stages = model.blocks

        def forward(x: torch.Tensor) -> torch.Tensor:
            for stage in stages:
                x = checkpoint(stage, x)
            return x

        stages.forward = forward
    return model.train()


def batch_norm_stand_in(model: torch.nn.Module) -> torch.nn.Module:
    """Each SyncBatchNorm replaced by a plain BatchNorm2d with its settings (what it computes in one process)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.SyncBatchNorm):
            plain = torch.nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine)
            plain.load_state_dict(module.state_dict())
            parent, _, attr = name.rpartition('.')
            setattr(model.get_submodule(parent), attr, plain)
    return model


def micro_batch_grads(state: dict, x: torch.Tensor, y: torch.Tensor, rank: int, checkpointing: str, norm: str):
    """One micro-batch in one process, never checkpointed: loss, parameter gradients and the BatchNorm buffers
    after the step. Checkpointing computes plain autograd (no recomputed activations), so a checkpointed
    configuration is compared with a plain-autograd step."""
    model = create_model('', norm)
    model.load_state_dict(state)
    model.set_memory_efficient(not checkpointing)
    torch.manual_seed(SEED + rank)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return loss.detach(), grads, buffers


# ----------------------------------------------------------------------------- the worker (one per rank)


def _wrap(model: torch.nn.Module, wrapper: str, unit: str) -> torch.nn.Module:
    if wrapper == 'ddp':
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for stage in model.blocks:
        for module in (stage,) if unit == 'stage' else stage:
            fully_shard(module)
    fully_shard(model)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, 'full_tensor') else t  # FSDP2 gradients are sharded DTensors


def worker(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group('gloo')
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD
    state = torch.load(out / 'init.pt')
    x, y = torch.load(out / 'data.pt')
    for name, (wrapper, unit, checkpointing, norm) in CONFIGS.items():
        model = create_model(checkpointing, norm)
        model.load_state_dict(state)
        wrapped = _wrap(model, wrapper, unit)
        torch.manual_seed(SEED + rank)
        try:
            loss = F.cross_entropy(wrapped(x[rank]), y[rank])
            loss.backward()  # DDP all-reduces, FSDP2 reduce-scatters: both average over the ranks
        except RuntimeError as err:  # both ranks fail alike, before any collective of theirs is left waiting
            torch.save(dict(error=f'{type(err).__name__}: {err}'.splitlines()[0]), out / f'{name}.rank{rank}.pt')
            continue
        grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()}
        buffers = {n: _full(b).detach().clone() for n, b in model.named_buffers()}
        torch.save(dict(loss=loss.detach(), grads=grads, buffers=buffers), out / f'{name}.rank{rank}.pt')
        dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the tests


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--nnodes',
        '1',
        '--nproc-per-node',
        str(WORLD),
        '--master-addr',
        '127.0.0.1',
        '--master-port',
        str(free_port()),
        *args,
    ]


@pytest.fixture(scope='module')
def distributed_run(tmp_path_factory):
    """Initial weights, the two micro-batches, and what each rank saw in each configuration."""
    out = tmp_path_factory.mktemp('distributed')
    torch.manual_seed(0)
    state = create_model('').state_dict()
    x = torch.randn(WORLD, BATCH, 3, SIZE, SIZE)
    y = torch.randint(0, CLASSES, (WORLD, BATCH))
    torch.save(state, out / 'init.pt')
    torch.save((x, y), out / 'data.pt')
    proc = subprocess.run(torchrun(__file__, str(out)), env=loopback_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, failure_report(proc)
    return out, state, x, y


def check_against_one_process(out: Path, name: str, state: dict, x: torch.Tensor, y: torch.Tensor) -> None:
    _, _, checkpointing, norm = CONFIGS[name]
    seen = [torch.load(out / f'{name}.rank{rank}.pt') for rank in range(WORLD)]
    for rank, got in enumerate(seen):
        assert 'error' not in got, f'rank {rank}: {got.get("error")}'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same kernels, the same summation order
    try:
        reference = [micro_batch_grads(state, x[r], y[r], r, checkpointing, norm) for r in range(WORLD)]
    finally:
        torch.set_num_threads(threads)
    expected = {n: (reference[0][1][n] + reference[1][1][n]) / WORLD for n in reference[0][1]}
    for rank, got in enumerate(seen):
        assert torch.equal(got['loss'], reference[rank][0]), f'rank {rank}: loss differs'
        assert got['grads'].keys() == expected.keys()
        for pname, grad in expected.items():
            assert grad.abs().max() > 0, f'{pname}: no gradient in the reference'
            # Bit-equal: the same kernels on one thread, and (g0 + g1) / 2 is what the all-reduce computes
            # for 2 ranks. The tolerance in the message says how far off a failure is.
            err = ((got['grads'][pname] - grad).abs().max() / grad.abs().max()).item()
            assert torch.equal(got['grads'][pname], grad), f'rank {rank} {pname}: max relative |Δgrad| {err:.3g}'
        # BatchNorm running statistics follow the rank's own micro-batch, updated once (also when checkpointed).
        assert got['buffers'].keys() == reference[rank][2].keys()
        for bname, buf in reference[rank][2].items():
            assert torch.equal(got['buffers'][bname], buf), f'rank {rank} buffer {bname}'


@pytest.mark.parametrize('name', list(CONFIGS))
def test_gradients_equal_micro_batches_in_one_process(distributed_run, name):
    out, state, x, y = distributed_run
    check_against_one_process(out, name, state, x, y)


if __name__ == '__main__':
    worker(Path(sys.argv[1]))
