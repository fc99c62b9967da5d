"""effnet-convert push / publish-family through the real huggingface_hub client, against a Hub on loopback.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported, and this test process
imported it long ago, so every client-side step runs in another process, started with its own environment.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, shared_path
from hub_server import HubServer
from huggingface_hub.hf_api import RepoFile
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from effnet_convert.cli import DEMO_CHECKPOINT, main
from effnet_convert.hub import HUB_FILES, _digests, _remote_holds, read_folder
from effnet_timm.weights.tags import HUB_ORG

pytestmark = pytest.mark.skipif(not hasattr(os, 'fork'), reason='the Hub client steps run in forked processes')

TOKEN = 'hf_loopback_test_token'
TINY_INPUTS = FIXTURES / 'efficientnet-tiny' / 'inputs.npy'
REL_TOL = 1e-5  # of max |logit|, as in test_convert
STEP_TIMEOUT_S = 300
# Logits of each model name on an NHWC batch, as a user's session computes them. Compared within one process:
# across processes, thread and kernel choices may change the last bits.
LOAD = """
import numpy as np, torch, timm, effnet_timm

def load(inputs, out, names, cache_dir=None, prelude=''):
    exec(prelude, {})  # e.g. a Hub pin added to TAGS, as a maintainer would after a publish
    x = torch.from_numpy(np.load(inputs)).permute(0, 3, 1, 2)
    for i, name in enumerate(names):
        model = timm.create_model(name, pretrained=True, cache_dir=cache_dir).eval()
        with torch.inference_mode():
            np.save(f'{out}/{i}.npy', model(x).numpy())
    return 0
"""
# Importing torch and timm takes seconds; the client imports them once and runs each step in a fork of
# itself: a fresh process per step (own env, stdout/stderr at the file-descriptor level, exit code) that
# shares no state with the other steps.
CLIENT = (
    LOAD
    + """
import json, os, sys, traceback
from effnet_convert.cli import main

for line in sys.stdin:
    step = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.pop('HF_TOKEN', None)
        os.environ.update(step['env'])
        for fd, path in ((1, step['stdout']), (2, step['stderr'])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        try:
            code = main(step['argv']) if 'argv' in step else load(**step['load'])
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
)


@pytest.fixture(scope='module')
def hub():
    with HubServer(TOKEN) as server:
        yield server


def _env(hub: HubServer, home: Path, **extra: str) -> dict:
    # Nothing from the developer's own Hugging Face setup (token, cache, endpoint) reaches the client.
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING_FACE'))}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(home),
        HF_HUB_CACHE=str(home / 'cache'),
        HF_HUB_DISABLE_XET='1',
        HF_HUB_DISABLE_TELEMETRY='1',
        TF_CPP_MIN_LOG_LEVEL='3',
    )
    return {**env, **extra}


class Client:
    """The huggingface_hub client side: `cli(...)` runs `effnet-convert ...`, `load(...)` computes logits."""

    def __init__(self, hub: HubServer, home: Path):
        self.home, self.steps = home, 0
        self.proc = subprocess.Popen(
            [sys.executable, '-c', CLIENT],
            env=_env(hub, home),
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def cli(self, *argv: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
        return self._step(dict(argv=list(argv)), token)

    def load(self, cache: Path, inputs: Path, *names: str, prelude: str = '') -> list[np.ndarray]:
        """Logits of each name, with the Hub cache in `cache`."""
        out = self.home / f'logits-{self.steps}'
        out.mkdir()
        load = dict(inputs=str(inputs), out=str(out), names=names, cache_dir=str(cache), prelude=prelude)
        proc = self._step(dict(load=load), TOKEN)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [np.load(out / f'{i}.npy') for i in range(len(names))]

    def _step(self, step: dict, token: str | None) -> subprocess.CompletedProcess:
        self.steps += 1
        out, err = (self.home / f'step-{self.steps}.{name}' for name in ('out', 'err'))
        step.update(env={'HF_TOKEN': token} if token else {}, stdout=str(out), stderr=str(err))
        self.proc.stdin.write(json.dumps(step) + '\n')
        self.proc.stdin.flush()
        assert select.select([self.proc.stdout], [], [], STEP_TIMEOUT_S)[0], f'step timed out: {step}'
        code = self.proc.stdout.readline()
        assert code, 'the client process died (its traceback is in the captured stderr)'
        return subprocess.CompletedProcess(step.get('argv'), int(code), out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope='module')
def client(hub, tmp_path_factory):
    client = Client(hub, tmp_path_factory.mktemp('client'))
    yield client
    client.close()


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --- push ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tiny(converted_tiny) -> Path:
    return converted_tiny


@pytest.fixture(scope='module')
def pushed(client, tiny):
    """The tiny folder pushed to tester/tiny (main) and, privately, to branch v1 of tester/private."""
    return (
        client.cli('push', str(tiny), '--repo-id', 'tester/tiny'),
        client.cli('push', str(tiny), '--repo-id', 'tester/private', '--private', '--revision', 'v1'),
    )


def test_push_commits_the_three_files_once_with_provenance(hub, tiny, pushed):
    for proc in pushed:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert TOKEN not in proc.stdout + proc.stderr
    initial, commit = hub.commits('tester/tiny')
    assert set(commit.files) - set(initial.files) == set(HUB_FILES)
    assert all(commit.files[name] == (tiny / name).read_bytes() for name in HUB_FILES)
    index = next(s for s in read_folder(tiny).sources if s['name'] == 'model.ckpt.index')
    assert 'model.ckpt.index' in commit.title and index['sha256'] in commit.title
    assert commit.oid in pushed[0].stdout and "hf-hub:tester/tiny'" in pushed[0].stdout
    # --private and --revision: a private repo whose main is untouched, the files on the new branch.
    assert hub.repos['tester/private'].private
    assert set(hub.files('tester/private', 'main')) == {'.gitattributes'}
    assert hub.files('tester/private', 'v1') == hub.files('tester/tiny')


@pytest.fixture(scope='module')
def loaded(client, tiny, pushed, tmp_path_factory):
    """Logits of tester/tiny and tester/private@v1 downloaded into a fresh cache, and of the local folder."""
    cache = tmp_path_factory.mktemp('cache')
    return cache, client.load(cache, TINY_INPUTS, 'hf-hub:tester/tiny', 'hf-hub:tester/private@v1', f'local-dir:{tiny}')


def test_hub_model_loads_the_same_as_the_local_folder(loaded):
    *from_hub, local = loaded[1]
    for logits in from_hub:
        np.testing.assert_array_equal(logits, local)


def test_offline_mode_loads_from_the_filled_cache_without_the_server(hub, tiny, loaded, tmp_path):
    # A new interpreter, as HF_HUB_OFFLINE only counts when huggingface_hub is imported.
    cache, _ = loaded
    seen = len(hub.requests)
    script = LOAD + 'import sys; load(sys.argv[1], sys.argv[2], sys.argv[3:])'
    env = _env(hub, tmp_path, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache))
    proc = subprocess.run(
        [sys.executable, '-c', script, str(TINY_INPUTS), str(tmp_path), 'hf-hub:tester/tiny', f'local-dir:{tiny}'],
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hub.requests[seen:] == []
    np.testing.assert_array_equal(np.load(tmp_path / '0.npy'), np.load(tmp_path / '1.npy'))


def test_second_push_of_the_same_files_makes_no_commit(hub, client, tiny, pushed):
    before = hub.commits('tester/tiny')
    proc = client.cli('push', str(tiny), '--repo-id', 'tester/tiny')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith('up to date') and before[-1].oid in proc.stdout
    assert hub.commits('tester/tiny') == before


@pytest.mark.parametrize('failure', ['401', '500'])
def test_hub_failure_is_one_line_and_leaves_no_commit(hub, client, tiny, failure):
    repo = f'tester/failure-{failure}'
    if failure == '500':
        hub.fail['commit'] = 500
    try:
        proc = client.cli('push', str(tiny), '--repo-id', repo, token=TOKEN if failure == '500' else 'hf_wrong_token')
    finally:
        hub.fail.clear()
    assert proc.returncode == 1 and proc.stdout == ''
    line = _one_line(proc)
    assert f'HTTP {failure}' in line and repo in line and 'nothing was pushed' in line, line
    assert TOKEN not in line and 'hf_wrong_token' not in line
    # One commit or none: a failed push leaves at most the empty repo it created, never some of the files.
    assert [c.title for c in hub.commits(repo)] == ([] if failure == '401' else ['initial commit'])


def test_push_without_a_token_says_how_to_log_in(hub, client, tiny):
    seen = len(hub.requests)
    proc = client.cli('push', str(tiny), '--repo-id', 'tester/anonymous', token=None)
    assert proc.returncode == 1 and 'HF_TOKEN' in _one_line(proc)
    assert hub.requests[seen:] == []


# --- what may not be pushed (refused before any request: no server needed) -----------------------------------


def _copy(tiny: Path, tmp_path: Path) -> Path:
    folder = tmp_path / 'copy'
    shutil.copytree(tiny, folder)
    return folder


def _rewrite_weights(folder: Path, drop_key: str | None = None, drop_meta: str | None = None) -> None:
    with safe_open(str(folder / 'model.safetensors'), 'pt') as f:
        metadata = f.metadata()
    state = load_file(str(folder / 'model.safetensors'))
    state.pop(drop_key, None)
    metadata.pop(drop_meta, None)
    save_file(state, str(folder / 'model.safetensors'), metadata=metadata)


def _refused(capsys, folder: Path, *fragments: str, repo_id: str | None = 'tester/refused') -> None:
    assert main(['push', str(folder)] + (['--repo-id', repo_id] if repo_id else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_folder_without_provenance_is_refused(tiny, tmp_path, capsys):
    folder = _copy(tiny, tmp_path)
    _rewrite_weights(folder, drop_meta='source_files')
    _refused(capsys, folder, 'model.safetensors', 'provenance', 'source_files')


def test_folder_that_does_not_load_strictly_is_refused(tiny, tmp_path, capsys):
    folder = _copy(tiny, tmp_path)
    _rewrite_weights(folder, drop_key='blocks.0.0.conv_dw.weight')
    _refused(capsys, folder, 'does not load strictly', 'effnet_v1', 'blocks.0.0.conv_dw.weight')


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps(dict(config, **changes)))


def test_folder_whose_config_declares_another_architecture_is_refused(tiny, tmp_path, capsys):
    folder = _copy(tiny, tmp_path)
    _edit_config(folder, architecture='effnet_v1_b0')
    _refused(capsys, folder, 'config.json', "'effnet_v1_b0'", "'effnet_v1'")


def test_folder_that_failed_verification_is_refused(tiny, tmp_path, capsys):
    folder = _copy(tiny, tmp_path)
    _edit_config(folder, effnet_timm=dict(verification=dict(passed=False)))
    _refused(capsys, folder, 'config.json', 'verification')


def test_untagged_folder_needs_a_repo_id(tiny, capsys):
    _refused(capsys, tiny, 'without --tag', '--repo-id', repo_id=None)


def test_lfs_files_compare_by_sha256_and_regular_files_by_git_blob_id(tiny):
    sha256, blob_id = _digests(tiny / 'model.safetensors')

    class LfsHub:  # answers get_paths_info with the Hub's JSON, LFS for the weights (as huggingface.co stores them)
        def __init__(self, weights_sha256: str):
            self.weights_sha256 = weights_sha256

        def get_paths_info(self, repo_id, paths, revision):
            lfs = dict(oid=self.weights_sha256, size=1, pointerSize=134)
            return [
                RepoFile(
                    path=p,
                    size=1,
                    oid=_digests(tiny / p)[1] if p != 'model.safetensors' else 'pointer-oid',
                    **(dict(lfs=lfs) if p == 'model.safetensors' else {}),
                )
                for p in paths
            ]

    assert _remote_holds(LfsHub(sha256), 'o/n', 'main', tiny)
    assert not _remote_holds(LfsHub(blob_id), 'o/n', 'main', tiny)


# --- a whole family ----------------------------------------------------------------------------------------------


def _tarball(path: Path, checkpoint: Path, inner: str) -> None:
    with tarfile.open(path, 'w:gz', compresslevel=1) as tar:
        for name in ('checkpoint', 'model.ckpt.index', 'model.ckpt.data-00000-of-00001'):
            tar.add(checkpoint / name, arcname=f'{inner}/{name}')


@pytest.fixture(scope='module')
def family(hub, client, tmp_path_factory):
    """Three runs of publish-family --tag aa_in1k over a folder holding the official-format B0 as
    efficientnet-b0.tar.gz, the tiny checkpoint mislabeled efficientnet-b1.tar.gz, and the tiny under its own
    name. The tiny is the generic `effnet_v1` architecture, which no official family has: it shows how such
    tarballs are reported, while the B0 is what gets published. Run 1 meets a Hub error at the commit, run 2
    resumes, run 3 (mislabeled tarball removed) finds everything up to date."""
    b0 = shared_path('efficientnet-b0')
    root = tmp_path_factory.mktemp('family')
    tarballs, out = root / 'tarballs', root / 'converted'
    tarballs.mkdir()
    _tarball(tarballs / 'efficientnet-b0.tar.gz', b0, 'efficientnet-b0')
    _tarball(tarballs / 'efficientnet-b1.tar.gz', DEMO_CHECKPOINT, 'efficientnet-b1')
    _tarball(tarballs / 'efficientnet-tiny.tar.gz', DEMO_CHECKPOINT, 'efficientnet-tiny')
    argv = ('publish-family', str(tarballs), '--tag', 'aa_in1k', '--out', str(out), '--quiet')
    weights = out / 'effnet_v1_b0.aa_in1k' / 'model.safetensors'
    runs, mtimes, commits = [], [], []
    for run in range(3):
        if run == 0:
            hub.fail['commit'] = 500
        if run == 2:
            (tarballs / 'efficientnet-b1.tar.gz').unlink()
        try:
            runs.append(client.cli(*argv))
        finally:
            hub.fail.clear()
        mtimes.append(weights.stat().st_mtime_ns if weights.exists() else None)
        commits.append(len(hub.commits(f'{HUB_ORG}/effnet_v1_b0.aa_in1k')))
    return b0, out / 'effnet_v1_b0.aa_in1k', runs, mtimes, commits


def _rows(proc: subprocess.CompletedProcess) -> dict:
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ['tarball', 'repo', 'status', 'detail'], proc.stdout
    return {line.split()[0]: line for line in lines[1:]}


@pytest.mark.oracle
def test_publish_family_resumes_where_it_stopped(family):
    _, folder, runs, mtimes, commits = family
    repo = f'{HUB_ORG}/effnet_v1_b0.aa_in1k'
    first, second, third = (_rows(proc) for proc in runs)
    assert [proc.returncode for proc in runs] == [1, 1, 0], [proc.stderr[-2000:] for proc in runs]
    # Run 1: B0 converted, its commit refused (HTTP 500), so the run stopped before the next tarball.
    assert repo in first['efficientnet-b0.tar.gz'] and 'failed' in first['efficientnet-b0.tar.gz']
    assert 'HTTP 500' in first['efficientnet-b0.tar.gz']
    assert 'not attempted' in first['efficientnet-b1.tar.gz']
    assert 'ignored' in first['efficientnet-tiny.tar.gz']
    # Run 2: the kept conversion is pushed as it is; the mislabeled tarball fails its own row only.
    assert ' pushed ' in second['efficientnet-b0.tar.gz'] and mtimes[1] == mtimes[0]
    assert 'failed' in second['efficientnet-b1.tar.gz'] and 'efficientnet-tiny' in second['efficientnet-b1.tar.gz']
    # Run 3: nothing to do, no new commit.
    assert 'up to date' in third['efficientnet-b0.tar.gz'] and 'efficientnet-b1.tar.gz' not in third
    assert commits == [1, 2, 2]


@pytest.mark.oracle
def test_registered_tag_and_hf_hub_name_load_the_published_b0(client, hub, family, tmp_path):
    """`hf-hub:` names the repo (the user's choice); the registered tag takes it only once pinned, with the pin that
    `effnet-convert push` prints."""
    b0, folder, *_ = family
    proc = client.cli('push', str(folder))  # up to date: no new commit, but the pin line
    assert proc.returncode == 0, proc.stderr[-3000:]
    (pin,) = [line for line in proc.stdout.splitlines() if line.startswith('pin: ')]
    head = hub.commits(f'{HUB_ORG}/effnet_v1_b0.aa_in1k')[-1].oid
    sha256 = json.loads((folder / 'config.json').read_text())['effnet_timm']['files']['model.safetensors']['sha256']
    assert "TAGS['aa_in1k'].hub_pins" in pin and f"'effnet_v1_b0': HubPin('{head}', '{sha256}')" in pin, pin
    entry = pin.split(': ', 2)[2]
    prelude = (
        'import dataclasses\nfrom effnet_timm.weights.tags import TAGS, HubPin\n'
        f"TAGS['aa_in1k'] = dataclasses.replace(TAGS['aa_in1k'], hub_pins={{{entry}}})\n"
    )
    registered, by_config, local = client.load(
        tmp_path / 'cache',
        b0 / 'inputs.npy',
        'effnet_v1_b0.aa_in1k',
        f'hf-hub:{HUB_ORG}/effnet_v1_b0.aa_in1k',
        f'local-dir:{folder}',
        prelude=prelude,
    )
    np.testing.assert_array_equal(registered, by_config)
    np.testing.assert_array_equal(registered, local)
    official = np.load(b0 / 'logits_ema.npy')
    assert np.abs(registered - official).max() / np.abs(official).max() <= REL_TOL


@pytest.mark.oracle
def test_official_repo_gets_only_the_registered_preprocessing(family, tmp_path, capsys):
    # The registered tag would download these weights with its own cfg: the Hub config may not say otherwise.
    folder = tmp_path / 'b0'
    shutil.copytree(family[1], folder)
    config = json.loads((folder / 'config.json').read_text())
    _edit_config(folder, pretrained_cfg=dict(config['pretrained_cfg'], input_size=[3, 256, 256]))
    _refused(capsys, folder, 'input_size', 'effnet_v1_b0.aa_in1k', '--repo-id', repo_id=None)


def test_family_needs_official_tarballs(tmp_path, capsys):
    assert main(['publish-family', str(tmp_path), '--tag', 'aa_in1k']) == 2
    assert 'efficientnet-b0.tar.gz' in capsys.readouterr().err
