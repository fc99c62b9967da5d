"""`effnet-timm run SCRIPT [ARGS...]` (effnet_timm.commands.scripts.run_script): a script runs as
`python SCRIPT ARGS` would, with effnet_v1_* registered in timm, also on every rank of
`torchrun --no-python effnet-timm run ...`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from effnet_timm.commands.scripts import run_script
from effnet_timm_cli import main

BIN = Path(sys.executable).parent
EFFNET_TIMM = BIN / ('effnet-timm.exe' if os.name == 'nt' else 'effnet-timm')  # the console script

# Does not import effnet_timm: only `effnet-timm run` makes the model name known to timm.
REPORT_SCRIPT = """
import json, sys
import timm
import helper  # beside this script: its folder must come first on sys.path
model = timm.create_model(sys.argv[1], num_classes=3)
print(json.dumps(dict(name=__name__, file=__file__, argv=sys.argv, path0=sys.path[0], helper=helper.VALUE,
                      model=type(model).__name__, num_classes=model.num_classes)))
"""

EXIT_SCRIPT = """
import sys
if sys.argv[1] == 'code':
    sys.exit(int(sys.argv[2]))
if sys.argv[1] == 'message':
    sys.exit('stopped: ' + sys.argv[2])
if sys.argv[1] == 'raise':
    raise ValueError('bad value in the script')
print('ran to the end')
"""


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(EFFNET_TIMM), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS='1'),
    )


@pytest.fixture
def report_script(tmp_path) -> Path:
    folder = tmp_path / 'scripts'
    write(folder, 'helper.py', 'VALUE = 42\n')
    return write(folder, 'report.py', REPORT_SCRIPT)


def test_console_script_is_installed():
    assert EFFNET_TIMM.is_file(), f'{EFFNET_TIMM} is missing: install the package (pip install -e .)'


def test_script_creates_effnet_v1_b0_in_a_fresh_process(report_script, tmp_path):
    proc = run_cli('run', str(report_script), 'effnet_v1_b0', '--model', 'x', '-h', '--', 'last', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == dict(
        name='__main__',
        file=str(report_script),
        argv=[str(report_script), 'effnet_v1_b0', '--model', 'x', '-h', '--', 'last'],  # options reach the script
        path0=str(report_script.resolve().parent),
        helper=42,
        model='EffNetV1',
        num_classes=3,
    )  # as python does


def test_the_same_script_without_effnet_timm_run_does_not_know_the_model(report_script, tmp_path):
    # What makes the test above meaningful: nothing but `effnet-timm run` registers effnet_v1_b0.
    proc = subprocess.run(
        [sys.executable, str(report_script), 'effnet_v1_b0'], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0 and 'Unknown model (effnet_v1_b0)' in proc.stderr


def test_exit_code_propagates_through_the_process(tmp_path):
    script = write(tmp_path, 'exits.py', EXIT_SCRIPT)
    proc = run_cli('run', str(script), 'code', '3', cwd=tmp_path)
    assert proc.returncode == 3 and proc.stderr == ''


@pytest.mark.parametrize('argv,code', [(['code', '0'], 0), (['code', '5'], 5), (['message', 'x'], 'stopped: x')])
def test_system_exit_propagates_unchanged(tmp_path, argv, code):
    script = write(tmp_path, 'exits.py', EXIT_SCRIPT)
    with pytest.raises(SystemExit) as exc:
        main(['run', str(script), *argv])
    assert exc.value.code == code


def test_normal_end_returns_0_and_restores_argv_and_path(tmp_path, capsys):
    script = write(tmp_path, 'exits.py', EXIT_SCRIPT)
    argv, path, main_module = sys.argv[:], sys.path[:], sys.modules['__main__']
    assert run_script(script, ['end']) == 0
    assert capsys.readouterr().out == 'ran to the end\n'
    assert sys.argv == argv and sys.path == path and sys.modules['__main__'] is main_module


def test_script_exception_propagates_with_its_traceback(tmp_path):
    script = write(tmp_path, 'exits.py', EXIT_SCRIPT)
    argv = sys.argv[:]
    with pytest.raises(ValueError, match='bad value in the script'):
        run_script(script, ['raise'])
    assert sys.argv == argv


@pytest.mark.parametrize('argv', [['--', 'a'], ['-h'], ['x', '--', '--', 'y']])
@pytest.mark.parametrize('lead', [[], ['--']])
def test_arguments_after_the_script_are_all_the_scripts(tmp_path, capsys, argv, lead):
    script = write(tmp_path, 'argv.py', 'import json, sys\nprint(json.dumps(sys.argv))\n')
    assert main(['run', *lead, str(script), *argv]) == 0
    assert json.loads(capsys.readouterr().out) == [str(script), *argv]  # as `python argv.py ARGS`


def test_no_script_given_is_a_usage_error(capsys):
    assert main(['run']) == 2
    assert capsys.readouterr().err == 'effnet-timm run: error: the following arguments are required: SCRIPT\n'


@pytest.mark.parametrize('what', ['missing', 'folder'])
def test_no_script_is_one_line_and_exit_2(tmp_path, capsys, what):
    target = tmp_path / 'train.py'
    if what == 'folder':
        target.mkdir()
    assert main(['run', str(target), '--model', 'effnet_v1_b0']) == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'effnet-timm: error: {target}: ')


# ----------------------------------------------------------------------------- torchrun, 2 ranks


TRAIN_STEP = '''
"""One DDP training step (gloo) on this rank's micro-batch; saves the parameters after an SGD step."""
import sys
from pathlib import Path
import torch, torch.distributed as dist, torch.nn.functional as F, timm

out, lr = Path(sys.argv[1]), float(sys.argv[sys.argv.index('--lr') + 1])
dist.init_process_group('gloo')
rank = dist.get_rank()
torch.manual_seed(0)
model = timm.create_model('effnet_v1', width_coefficient=0.25, depth_coefficient=0.25, num_classes=5,
                          drop_rate=0.0, drop_path_rate=0.0).train()
ddp = torch.nn.parallel.DistributedDataParallel(model)
g = torch.Generator().manual_seed(rank)
x, y = torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 5, (4,), generator=g)
opt = torch.optim.SGD(ddp.parameters(), lr=lr)
F.cross_entropy(ddp(x), y).backward()
opt.step()
tmp = out / f'.rank{rank}.tmp'
torch.save(dict(argv=sys.argv, world=dist.get_world_size(), grads={n: p.grad for n, p in model.named_parameters()},
                params=dict(model.named_parameters())), tmp)
tmp.rename(out / f'rank{rank}.pt')
dist.destroy_process_group()
'''


def reference_step(lr: float):
    """The same step in one process, without distributed code: grads of each micro-batch, averaged, one SGD step."""
    import timm

    import effnet_timm  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model(
        'effnet_v1', width_coefficient=0.25, depth_coefficient=0.25, num_classes=5, drop_rate=0.0, drop_path_rate=0.0
    )
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.zeros_like(p) for n, p in init.items()}
    for rank in range(2):
        model.load_state_dict(init, strict=False)
        model.train().zero_grad()
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 5, (4,), generator=g)
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            grads[n] += p.grad / 2
    return init, grads, {n: init[n] - lr * grads[n] for n in init}


def test_torchrun_two_ranks_ddp_training_step(tmp_path):
    from torchrun_util import failure_report, free_port, loopback_env

    write(tmp_path, 'train_step.py', TRAIN_STEP)
    out = tmp_path / 'out'
    out.mkdir()
    cmd = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--nnodes',
        '1',
        '--nproc-per-node',
        '2',
        '--master-addr',
        '127.0.0.1',
        '--master-port',
        str(free_port()),
        '--no-python',
        str(EFFNET_TIMM),
        'run',
        'train_step.py',
        str(out),
        '--lr',
        '0.5',
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=loopback_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, failure_report(proc)
    ranks = [torch.load(out / f'rank{r}.pt') for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        init, grads, expected = reference_step(0.5)
    finally:
        torch.set_num_threads(threads)
    for rank, seen in enumerate(ranks):
        assert seen['argv'] == ['train_step.py', str(out), '--lr', '0.5'] and seen['world'] == 2
        assert seen['params'].keys() == expected.keys()
        for name, grad in grads.items():
            err = (seen['grads'][name] - grad).abs().max().item()
            assert err <= 1e-6 * grad.abs().max().item(), f'rank {rank} {name}: max |Δgrad| {err:.3g}'
            assert torch.allclose(seen['params'][name].detach(), expected[name], rtol=1e-6, atol=1e-7), name
    # The step happened: the classifier moved far more than the tolerance.
    assert (expected['classifier.weight'] - init['classifier.weight']).abs().max() > 1e-3
