"""`pretrained=True` on first use: official tarballs fetched from a loopback bucket, verified, converted, cached.

The bucket (tests/bucket_server.py) serves official-format tarballs packed from ../shared's official B0 checkpoint
at their official paths; the Hub (tests/hub_server.py) answers for `effnet-timm/*`. huggingface_hub reads
HF_ENDPOINT when it is imported, so every user-side step runs in a fork of a client process started with the
loopback endpoints (each step: a fresh process with its own environment, as a user's session would be).
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from bucket_server import BucketServer, Fault, goog_hash, wait_for
from conftest import shared_path
from hub_server import HubServer, Repo

from effnet_timm.weights.cache import cached_entry
from effnet_timm.weights.download import DownloadError, download, parse_goog_hash

pytestmark = pytest.mark.skipif(not hasattr(os, 'fork'), reason='the user-side steps run in forked processes')

STEP_TIMEOUT_S = 300
REL_TOL = 1e-5  # of max |logit|, as in test_convert
AA = '/ckptsaug/efficientnet-b0.tar.gz'
NAME = 'effnet_v1_b0.aa_in1k'
NS = '/noisystudent/noisy_student_efficientnet-b0.tar.gz'
CKPT_FILES = ('checkpoint', 'model.ckpt.index', 'model.ckpt.data-00000-of-00001', 'model.ckpt.meta')

CLIENT = """
import json, os, sys, traceback
import numpy as np, torch, timm, effnet_timm

def load(out, specs, inputs):
    x = torch.from_numpy(np.load(inputs)).permute(0, 3, 1, 2)
    for i, (name, kwargs) in enumerate(specs):
        model = timm.create_model(name, pretrained=True, **kwargs).eval()
        with torch.inference_mode():
            y = model(x[:, :1] if kwargs.get('in_chans') == 1 else x)
        for j, t in enumerate(y if isinstance(y, (list, tuple)) else [y]):
            np.save(f'{out}/{i}.{j}.npy', t.numpy())
        if hasattr(model, 'forward_features') and kwargs.get('num_classes') is not None:
            with torch.inference_mode():
                np.save(f'{out}/{i}.features.npy', model.forward_features(x).numpy())
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        with open(f'{out}/{i}.json', 'w') as f:
            json.dump(dict(file=cfg.get('file'), crop_pct=cfg.get('crop_pct')), f)

def child(step):
    os.environ.update(step['env'])
    for fd, path in ((1, step['stdout']), (2, step['stderr'])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    try:
        exec(step.get('prelude', ''), {})  # e.g. a pin added to TAGS, as a maintainer would
        exec(step['exec'], {}) if 'exec' in step else load(**step['load'])
        code = 0
    except effnet_timm.PretrainedWeightsError as err:
        print(str(err))
        code = 3
    except BaseException:
        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

for line in sys.stdin:
    step = json.loads(line)
    pids = []
    for k in range(step.get('processes', 1)):
        pid = os.fork()
        if pid == 0:
            child(dict(step, stdout=f"{step['stdout']}.{k}", stderr=f"{step['stderr']}.{k}",
                       load=dict(step['load'], out=f"{step['load']['out']}/{k}")))
        pids.append(pid)
    if step.get('background'):
        print(json.dumps(pids), flush=True)
        continue
    print(json.dumps([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]), flush=True)
"""


class Result:
    def __init__(self, code: int, out: Path, stdout: str, stderr: str):
        self.code, self.out, self.stdout, self.stderr = code, out, stdout, stderr

    def logits(self, i: int = 0, j: int = 0) -> np.ndarray:
        return np.load(self.out / f'{i}.{j}.npy')

    def info(self, i: int = 0) -> dict:
        return json.loads((self.out / f'{i}.json').read_text())

    def line(self) -> str:
        lines = self.stdout.strip().splitlines()
        assert self.code == 3 and len(lines) == 1, (self.code, self.stdout, self.stderr[-3000:])
        return lines[0]


class Client:
    """User sessions: `load(cache, [(name, kwargs)])` runs timm.create_model(pretrained=True) in a fresh fork."""

    def __init__(self, home: Path, env: dict[str, str]):
        self.home, self.steps, self.env = home, 0, env
        self.proc = subprocess.Popen(
            [sys.executable, '-c', CLIENT], env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def load(self, cache: Path, specs, processes: int = 1, background: bool = False, prelude: str = '', **env: str):
        self.steps += 1
        out = self.home / f'step-{self.steps}'
        for k in range(processes):
            (out / str(k)).mkdir(parents=True)
        step = dict(
            env=dict(env, EFFNET_TIMM_CACHE=str(cache)),
            stdout=str(out / 'out'),
            stderr=str(out / 'err'),
            processes=processes,
            background=background,
            prelude=prelude,
            load=dict(out=str(out), inputs=str(INPUTS), specs=[[n, k] for n, k in specs]),
        )
        self.proc.stdin.write(json.dumps(step) + '\n')
        self.proc.stdin.flush()
        assert select.select([self.proc.stdout], [], [], STEP_TIMEOUT_S)[0], f'step timed out: {step}'
        answer = self.proc.stdout.readline()
        assert answer, 'the client process died'
        if background:
            return json.loads(answer), out
        results = [
            Result(code, out / str(k), (out / f'out.{k}').read_text(), (out / f'err.{k}').read_text())
            for k, code in enumerate(json.loads(answer))
        ]
        return results if processes > 1 else results[0]

    def exec(self, cache: Path, code: str) -> Result:
        """Run Python source in a fresh fork (a user's script)."""
        self.steps += 1
        out = self.home / f'step-{self.steps}'
        out.mkdir()
        step = dict(
            env=dict(EFFNET_TIMM_CACHE=str(cache)),
            stdout=str(out / 'out'),
            stderr=str(out / 'err'),
            exec=code,
            load=dict(out=str(out)),
        )
        self.proc.stdin.write(json.dumps(step) + '\n')
        self.proc.stdin.flush()
        assert select.select([self.proc.stdout], [], [], STEP_TIMEOUT_S)[0], 'step timed out'
        (code,) = json.loads(self.proc.stdout.readline())
        return Result(code, out, (out / 'out.0').read_text(), (out / 'err.0').read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


INPUTS = None  # set by the `official` fixture: the official B0 batch


def _tarball(folder: Path, inner: str) -> bytes:
    """An official-format tarball: one folder holding the checkpoint files (gzip level 1: built in ~1 s)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz', compresslevel=1) as tar:
        for name in CKPT_FILES:
            tar.add(folder / name, arcname=f'{inner}/{name}')
    return buffer.getvalue()


@pytest.fixture(scope='module')
def official():
    global INPUTS
    folder = shared_path('efficientnet-b0')
    INPUTS = folder / 'inputs.npy'
    return folder, _tarball(folder, 'efficientnet-b0')


@pytest.fixture(scope='module')
def bucket(official):
    with BucketServer() as server:
        data = official[1]
        server.files.update(
            {
                AA: data,
                '/ckpts/efficientnet-b0.tar.gz': data,
                '/advprop/efficientnet-b0.tar.gz': data,
                '/ckptsaug/efficientnet-b1.tar.gz': data,  # another variant than the path says
                # NoisyStudent tarballs name their folder differently (tensorflow/tpu#922).
                NS: _tarball(official[0], 'noisy_student_efficientnet-b0'),
            }
        )
        yield server


@pytest.fixture(scope='module')
def hub():
    with HubServer('hf_unused_token') as server:
        yield server


@pytest.fixture(scope='module')
def client(bucket, hub, tmp_path_factory):
    home = tmp_path_factory.mktemp('client')
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING_FACE', 'EFFNET_TIMM_'))}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(home / 'hf'),
        HF_HUB_DISABLE_XET='1',
        HF_HUB_DISABLE_TELEMETRY='1',
        EFFNET_TIMM_CKPT_ROOT=bucket.root,
        OMP_NUM_THREADS='1',
    )
    client = Client(home, env)
    yield client
    client.close()


def _assert_official_logits(logits: np.ndarray, official_folder: Path) -> None:
    expected = np.load(official_folder / 'logits_ema.npy')
    assert np.abs(logits - expected).max() <= REL_TOL * np.abs(expected).max()
    assert (np.argsort(-logits, 1)[:, :5] == np.argsort(-expected, 1)[:, :5]).all()


def _entry(cache: Path, variant: str = 'effnet_v1_b0', tag: str = 'aa_in1k'):
    """The trusted entry of `cache` (the library's own check), or None."""
    os.environ['EFFNET_TIMM_CACHE'] = str(cache)
    return cached_entry(variant, tag)


def _untrusted(cache: Path, variant: str = 'effnet_v1_b0', tag: str = 'aa_in1k') -> bool:
    return _entry(cache, variant, tag) is None


@pytest.fixture(autouse=True)
def _restore_cache_env():
    before = os.environ.get('EFFNET_TIMM_CACHE')
    yield
    if before is None:
        os.environ.pop('EFFNET_TIMM_CACHE', None)
    else:
        os.environ['EFFNET_TIMM_CACHE'] = before


# --- first use, second use, offline ------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def first_use(client, bucket, hub, tmp_path_factory):
    """A fresh cache filled by one create_model call, and the requests it took."""
    cache = tmp_path_factory.mktemp('first-use')
    hub_seen, bucket_seen = len(hub.requests), len(bucket.requests)
    result = client.load(cache, [(NAME, {})])
    return cache, result, hub.requests[hub_seen:], bucket.requests[bucket_seen:]


@pytest.mark.oracle
def test_first_use_downloads_converts_and_reproduces_the_official_logits(first_use, official):
    cache, result, hub_requests, bucket_requests = first_use
    assert result.code == 0, result.stderr[-3000:]
    _assert_official_logits(result.logits(), official[0])
    # No unpinned Hub repo is asked (whoever registers the name would control the weights); the bucket served
    # the tarball once.
    assert hub_requests == []
    assert bucket_requests == [f'GET {AA}']
    assert result.info()['file'] == str(cache / NAME / 'model.safetensors')
    # The cache keeps the converted entry, not the tarball; its provenance names the tarball and its sha256.
    entry = _entry(cache)
    assert entry is not None and entry.folder == cache / NAME
    import hashlib

    sha256 = hashlib.sha256(official[1]).hexdigest()
    config = json.loads((entry.folder / 'config.json').read_text())
    assert config['effnet_timm']['source_files'][0] == dict(name='efficientnet-b0.tar.gz', sha256=sha256)
    assert config['effnet_timm']['cache']['tarball_sha256'] == sha256
    assert config['effnet_timm']['cache']['x_goog_hash'] == parse_goog_hash([goog_hash(official[1])])
    from safetensors import safe_open

    with safe_open(str(entry.weights), 'pt') as f:
        assert sha256 in f.metadata()['source_files']
    assert not list(cache.rglob('*.tar.gz*'))


@pytest.mark.oracle
def test_second_use_in_a_new_process_sends_no_request(client, bucket, hub, first_use):
    cache, first, _, _ = first_use
    hub_seen, bucket_seen = len(hub.requests), len(bucket.requests)
    result = client.load(
        cache, [(NAME, {}), ('effnet_v1_b0.aa_in1k', dict(pretrained_cfg_overlay=dict(crop_pct=0.9), device='cpu'))]
    )
    assert result.code == 0, result.stderr[-3000:]
    assert hub.requests[hub_seen:] == [] and bucket.requests[bucket_seen:] == []
    np.testing.assert_array_equal(result.logits(0), first.logits())
    np.testing.assert_array_equal(result.logits(1), first.logits())
    assert result.info(1) == dict(file=str(cache / NAME / 'model.safetensors'), crop_pct=0.9)


@pytest.mark.oracle
def test_features_only_num_classes_and_in_chans_load_from_the_cache(client, bucket, first_use):
    cache, first, _, _ = first_use
    bucket_seen = len(bucket.requests)
    result = client.load(
        cache,
        [(NAME, dict(features_only=True, out_indices=(2, 4))), (NAME, dict(num_classes=10)), (NAME, dict(in_chans=1))],
    )
    assert result.code == 0, result.stderr[-3000:]
    assert bucket.requests[bucket_seen:] == []
    # Against the same weights loaded from the entry by file (no resolver involved).
    import timm

    model = timm.create_model(
        NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(cache / NAME / 'model.safetensors'))
    ).eval()
    x = torch.from_numpy(np.load(INPUTS)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        _, features = model.forward_intermediates(x, indices=(2, 4))
        np.testing.assert_allclose(result.logits(0, 0), features[0].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(result.logits(0, 1), features[1].numpy(), rtol=1e-4, atol=1e-4)
    assert result.logits(1).shape == (x.shape[0], 10)  # classifier dropped, the body loaded:
    with torch.inference_mode():
        body = model.forward_features(x).numpy()
    np.testing.assert_allclose(np.load(result.out / '1.features.npy'), body, rtol=1e-4, atol=1e-4 * np.abs(body).max())
    gray = x[:, :1]
    with torch.inference_mode():  # timm's in_chans=1 stem adaptation sums the RGB filters
        expected = model(gray.expand(-1, 3, -1, -1)).numpy()
    np.testing.assert_allclose(result.logits(2), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.oracle
def test_offline_uses_only_the_cache_and_names_the_command_that_fills_it(hub, bucket, first_use, tmp_path, client):
    # A new interpreter: HF_HUB_OFFLINE must be set before huggingface_hub is imported, as a user sets it.
    cache, first, _, _ = first_use
    hub_seen, bucket_seen = len(hub.requests), len(bucket.requests)
    script = f"""
import numpy as np, torch, timm, effnet_timm
x = torch.from_numpy(np.load({str(INPUTS)!r})).permute(0, 3, 1, 2)
with torch.inference_mode():
    np.save({str(tmp_path / 'y.npy')!r}, timm.create_model({NAME!r}, pretrained=True).eval()(x).numpy())
try:
    timm.create_model('effnet_v1_b0.in1k', pretrained=True)
except effnet_timm.PretrainedWeightsError as err:
    print(err)
"""
    env = dict(client.env, HF_HUB_OFFLINE='1', EFFNET_TIMM_CACHE=str(cache), HF_HOME=str(tmp_path / 'hf'))
    proc = subprocess.run(
        [sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hub.requests[hub_seen:] == [] and bucket.requests[bucket_seen:] == []
    np.testing.assert_array_equal(np.load(tmp_path / 'y.npy'), first.logits())
    (line,) = proc.stdout.strip().splitlines()
    assert 'HF_HUB_OFFLINE=1' in line and 'effnet-timm download effnet_v1_b0.in1k' in line, line


# --- many processes, killed downloads --------------------------------------------------------------------------


@pytest.mark.oracle
def test_three_processes_on_an_empty_cache_download_once(client, bucket, tmp_path, official):
    seen = len(bucket.gets(AA))
    results = client.load(tmp_path / 'cache', [(NAME, {})], processes=3)
    for result in results:
        assert result.code == 0, result.stderr[-3000:]
    assert len(bucket.gets(AA)) == seen + 1
    for result in results[1:]:
        np.testing.assert_array_equal(result.logits(), results[0].logits())
    _assert_official_logits(results[0].logits(), official[0])


@pytest.mark.oracle
def test_download_killed_mid_way_is_resumed_and_its_lock_does_not_block(client, bucket, tmp_path, official):
    cache = tmp_path / 'cache'
    part = cache / '.tmp' / NAME / 'download' / 'efficientnet-b0.tar.gz.part'
    half = len(official[1]) // 2
    bucket.release.clear()
    bucket.faults[AA] = Fault('stall', after=half, times=1)
    seen = len(bucket.gets(AA))
    pids, _ = client.load(cache, [(NAME, {})], background=True)
    try:
        assert wait_for(lambda: part.exists() and part.stat().st_size >= half), 'the download never started'
    finally:
        os.kill(pids[0], signal.SIGKILL)  # mid-download, holding the entry's lock
        bucket.release.set()
    assert _untrusted(cache)
    result = client.load(cache, [(NAME, {})])
    assert result.code == 0, result.stderr[-3000:]
    assert bucket.gets(AA)[seen:] == [f'GET {AA}', f'GET {AA} bytes={half}-']  # resumed, not restarted
    _assert_official_logits(result.logits(), official[0])
    assert not part.exists() and not _untrusted(cache)


@pytest.mark.oracle
def test_killed_conversion_leaves_nothing_trusted(first_use, tmp_path):
    """What a process killed after the download leaves (a staged folder, an entry without its cache record,
    a damaged file) is never loaded."""
    cache, _, _, _ = first_use
    good = cache / NAME
    staged = tmp_path / 'cache' / '.tmp' / NAME / 'entry'
    shutil.copytree(good, staged)
    assert _untrusted(tmp_path / 'cache')  # staging is not the entry
    for damage in ('no cache record', 'flipped byte', 'other variant'):
        entry = tmp_path / damage / NAME
        shutil.copytree(good, entry)
        config = json.loads((entry / 'config.json').read_text())
        if damage == 'no cache record':
            del config['effnet_timm']['cache']
        elif damage == 'other variant':
            config['architecture'] = 'effnet_v1_b1'
        else:
            data = bytearray((entry / 'model.safetensors').read_bytes())
            data[-5] ^= 1
            (entry / 'model.safetensors').write_bytes(bytes(data))
        (entry / 'config.json').write_text(json.dumps(config))
        assert _untrusted(tmp_path / damage), damage
    assert not _untrusted(cache)


# --- faults: one line each, nothing trusted cached, the next call succeeds ---------------------------------------


FAULTS = {
    '404': (None, 'HTTP 404'),
    '500': (Fault('status', status=500), 'HTTP 500'),
    'truncated': (Fault('truncate', after=1 << 20), 'connection closed after'),
    'bad-hash': (Fault('bad_hash'), 'X-Goog-Hash'),
}


@pytest.mark.oracle
@pytest.mark.parametrize('fault', FAULTS)
def test_bucket_fault_is_one_line_then_a_healthy_bucket_succeeds(client, bucket, tmp_path, official, fault):
    injected, fragment = FAULTS[fault]
    cache = tmp_path / 'cache'
    data = bucket.files.pop(AA) if fault == '404' else None
    if injected:
        bucket.faults[AA] = injected
    try:
        failed = client.load(cache, [(NAME, {})], EFFNET_TIMM_DOWNLOAD_ATTEMPTS='2')
    finally:
        bucket.faults.pop(AA, None)
        if data is not None:
            bucket.files[AA] = data
    line = failed.line()
    assert fragment in line and f'{bucket.root}{AA}' in line and NAME in line, line
    assert 'Hub' not in line and 'EFFNET_TIMM_CKPT_ROOT' in line and f'effnet-timm download {NAME}' in line, line
    assert 'pretrained_cfg_overlay=dict(file=...)' in line
    assert _untrusted(cache)
    assert not list(cache.glob('effnet_v1_b0*'))
    healthy = client.load(cache, [(NAME, {})])
    assert healthy.code == 0, healthy.stderr[-3000:]
    _assert_official_logits(healthy.logits(), official[0])


@pytest.mark.oracle
def test_transient_500_and_dropped_connection_are_retried_within_one_call(client, bucket, tmp_path, official):
    seen = len(bucket.gets(AA))
    bucket.faults[AA] = Fault('status', status=503, times=1)
    result = client.load(tmp_path / 'a', [(NAME, {})])
    assert result.code == 0, result.stderr[-3000:]
    assert len(bucket.gets(AA)) == seen + 2
    seen += 2
    bucket.faults[AA] = Fault('truncate', after=3 << 20, times=1)
    result = client.load(tmp_path / 'b', [(NAME, {})])
    assert result.code == 0, result.stderr[-3000:]
    assert bucket.gets(AA)[seen:] == [f'GET {AA}', f'GET {AA} bytes={3 << 20}-']
    _assert_official_logits(result.logits(), official[0])


@pytest.mark.oracle
def test_tarball_of_another_variant_is_refused_and_not_cached(client, bucket, tmp_path):
    cache = tmp_path / 'cache'
    line = client.load(cache, [('effnet_v1_b1.aa_in1k', {})]).line()
    assert '/ckptsaug/efficientnet-b1.tar.gz' in line and 'effnet_v1_b1' in line and 'effnet_v1_b0' in line, line
    assert '.tmp' not in line and str(cache) not in line.split('official checkpoint: ', 1)[1], line  # no temp path
    assert _untrusted(cache, 'effnet_v1_b1')
    assert not list(cache.glob('effnet_v1_b1*')) and not list(cache.rglob('*.tar.gz*'))


@pytest.mark.oracle
def test_bare_name_loads_its_default_tag_from_its_official_path(client, bucket, tmp_path, official):
    seen = len(bucket.requests)
    specs = [('effnet_v1_b0', {}), ('effnet_v1_b0', dict(pretrained_cfg='ns_jft_in1k'))]
    result = client.load(tmp_path / 'cache', specs)
    assert result.code == 0, result.stderr[-3000:]
    assert bucket.requests[seen:] == [f'GET {NS}']
    assert result.info(0)['file'] == str(tmp_path / 'cache' / 'effnet_v1_b0.ns_jft_in1k' / 'model.safetensors')
    _assert_official_logits(result.logits(0), official[0])
    np.testing.assert_array_equal(result.logits(1), result.logits(0))


class SilentHub:
    """A Hub that accepts connections and never answers (a firewall that drops, a hung proxy)."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.create_server(('127.0.0.1', 0))
        self.endpoint = f'http://127.0.0.1:{self.sock.getsockname()[1]}'
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.connections.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for conn in self.connections:
            conn.close()


@pytest.mark.oracle
def test_unpinned_hub_is_not_asked_even_when_it_hangs(client, bucket, tmp_path, official):
    """A silent Hub costs nothing: no TAGS row pins a Hub revision, so the resolver goes to the bucket."""
    hub = SilentHub()
    script = f"""
import timm, effnet_timm
timm.create_model({NAME!r}, pretrained=True)
"""
    env = dict(
        client.env,
        HF_ENDPOINT=hub.endpoint,
        HF_HUB_ETAG_TIMEOUT='1',
        EFFNET_TIMM_CACHE=str(tmp_path / 'c'),
        HF_HOME=str(tmp_path / 'hf'),
    )
    seen = len(bucket.gets(AA))
    try:
        proc = subprocess.run(
            [sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S
        )
    finally:
        hub.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(hub.connections) == 0
    assert len(bucket.gets(AA)) == seen + 1 and not _untrusted(tmp_path / 'c')


# --- the Hub first, mirrors ---------------------------------------------------------------------------------------


def _other_weights(path: Path) -> bytes:
    """A valid B0 safetensors with other weights than the official ones (the classifier negated)."""
    from safetensors.torch import load_file, save

    state = load_file(str(path))
    state['classifier.weight'] = -state['classifier.weight']
    return save(state, metadata={'format': 'pt'})


def _pin_prelude(revision: str, sha256: str) -> str:
    return (
        'import dataclasses\n'
        'from effnet_timm.weights.tags import TAGS, HubPin\n'
        "TAGS['aa_in1k'] = dataclasses.replace(TAGS['aa_in1k'], "
        f"hub_pins={{'effnet_v1_b0': HubPin({revision!r}, {sha256!r})}})\n"
    )


@pytest.mark.oracle
def test_hub_repo_is_used_only_when_pinned_and_only_with_the_pinned_bytes(
    client, bucket, hub, first_use, tmp_path, official
):
    """Someone registers `effnet-timm/effnet_v1_b0.aa_in1k` and publishes other weights there: not used by default;
    used when its TAGS row pins that commit and sha256; a pin whose sha256 the file does not have falls through."""
    import hashlib

    cache, first, _, _ = first_use
    other = _other_weights(cache / NAME / 'model.safetensors')
    repo_id = f'effnet-timm/{NAME}'
    repo = hub.repos[repo_id] = Repo(private=False)
    commit = hub._add_commit(repo, 'main', 'published', '', {'model.safetensors': other})
    try:
        seen, hub_seen = len(bucket.requests), len(hub.requests)
        default = client.load(tmp_path / 'default', [(NAME, {})])
        assert default.code == 0, default.stderr[-3000:]
        assert hub.requests[hub_seen:] == [] and bucket.requests[seen:] == [f'GET {AA}']
        _assert_official_logits(default.logits(), official[0])

        seen = len(bucket.requests)
        pinned = client.load(
            tmp_path / 'pinned', [(NAME, {})], prelude=_pin_prelude(commit.oid, hashlib.sha256(other).hexdigest())
        )
        assert pinned.code == 0, pinned.stderr[-3000:]
        assert bucket.requests[seen:] == [] and '/snapshots/' in pinned.info()['file']
        np.testing.assert_allclose(pinned.logits(), -first.logits() + 2 * _bias_logits(cache), rtol=1e-4, atol=1e-4)
        assert not (tmp_path / 'pinned' / NAME).exists()

        seen = len(bucket.requests)
        official_sha = hashlib.sha256((cache / NAME / 'model.safetensors').read_bytes()).hexdigest()
        mismatch = client.load(tmp_path / 'mismatch', [(NAME, {})], prelude=_pin_prelude(commit.oid, official_sha))
        assert mismatch.code == 0, mismatch.stderr[-3000:]
        assert bucket.requests[seen:] == [f'GET {AA}']
        _assert_official_logits(mismatch.logits(), official[0])
        (warning,) = [line for line in mismatch.stderr.splitlines() if 'the pin says' in line]
        assert repo_id in warning and official_sha in warning and 'not used' in warning, warning
    finally:
        del hub.repos[repo_id]


def _bias_logits(cache: Path) -> np.ndarray:
    from safetensors.torch import load_file

    return load_file(str(cache / NAME / 'model.safetensors'))['classifier.bias'].numpy()[None]


@pytest.mark.oracle
@pytest.mark.parametrize('style', ['file-url', 'folder'])
def test_local_mirror(client, bucket, official, tmp_path, style):
    mirror = tmp_path / 'mirror'
    (mirror / 'advprop').mkdir(parents=True)
    (mirror / 'advprop' / 'efficientnet-b0.tar.gz').write_bytes(official[1])
    root = mirror.as_uri() if style == 'file-url' else str(mirror)
    seen = len(bucket.requests)
    result = client.load(tmp_path / 'cache', [('effnet_v1_b0.ap_in1k', {})], EFFNET_TIMM_CKPT_ROOT=root)
    assert result.code == 0, result.stderr[-3000:]
    assert bucket.requests[seen:] == []
    _assert_official_logits(result.logits(), official[0])  # (the batch is ImageNet-normalized; same weights)
    config = json.loads((tmp_path / 'cache' / 'effnet_v1_b0.ap_in1k' / 'config.json').read_text())
    assert config['effnet_timm']['cache']['source'] == f'{root}/advprop/efficientnet-b0.tar.gz'
    assert (mirror / 'advprop' / 'efficientnet-b0.tar.gz').exists()  # the mirror's file is left alone


# --- download() alone (in this process: no Hub involved) --------------------------------------------------------


@pytest.mark.oracle
def test_download_checks_every_goog_hash_and_length(bucket, tmp_path):
    data = os.urandom(300_000)
    bucket.files['/x/blob.tar.gz'] = data
    got = download(f'{bucket.root}/x/blob.tar.gz', tmp_path / 'blob.tar.gz', progress=False)
    assert got.path.read_bytes() == data and got.requests == 1 and not got.resumed
    assert set(got.goog_hash) == {'crc32c', 'md5'}
    bucket.faults['/x/blob.tar.gz'] = Fault('bad_hash', times=1)
    with pytest.raises(DownloadError, match='md5|crc32c'):
        download(f'{bucket.root}/x/blob.tar.gz', tmp_path / 'again.tar.gz', progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / 'blob.tar.gz']  # nothing half-written kept


@pytest.mark.oracle
def test_resume_of_a_file_that_changed_meanwhile_restarts(bucket, tmp_path):
    """If-Range: bytes kept from an older version of the file are never glued to a newer one."""
    old, new = os.urandom(200_000), os.urandom(200_000)
    bucket.files['/x/changing.tar.gz'] = old
    bucket.faults['/x/changing.tar.gz'] = Fault('truncate', after=50_000, times=None)
    with pytest.raises(DownloadError, match='connection closed after 50000'):
        download(f'{bucket.root}/x/changing.tar.gz', tmp_path / 'c.tar.gz', progress=False, attempts=1)
    bucket.faults.clear()
    bucket.files['/x/changing.tar.gz'] = new
    got = download(f'{bucket.root}/x/changing.tar.gz', tmp_path / 'c.tar.gz', progress=False)
    assert got.path.read_bytes() == new and not got.resumed  # the truth: no kept byte was used
    assert bucket.gets('/x/changing.tar.gz')[-1] == 'GET /x/changing.tar.gz bytes=50000-'


# --- the README's first example, `effnet-timm download` ---------------------------------------------------------


@pytest.mark.oracle
def test_readme_first_example_works_as_written(client, bucket, tmp_path):
    import re

    from conftest import REPO

    first = re.search(r'```python\n(.*?)```', (REPO / 'README.md').read_text(), re.S).group(1)
    assert 'pretrained=True' in first
    seen = len(bucket.gets(AA))
    result = client.exec(tmp_path / 'cache', first + '\nassert type(model).__name__ == "EffNetV1"\n')
    assert result.code == 0, result.stdout + result.stderr[-3000:]
    assert len(bucket.gets(AA)) == seen + 1 and not _untrusted(tmp_path / 'cache')


@pytest.fixture
def cli_env(bucket, tmp_path, monkeypatch):
    """`effnet-timm download` in this process: it asks no Hub, so the loopback bucket is all it reaches."""
    monkeypatch.setenv('EFFNET_TIMM_CKPT_ROOT', bucket.root)
    monkeypatch.setenv('EFFNET_TIMM_CACHE', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


def _table(out: str) -> list[list[str]]:
    lines = out.strip().splitlines()
    assert lines[0].split() == ['model', 'tag', 'MB', 'sha256', 'source', 'seconds'] and lines[-1].startswith('cache:')
    return [line.split() for line in lines[1:-1]]


@pytest.mark.oracle
def test_download_command_fills_the_cache_then_skips_it(cli_env, bucket, official, client, capsys):
    import hashlib

    from effnet_timm_cli import main

    sha = hashlib.sha256(official[1]).hexdigest()
    seen = len(bucket.requests)
    assert main(['download', 'effnet_v1_b0.aa_in1k', 'effnet_v1_b0', '--tag', 'in1k', '--no-progress']) == 0
    captured = capsys.readouterr()
    rows = _table(captured.out)
    assert [r[:5] for r in rows] == [
        ['effnet_v1_b0', 'aa_in1k', f'{len(official[1]) / 1e6:.1f}', sha[:12], f'{bucket.root}{AA}'],
        [
            'effnet_v1_b0',
            'in1k',
            f'{len(official[1]) / 1e6:.1f}',
            sha[:12],
            f'{bucket.root}/ckpts/efficientnet-b0.tar.gz',
        ],
    ]
    assert sorted(bucket.requests[seen:]) == sorted([f'GET {AA}', 'GET /ckpts/efficientnet-b0.tar.gz'])
    assert captured.err == ''
    seen = len(bucket.requests)
    assert main(['download', 'effnet_v1_b0.in1k', 'effnet_v1_b0.aa_in1k']) == 0
    assert [r[4] for r in _table(capsys.readouterr().out)] == ['cache', 'cache']
    assert bucket.requests[seen:] == []
    # What it filled is what pretrained=True loads, with no request at all.
    hub_free = client.load(cli_env, [('effnet_v1_b0.in1k', {})], HF_HUB_OFFLINE='1')
    assert hub_free.code == 0, hub_free.stderr[-3000:]
    assert bucket.requests[seen:] == []


@pytest.mark.oracle
def test_download_command_reports_each_failure_and_fills_the_rest(cli_env, bucket, capsys):
    from effnet_timm_cli import main

    assert main(['download', 'effnet_v1_b2.aa_in1k', 'effnet_v1_b0.ap_in1k', '--no-progress']) == 2
    captured = capsys.readouterr()
    rows = _table(captured.out)
    advprop = f'{bucket.root}/advprop/efficientnet-b0.tar.gz'
    assert [(r[0], r[1], r[4]) for r in rows] == [
        ('effnet_v1_b2', 'aa_in1k', 'FAILED'),
        ('effnet_v1_b0', 'ap_in1k', advprop),
    ]
    (err,) = captured.err.strip().splitlines()
    assert err.startswith('effnet-timm: error: ') and '/ckptsaug/efficientnet-b2.tar.gz' in err and 'HTTP 404' in err
    assert not _untrusted(cli_env, 'effnet_v1_b0', 'ap_in1k') and _untrusted(cli_env, 'effnet_v1_b2')


@pytest.mark.oracle
@pytest.mark.parametrize(
    'argv, fragment',
    [
        ([], 'name the models'),
        (['effnet_v1_b9'], "'effnet_v1_b9'"),
        (['effnet_v1_b8.in1k'], 'ap_in1k, ra_in1k'),
        (['--tag', 'bogus'], "unknown tag 'bogus'"),
    ],
)
def test_download_command_bad_names_are_one_line(cli_env, bucket, capsys, argv, fragment):
    from effnet_timm_cli import main

    seen = len(bucket.requests)
    assert main(['download', *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == '' and captured.err.count('\n') == 1 and fragment in captured.err, captured.err
    assert bucket.requests[seen:] == []


def test_download_command_names_tag_and_all():
    from effnet_timm.weights.prefetch import select_names

    assert select_names(tag='ra_in1k') == [
        ('effnet_v1_b5', 'ra_in1k'),
        ('effnet_v1_b7', 'ra_in1k'),
        ('effnet_v1_b8', 'ra_in1k'),
    ]
    assert select_names(['effnet_v1_l2', 'effnet_v1_b8']) == [
        ('effnet_v1_l2', 'ns_jft_in1k_475'),
        ('effnet_v1_b8', 'ap_in1k'),
    ]
    # every official file (tensorflow/tpu README), and Lite0-4, EdgeTPU-S/M/L, CondConv x3 (lite/, edgetpu/, condconv/)
    assert len(select_names(all_=True)) == 9 + 9 + 1 + 3 + 8 + 6 + 5 + 3 + 3
    assert select_names(['effnet_v1_b0.aa_in1k', 'effnet_v1_b1'], tag='in1k') == [
        ('effnet_v1_b0', 'aa_in1k'),
        ('effnet_v1_b1', 'in1k'),
    ]  # --tag is for the bare names


@pytest.mark.oracle
def test_download_command_interrupted_leaves_nothing_half_written(bucket, official, tmp_path, client):
    cache = tmp_path / 'cache'
    part = cache / '.tmp' / NAME / 'download' / 'efficientnet-b0.tar.gz.part'
    bucket.release.clear()
    bucket.faults[AA] = Fault('stall', after=len(official[1]) // 3, times=1)
    env = dict(client.env, EFFNET_TIMM_CACHE=str(cache))
    proc = subprocess.Popen(
        [sys.executable, '-c', 'import sys, effnet_timm_cli; sys.exit(effnet_timm_cli.main())', 'download', NAME],
        env=env,
        cwd=str(Path(__file__).resolve().parents[2]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: part.exists() and part.stat().st_size >= len(official[1]) // 3, STEP_TIMEOUT_S)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        bucket.release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == 'effnet-timm: interrupted', err
    assert _untrusted(cache)
    assert sorted(p.name for p in cache.rglob('*') if p.is_file() and '.locks' not in p.parts) == [
        'efficientnet-b0.tar.gz.part',
        'efficientnet-b0.tar.gz.part.json',
    ]  # only the resumable download


@pytest.mark.oracle
def test_progress_bar_only_on_a_terminal_or_when_asked(bucket, tmp_path, capsys):
    bucket.files['/x/progress.tar.gz'] = os.urandom(100_000)
    url = f'{bucket.root}/x/progress.tar.gz'
    download(url, tmp_path / 'a.tar.gz')  # default: a bar only when stderr is a terminal (here it is captured)
    download(url, tmp_path / 'b.tar.gz', progress=False)
    assert capsys.readouterr().err == ''
    download(url, tmp_path / 'c.tar.gz', progress=True)
    assert '%|' in capsys.readouterr().err


@pytest.mark.oracle
def test_local_dir_folder_with_a_flipped_byte_is_refused(first_use, tmp_path):
    """`local-dir:` loads are explicit (no resolver), but their recorded sha256 is still checked: a flipped
    weight byte loads strictly and would silently change the logits."""
    import timm

    import effnet_timm

    cache, _, _, _ = first_use
    folder = tmp_path / 'copy'
    shutil.copytree(cache / NAME, folder)
    assert timm.create_model(f'local-dir:{folder}', pretrained=True) is not None
    data = bytearray((folder / 'model.safetensors').read_bytes())
    data[-5] ^= 1
    (folder / 'model.safetensors').write_bytes(bytes(data))
    with pytest.raises(effnet_timm.InputError, match='sha256') as err:
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert '\n' not in str(err.value) and 'model.safetensors' in str(err.value)


@pytest.mark.oracle
def test_two_threads_of_one_process_fill_an_entry_once(bucket, tmp_path, monkeypatch, official):
    """fcntl locks are per process on some systems; the entry lock must also keep threads apart."""
    from concurrent.futures import ThreadPoolExecutor

    from effnet_timm.weights.cache import fill_entry

    monkeypatch.setenv('EFFNET_TIMM_CKPT_ROOT', bucket.root)
    monkeypatch.setenv('EFFNET_TIMM_CACHE', str(tmp_path / 'cache'))
    seen = len(bucket.gets(AA))
    with ThreadPoolExecutor(2) as pool:
        entries = list(pool.map(lambda _: fill_entry('effnet_v1_b0', 'aa_in1k', progress=False), range(2)))
    assert len(bucket.gets(AA)) == seen + 1
    assert sorted(e.fetched_now for e in entries) == [False, True]
    assert entries[0].weights == entries[1].weights and not _untrusted(tmp_path / 'cache')


def test_official_locations_and_cache_root(monkeypatch, tmp_path):
    """Bucket paths as the tensorflow/tpu README links them (written out here, not derived from TAGS)."""
    from effnet_timm.weights.cache import cache_root, official_location

    monkeypatch.delenv('EFFNET_TIMM_CKPT_ROOT', raising=False)
    root = 'https://storage.googleapis.com/cloud-tpu-checkpoints/efficientnet'
    expected = {
        ('effnet_v1_b0', 'in1k'): '/ckpts/efficientnet-b0.tar.gz',
        ('effnet_v1_b7', 'aa_in1k'): '/ckptsaug/efficientnet-b7.tar.gz',
        ('effnet_v1_b8', 'ra_in1k'): '/randaug/efficientnet-b8-randaug.tar.gz',
        ('effnet_v1_b8', 'ap_in1k'): '/advprop/efficientnet-b8.tar.gz',
        ('effnet_v1_b3', 'ns_jft_in1k'): '/noisystudent/noisy_student_efficientnet-b3.tar.gz',
        ('effnet_v1_l2', 'ns_jft_in1k'): '/noisystudent/noisy_student_efficientnet-l2.tar.gz',
        ('effnet_v1_l2', 'ns_jft_in1k_475'): '/noisystudent/noisy_student_efficientnet-l2_475.tar.gz',
    }
    for (variant, tag), path in expected.items():
        assert official_location(variant, tag) == root + path
    monkeypatch.setenv('EFFNET_TIMM_CKPT_ROOT', 'https://mirror.example/effnet/')
    assert official_location('effnet_v1_b0', 'in1k') == 'https://mirror.example/effnet/ckpts/efficientnet-b0.tar.gz'
    monkeypatch.delenv('EFFNET_TIMM_CACHE', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert cache_root() == tmp_path / 'xdg' / 'effnet_timm'
    monkeypatch.delenv('XDG_CACHE_HOME')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert cache_root() == tmp_path / 'home' / '.cache' / 'effnet_timm'
    assert cache_root(tmp_path / 'timm-cache-dir') == tmp_path / 'timm-cache-dir' / 'effnet_timm'


@pytest.mark.oracle
def test_unwritable_cache_is_one_line(bucket, tmp_path, monkeypatch, capsys):
    from effnet_timm_cli import main

    (tmp_path / 'a-file').write_text('')
    monkeypatch.setenv('EFFNET_TIMM_CKPT_ROOT', bucket.root)
    monkeypatch.setenv('EFFNET_TIMM_CACHE', str(tmp_path / 'a-file' / 'cache'))
    seen = len(bucket.requests)
    assert main(['download', NAME, '--no-progress']) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert str(tmp_path / 'a-file') in err and 'the weights cache' in err and 'EFFNET_TIMM_CACHE' in err, err
    assert bucket.requests[seen:] == []


@pytest.mark.oracle
def test_full_disk_is_one_line_without_retries_and_frees_the_partial_file(bucket, tmp_path):
    import resource

    bucket.files['/x/big.tar.gz'] = os.urandom(3 << 20)
    seen = len(bucket.gets('/x/big.tar.gz'))
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    try:
        with pytest.raises(DownloadError, match='cannot write') as err:
            download(f'{bucket.root}/x/big.tar.gz', tmp_path / 'big.tar.gz', progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert 'big.tar.gz.part' in str(err.value) and '\n' not in str(err.value)
    assert len(bucket.gets('/x/big.tar.gz')) == seen + 1  # not retried
    assert not (tmp_path / 'big.tar.gz.part').exists()


def test_record_does_not_rehash_files_the_converter_recorded(tmp_path, monkeypatch):
    from effnet_timm.weights import cache as weights_cache

    (tmp_path / 'config.json').write_text(json.dumps({'effnet_timm': {'files': {'model.safetensors': {}}}}))
    calls = []
    monkeypatch.setattr(weights_cache, 'file_digests', lambda folder: calls.append(folder) or {})
    weights_cache._record(tmp_path, dict(source='x'))
    assert calls == []
    assert json.loads((tmp_path / 'config.json').read_text())['effnet_timm']['cache'] == {'source': 'x'}


@pytest.mark.oracle
def test_complete_part_of_a_killed_download_is_verified_not_fetched_again(bucket, tmp_path, monkeypatch):
    """Killed after the last byte was written, before verify and rename: the next call asks nothing (it used to
    send `Range: bytes=<size>-`, get 416 and start over), and still checks the bytes against X-Goog-Hash."""
    from effnet_timm.weights import download as dl

    data = os.urandom(200_000)
    bucket.files['/x/complete.tar.gz'] = data
    url, dest = f'{bucket.root}/x/complete.tar.gz', tmp_path / 'complete.tar.gz'

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(dl, '_verify', killed)
        with pytest.raises(KeyboardInterrupt):
            download(url, dest, progress=False)
    seen = len(bucket.gets('/x/complete.tar.gz'))
    got = download(url, dest, progress=False)
    assert got.path.read_bytes() == data and got.requests == 0 and set(got.goog_hash) == {'crc32c', 'md5'}
    assert len(bucket.gets('/x/complete.tar.gz')) == seen
    # A complete-length `.part` whose bytes do not match its recorded X-Goog-Hash is fetched again.
    with monkeypatch.context() as m:
        m.setattr(dl, '_verify', killed)
        with pytest.raises(KeyboardInterrupt):
            download(url, tmp_path / 'flipped.tar.gz', progress=False)
    part = tmp_path / 'flipped.tar.gz.part'
    part.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    got = download(url, tmp_path / 'flipped.tar.gz', progress=False)
    assert got.path.read_bytes() == data and got.requests == 1


@pytest.mark.oracle
@pytest.mark.parametrize('value', ['two', '0', '-1'])
def test_bad_download_attempts_variable_is_one_line(bucket, tmp_path, monkeypatch, value):
    from effnet_timm.errors import InputError

    bucket.files['/x/attempts.tar.gz'] = b'x' * 1000
    monkeypatch.setenv('EFFNET_TIMM_DOWNLOAD_ATTEMPTS', value)
    with pytest.raises(InputError) as err:
        download(f'{bucket.root}/x/attempts.tar.gz', tmp_path / 'a.tar.gz', progress=False)
    assert f'EFFNET_TIMM_DOWNLOAD_ATTEMPTS={value!r}' in str(err.value) and '\n' not in str(err.value)


@pytest.mark.oracle
def test_full_disk_while_filling_is_one_line_the_batch_goes_on_and_the_tarball_is_reused(
    cli_env, bucket, official, capsys, monkeypatch
):
    """An OSError after the download (here: writing the cache record) is one line naming the path, the other
    entries of `effnet-timm download` still fill, and the verified tarball is kept: the next call converts it
    without fetching it again."""
    import errno

    from effnet_timm.weights import cache as weights_cache
    from effnet_timm_cli import main

    record = weights_cache._record
    failing = tmp_config = None

    def full_disk(folder, cache):
        nonlocal failing, tmp_config
        if failing is None:
            failing = True
            tmp_config = folder / 'config.json.tmp'
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_config))
        return record(folder, cache)

    monkeypatch.setattr(weights_cache, '_record', full_disk)
    seen = len(bucket.gets(AA))
    assert main(['download', NAME, 'effnet_v1_b0.in1k', '--no-progress']) == 2
    captured = capsys.readouterr()
    assert [(r[1], r[4]) for r in _table(captured.out)] == [
        ('aa_in1k', 'FAILED'),
        ('in1k', f'{bucket.root}/ckpts/efficientnet-b0.tar.gz'),
    ]
    (err,) = captured.err.strip().splitlines()
    assert err.startswith('effnet-timm: error: ') and str(tmp_config) in err and 'No space left' in err, err
    assert _untrusted(cli_env) and not _untrusted(cli_env, 'effnet_v1_b0', 'in1k')
    assert main(['download', NAME, '--no-progress']) == 0
    assert len(bucket.gets(AA)) == seen + 1 and not _untrusted(cli_env)  # converted from the kept tarball
    assert not (cli_env / '.tmp').exists()  # and then not kept, and no empty folders either


@pytest.mark.oracle
def test_kept_tarball_that_changed_on_disk_is_fetched_again(cli_env, bucket, official, monkeypatch):
    from effnet_timm.weights import cache as weights_cache

    download_dir = cli_env / '.tmp' / NAME / 'download'

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(weights_cache, '_convert', interrupted)
        with pytest.raises(KeyboardInterrupt):
            weights_cache.fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
    tarball = download_dir / 'efficientnet-b0.tar.gz'
    data = bytearray(tarball.read_bytes())
    assert bytes(data) == official[1]  # kept after Ctrl-C
    data[len(data) // 2] ^= 1
    tarball.write_bytes(bytes(data))
    seen = len(bucket.gets(AA))
    entry = weights_cache.fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
    assert len(bucket.gets(AA)) == seen + 1 and entry.fetched_now and not _untrusted(cli_env)


@pytest.mark.oracle
def test_download_command_honours_hf_hub_disable_progress_bars(cli_env, bucket, monkeypatch):
    from effnet_timm.weights import cache as weights_cache
    from effnet_timm.weights import download as dl
    from effnet_timm_cli import main

    asked = []

    def fake_download(url, dest, progress=None, **kwargs):
        asked.append(progress)
        raise dl.DownloadError(f'cannot download {url}: stopped by the test')

    monkeypatch.setattr(weights_cache, 'download', fake_download)
    monkeypatch.setenv('HF_HUB_DISABLE_PROGRESS_BARS', '1')
    assert main(['download', NAME]) == 2
    assert asked == [False]


@pytest.mark.oracle
def test_full_disk_while_converting_keeps_the_downloaded_tarball(cli_env, bucket, official, monkeypatch):
    """The converter reports a full disk as a CheckpointError like a bad tarball; the tarball is still kept."""
    import resource

    from effnet_timm.errors import PretrainedWeightsError
    from effnet_timm.weights import cache as weights_cache

    tarball = cli_env / '.tmp' / NAME / 'download' / 'efficientnet-b0.tar.gz'
    seen = len(bucket.gets(AA))
    with monkeypatch.context() as m:  # download it, as a killed earlier fill would have
        m.setattr(weights_cache, '_convert', lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            weights_cache.fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    try:
        with pytest.raises(PretrainedWeightsError, match='File too large') as err:
            weights_cache.fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert '\n' not in str(err.value) and tarball.read_bytes() == official[1]
    entry = weights_cache.fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
    assert len(bucket.gets(AA)) == seen + 1 and entry.fetched_now and not _untrusted(cli_env)


# --- issue 16: locks on NFS, output-side failures, fast loads, pins, what a user sees ------------------------------


@pytest.mark.oracle
def test_first_use_fills_the_cache_where_flock_needs_a_writable_descriptor(cli_env, bucket, official, monkeypatch):
    """NFS emulates flock with byte-range locks, which need a descriptor open for writing: an exclusive flock on a
    read-only descriptor (as a directory lock takes) fails with EBADF there. First use must still work."""
    import errno
    import fcntl

    from effnet_timm.weights import cache as weights_cache

    real_flock = fcntl.flock
    refused = []

    def nfs_flock(fd, operation):
        number = fd if isinstance(fd, int) else fd.fileno()
        if operation & fcntl.LOCK_EX and fcntl.fcntl(number, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            refused.append(number)
            raise OSError(errno.EBADF, 'Bad file descriptor')
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, 'flock', nfs_flock)
    entry = weights_cache.fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
    assert entry.fetched_now and not _untrusted(cli_env) and refused == []


@pytest.mark.oracle
def test_safetensors_error_while_writing_keeps_the_verified_tarball(cli_env, bucket, official, monkeypatch):
    """A file-size limit (or a full disk) while safetensors writes raises its own SafetensorError, not an OSError:
    still an output-side failure, so the verified tarball is kept and the next call does not fetch it again."""
    import resource

    import effnet_convert.converter as converter
    from effnet_timm.errors import PretrainedWeightsError
    from effnet_timm.weights import cache as weights_cache

    real_save = converter.save_file

    def save_under_a_file_size_limit(*args, **kwargs):
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
        try:
            return real_save(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, previous)

    tarball = cli_env / '.tmp' / NAME / 'download' / 'efficientnet-b0.tar.gz'
    seen = len(bucket.gets(AA))
    with monkeypatch.context() as m:
        m.setattr(converter, 'save_file', save_under_a_file_size_limit)
        with pytest.raises(PretrainedWeightsError, match='File too large') as err:
            weights_cache.fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
    assert '\n' not in str(err.value) and tarball.read_bytes() == official[1]
    entry = weights_cache.fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
    assert len(bucket.gets(AA)) == seen + 1 and entry.fetched_now and not _untrusted(cli_env)
    assert not (cli_env / '.tmp').exists()  # converted: nothing kept, no empty folders


@pytest.mark.oracle
def test_later_loads_compare_stat_and_hash_only_what_changed(cli_env, bucket, monkeypatch):
    """The sha256 is computed when the entry is filled; a second create_model (every rank of a job) compares size,
    mtime, ctime and inode, and reads the weights again only when one changed."""
    import timm

    from effnet_timm.weights import integrity
    from effnet_timm.weights.cache import entry_state, fill_entry

    entry = fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
    hashed = []
    real = integrity.digest_file
    monkeypatch.setattr(
        integrity, 'digest_file', lambda path, *a, **k: hashed.append(Path(path).name) or real(path, *a, **k)
    )
    model = timm.create_model(NAME, pretrained=True)
    assert model.pretrained_cfg['file'] == str(entry.weights) and hashed == []
    os.utime(entry.weights)  # touched: checked again once, then trusted again by its new stat
    assert entry_state('effnet_v1_b0', 'aa_in1k')[0] is not None and hashed == ['model.safetensors']
    assert entry_state('effnet_v1_b0', 'aa_in1k')[0] is not None and hashed == ['model.safetensors']
    before = entry.weights.stat()
    data = bytearray(entry.weights.read_bytes())
    data[-5] ^= 1
    entry.weights.write_bytes(bytes(data))
    os.utime(entry.weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and mtime; ctime moved
    found, why = entry_state('effnet_v1_b0', 'aa_in1k')
    assert found is None and why.startswith('damaged (') and 'sha256' in why, why
    assert entry_state('effnet_v1_b0', 'aa_in1k', rehash=True)[0] is None


@pytest.mark.oracle
def test_http_mirror_without_hash_is_refused_unless_opted_in(cli_env, bucket, official):
    from effnet_timm.errors import PretrainedWeightsError
    from effnet_timm.weights.cache import fill_entry

    bucket.faults[AA] = Fault('no_hash')
    try:
        with pytest.raises(PretrainedWeightsError) as err:
            fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
        assert 'no X-Goog-Hash' in str(err.value) and 'EFFNET_TIMM_ALLOW_UNVERIFIED=1' in str(err.value)
        assert _untrusted(cli_env) and not (cli_env / '.tmp').exists()
        os.environ['EFFNET_TIMM_ALLOW_UNVERIFIED'] = '1'
        try:
            entry = fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
        finally:
            del os.environ['EFFNET_TIMM_ALLOW_UNVERIFIED']
    finally:
        bucket.faults.pop(AA, None)
    assert entry.fetched_now and not _untrusted(cli_env)


def _pins_file(tmp_path: Path, data: bytes, path: str = AA) -> Path:
    import hashlib

    pins = tmp_path / 'pins.json'
    pins.write_text(
        json.dumps({'tarballs': {path.lstrip('/'): {'sha256': hashlib.sha256(data).hexdigest(), 'size': len(data)}}})
    )
    return pins


@pytest.mark.oracle
@pytest.mark.parametrize('source', ['bucket', 'folder'])
def test_pinned_tarball_is_checked_whatever_the_source(cli_env, bucket, official, tmp_path, monkeypatch, source):
    """A pin decides, even where X-Goog-Hash agrees with the bytes or where the mirror is a local folder."""
    from effnet_timm.errors import PretrainedWeightsError
    from effnet_timm.weights import tags
    from effnet_timm.weights.cache import fill_entry

    if source == 'folder':
        mirror = tmp_path / 'mirror'
        (mirror / 'ckptsaug').mkdir(parents=True)
        (mirror / AA.lstrip('/')).write_bytes(official[1])
        monkeypatch.setenv('EFFNET_TIMM_CKPT_ROOT', str(mirror))
    monkeypatch.setattr(tags, 'PINS_FILE', _pins_file(tmp_path, official[1] + b'other'))
    with pytest.raises(PretrainedWeightsError) as err:
        fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
    assert 'pin' in str(err.value) and '\n' not in str(err.value), err.value
    assert _untrusted(cli_env)
    monkeypatch.setattr(tags, 'PINS_FILE', _good_pins(tmp_path, official[1]))
    entry = fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
    assert entry.fetched_now and not _untrusted(cli_env)
    config = json.loads((entry.folder / 'config.json').read_text())
    assert config['effnet_timm']['cache']['pinned'] is True


def _good_pins(tmp_path: Path, data: bytes) -> Path:
    folder = tmp_path / 'good-pins'
    folder.mkdir(exist_ok=True)
    return _pins_file(folder, data)


@pytest.mark.oracle
def test_offline_with_a_local_mirror_fills_the_cache(client, bucket, official, tmp_path):
    mirror = tmp_path / 'mirror'
    (mirror / 'ckptsaug').mkdir(parents=True)
    (mirror / AA.lstrip('/')).write_bytes(official[1])
    seen = len(bucket.requests)
    for root in (str(mirror), mirror.as_uri()):
        cache = tmp_path / f'cache-{len(root)}'
        result = client.load(cache, [(NAME, {})], EFFNET_TIMM_CKPT_ROOT=root, HF_HUB_OFFLINE='1')
        assert result.code == 0, result.stderr[-3000:]
        _assert_official_logits(result.logits(), official[0])
    assert bucket.requests[seen:] == []


@pytest.mark.oracle
def test_what_a_new_user_sees_when_nothing_can_be_reached(client, tmp_path):
    """No network at all: one line that says only what is true (no `.part` is named when no byte arrived), the
    seconds spent, and the ways out; no empty folders left in the cache."""
    import socket

    with socket.socket() as probe:  # a port that was just free: nothing listens there
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    cache = tmp_path / 'cache'
    result = client.load(
        cache, [(NAME, {})], EFFNET_TIMM_CKPT_ROOT=f'http://127.0.0.1:{port}/eff', EFFNET_TIMM_DOWNLOAD_ATTEMPTS='2'
    )
    line = result.line()
    assert f'http://127.0.0.1:{port}/eff{AA}' in line and '.part' not in line, line
    assert re.search(r'could not load pretrained weights \(\d+ s\)', line), line
    assert 'EFFNET_TIMM_CKPT_ROOT' in line and f'effnet-timm download {NAME}' in line, line
    assert 'pretrained_cfg_overlay=dict(file=...)' in line and 'attempts in' in line
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob('*')) == ['.locks', f'.locks/{NAME}.lock']


@pytest.mark.oracle
def test_offline_damaged_entry_is_called_damaged(first_use, tmp_path, client):
    cache, _, _, _ = first_use
    damaged = tmp_path / 'cache'
    shutil.copytree(cache / NAME, damaged / NAME)
    data = bytearray((damaged / NAME / 'model.safetensors').read_bytes())
    data[-5] ^= 1
    (damaged / NAME / 'model.safetensors').write_bytes(bytes(data))
    line = client.load(damaged, [(NAME, {})], HF_HUB_OFFLINE='1').line()
    assert f'cache {damaged / NAME}: damaged (' in line and 'not there' not in line, line
    assert 'HF_HUB_OFFLINE=1' in line


@pytest.mark.oracle
def test_download_command_honours_hf_hub_offline(cli_env, bucket, capsys, monkeypatch):
    from effnet_timm_cli import main

    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    seen = len(bucket.requests)
    assert main(['download', NAME, '--no-progress']) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert 'offline (HF_HUB_OFFLINE=1)' in err and bucket.requests[seen:] == []


@pytest.mark.oracle
def test_download_record_pins_fills_the_pins_file_from_the_bucket(
    cli_env, bucket, official, tmp_path, capsys, monkeypatch
):
    import hashlib

    from effnet_timm.weights import tags
    from effnet_timm.weights.cache import fill_entry
    from effnet_timm_cli import main

    pins = tmp_path / 'pins.json'
    pins.write_text(json.dumps({'_about': 'kept', 'tarballs': {}}))
    assert main(['download', NAME, 'effnet_v1_b0.in1k', '--record-pins', str(pins), '--no-progress']) == 0
    capsys.readouterr()
    expected = dict(sha256=hashlib.sha256(official[1]).hexdigest(), size=len(official[1]))
    data = json.loads(pins.read_text())
    assert data == {
        '_about': 'kept',
        'tarballs': {'ckpts/efficientnet-b0.tar.gz': expected, 'ckptsaug/efficientnet-b0.tar.gz': expected},
    }
    assert _untrusted(cli_env) and not list(tmp_path.glob('effnet-timm-pins-*'))  # pins only, nothing cached
    monkeypatch.setattr(tags, 'PINS_FILE', pins)
    assert fill_entry('effnet_v1_b0', 'aa_in1k', progress=False).fetched_now
    # A bucket answer without X-Goog-Hash is never pinned.
    bucket.faults[NS] = Fault('no_hash')
    try:
        assert main(['download', 'effnet_v1_b0.ns_jft_in1k', '--record-pins', str(pins), '--no-progress']) == 2
    finally:
        bucket.faults.pop(NS, None)
    assert 'X-Goog-Hash' in capsys.readouterr().err
    assert 'noisystudent/noisy_student_efficientnet-b0.tar.gz' not in json.loads(pins.read_text())['tarballs']


def test_download_list_prints_every_official_url(capsys):
    from effnet_timm_cli import main

    assert main(['download', '--list']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 9 + 9 + 1 + 3 + 8 + 6 + 5 + 3 + 3  # with Lite0-4, EdgeTPU-S/M/L, CondConv x3
    root = 'https://storage.googleapis.com/cloud-tpu-checkpoints/efficientnet'
    assert ['effnet_v1_lite0.in1k', f'{root}/lite/efficientnet-lite0.tar.gz'] in [line.split() for line in lines]
    assert ['effnet_v1_edgetpu_s.in1k', f'{root}/efficientnet-edgetpu-S.tar.gz'] in [line.split() for line in lines]
    cc = ['effnet_v1_condconv_b0_8e_depth.in1k', f'{root}/condconv/efficientnet-condconv-b0-8e-depth.tar.gz']
    assert cc in [line.split() for line in lines]
    assert lines[0].split() == [
        'effnet_v1_l2.ns_jft_in1k_475',
        f'{root}/noisystudent/noisy_student_efficientnet-l2_475.tar.gz',
    ]
    assert ['effnet_v1_b8.ra_in1k', f'{root}/randaug/efficientnet-b8-randaug.tar.gz'] in [
        line.split() for line in lines
    ]
    assert main(['download', '--list', 'effnet_v1_b0']) == 0  # the bare name means its first tag
    assert capsys.readouterr().out.split() == [
        'effnet_v1_b0.ns_jft_in1k',
        f'{root}/noisystudent/noisy_student_efficientnet-b0.tar.gz',
    ]


@pytest.mark.oracle
def test_download_verify_hashes_again(cli_env, bucket, capsys):
    from effnet_timm.weights.cache import fill_entry
    from effnet_timm_cli import main

    entry = fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
    assert main(['download', NAME, '--verify']) == 0
    assert [r[4] for r in _table(capsys.readouterr().out)] == ['verified']
    before = entry.weights.stat()
    data = bytearray(entry.weights.read_bytes())
    data[-5] ^= 1
    entry.weights.write_bytes(bytes(data))
    os.utime(entry.weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert main(['download', NAME, '--verify']) == 2
    assert 'damaged (' in capsys.readouterr().err


@pytest.mark.oracle
def test_tarball_kept_under_the_unverified_opt_in_is_not_reused_without_it(cli_env, bucket, official, monkeypatch):
    """A download accepted only because EFFNET_TIMM_ALLOW_UNVERIFIED was set, kept after a failed conversion, is
    fetched again (and verified) once the opt-in is gone: the kept copy is not a verified one."""
    from effnet_timm.weights import cache as weights_cache

    def interrupted(*args):
        raise KeyboardInterrupt

    bucket.faults[AA] = Fault('no_hash')
    try:
        with monkeypatch.context() as m:
            m.setenv('EFFNET_TIMM_ALLOW_UNVERIFIED', '1')
            m.setattr(weights_cache, '_convert', interrupted)
            with pytest.raises(KeyboardInterrupt):
                weights_cache.fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
    finally:
        bucket.faults.pop(AA, None)
    tarball = cli_env / '.tmp' / NAME / 'download' / 'efficientnet-b0.tar.gz'
    assert tarball.read_bytes() == official[1]  # kept after Ctrl-C
    seen = len(bucket.gets(AA))
    entry = weights_cache.fill_entry('effnet_v1_b0', 'aa_in1k', progress=False)
    assert len(bucket.gets(AA)) == seen + 1 and entry.fetched_now and not _untrusted(cli_env)
