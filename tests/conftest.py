"""Shared paths and helpers for the test suite."""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch

# Keep test runs hermetic: no telemetry, no accidental Hub traffic, a private cache.
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')
os.environ.setdefault('HF_HUB_DISABLE_XET', '1')

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / 'fixtures'
# ../shared beside the checkout; EFFNET_TIMM_SHARED points elsewhere (the tests of the CI rules below hide it so).
SHARED = Path(os.environ.get('EFFNET_TIMM_SHARED') or REPO.parent / 'shared')
OFFICIAL = SHARED / 'fixtures' / 'official'
MANIFESTS = OFFICIAL / 'manifests'
# The scaled-down official checkpoint and the sample photos ship in the package; tests use those copies.
TINY_CKPT = REPO / 'convert' / 'effnet_convert' / 'demo' / 'efficientnet-tiny' / 'model.ckpt'
SAMPLES = REPO / 'convert' / 'effnet_convert' / 'samples'


@pytest.fixture(scope='session', autouse=True)
def _torch_threads() -> None:
    """A thread per core, in every pytest-xdist worker too: tests compare this process's numbers with those of
    subprocesses, which run torch's default (a thread per core), and some kernels' results depend on the thread
    count. torch is imported by the test files, not by this conftest: tests that need no torch
    (tests/test_readme.py runs this conftest on a tiny suite in subprocesses) start without paying for it."""
    torch = sys.modules.get('torch')
    if torch is not None:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


# CI must run the oracle tests, not skip them: with CI set (CI=true, as CI services set it) or
# EFFNET_TIMM_REQUIRE_ORACLES=1, a missing TensorFlow or ../shared fails the test that needs it.
REQUIRE_ORACLES = (
    os.environ.get('CI', '').strip().lower() not in ('', '0', 'false', 'no')
    or os.environ.get('EFFNET_TIMM_REQUIRE_ORACLES', '') == '1'
)
REQUIRE_REASON = 'CI (CI or EFFNET_TIMM_REQUIRE_ORACLES=1 set) fails instead of skipping'


def skip_or_fail(reason: str) -> None:
    """Skip with `reason`; fail instead when the oracles are required (CI)."""
    if REQUIRE_ORACLES:
        pytest.fail(f'{reason}; {REQUIRE_REASON}', pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope='session', autouse=True)
def _private_weights_cache(tmp_path_factory):
    """pretrained=True in tests neither reads nor fills the user's weights cache, and never reaches the official
    bucket (a closed loopback port answers instead); tests of first use set both to their own."""
    os.environ['EFFNET_TIMM_CACHE'] = str(tmp_path_factory.mktemp('effnet_timm_cache'))
    os.environ['EFFNET_TIMM_CKPT_ROOT'] = 'http://127.0.0.1:9/no-bucket-in-tests'


@pytest.fixture(scope='session')
def converted_tiny(tmp_path_factory) -> Path:
    """The demo checkpoint converted once at 96 px. Tests read it or copy it; none may edit it."""
    from effnet_convert.converter import convert

    folder = tmp_path_factory.mktemp('converted') / 'effnet_v1'
    convert(str(TINY_CKPT.parent), folder, image_size=96)
    return folder


@pytest.fixture(scope='session')
def converted_b0(tmp_path_factory) -> Path:
    """The official-format B0 of ../shared converted once (no tag), for `oracle` tests. Read or copy, never edit."""
    from effnet_convert.converter import convert

    folder = tmp_path_factory.mktemp('converted_b0') / 'b0'
    convert(str(shared_path('efficientnet-b0')), folder, tag='none')
    return folder


@pytest.fixture(scope='session')
def tf():
    """TensorFlow, the test oracle (the `test` extra)."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    try:
        import tensorflow
    except ImportError as err:
        skip_or_fail(f'TensorFlow (the test oracle, pip install -e ".[test]") cannot be imported: {err}')
    return tensorflow


@pytest.fixture(scope='session')
def info_output() -> str:
    """What `effnet-timm info` prints (every variant counted on the meta device: tens of seconds, so once)."""
    import contextlib
    import io

    from effnet_timm_cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(['info']) == 0
    return out.getvalue()


def save_v2(tf, prefix: Path, tensors: dict) -> Path:
    """Write a bundle with the SaveV2 op, as tf.compat.v1.train.Saver does, without building a graph."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    tf.raw_ops.SaveV2(
        prefix=str(prefix), tensor_names=names, shape_and_slices=[''] * len(names), tensors=list(tensors.values())
    )
    return prefix


def shared_path(*parts: str) -> Path:
    """A file from ../shared, or skip the test with the reason (fail it under CI). Only for `oracle` tests."""
    _require_oracle_mark()
    path = OFFICIAL.joinpath(*parts)
    if not path.exists():
        skip_or_fail(f'{path} is absent (../shared is not beside this checkout)')
    return path


def load_manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def realistic_init_(
    model: torch.nn.Module, calib_size: int = 128, seed: int = 0, calib_input: torch.Tensor | None = None
) -> torch.nn.Module:
    """Give a model weights whose activations look trained: per-channel scaled kernels, random BN affine,
    BN statistics calibrated on one batch (as the official fixtures are made). Small-variance channels
    are what make BN eps and padding mistakes visible in the logits."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 4:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                scale = torch.exp(torch.empty(p.shape[0], 1, 1, 1).uniform_(-3.0, 0.7, generator=g))
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5 * scale)
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 3 / p.shape[1] ** 0.5)
            elif name.endswith('weight'):  # BN gamma
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            else:  # BN beta, conv/linear bias
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one batch sets the statistics exactly
        x = calib_input if calib_input is not None else torch.randn(4, 3, calib_size, calib_size, generator=g)
        model.train()
        model(x)
        model.eval()
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
    return model


# ----------------------------------------------------------------------------- CI: skips become failures


# A skip for a missing oracle or test dependency (what `pip install -e ".[test]"` and ../shared give CI), as
# the test files word them: importorskip's reasons and messages, and the "../shared is absent" skips.
# Skips for the machine itself (no tmpfs mount rights, no float16 conv on this CPU) stay skips.
ORACLE_SKIP = re.compile(r'tensorflow|\.\./shared|shared/|could not import|pip install', re.I)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Under CI, a skip raised in a test file for a missing TensorFlow, ../shared or test dependency is a
    failure too (the `tf` fixture and `shared_path` fail by themselves). Declared `skip`/`skipif` marks
    (a platform without fork, say) stay skips."""
    outcome = yield
    report = outcome.get_result()
    if (
        REQUIRE_ORACLES
        and report.skipped
        and call.excinfo is not None
        and call.excinfo.errisinstance(pytest.skip.Exception)
        and ORACLE_SKIP.search(call.excinfo.value.msg)
        and item.get_closest_marker('skip') is None
        and item.get_closest_marker('skipif') is None
    ):
        report.outcome = 'failed'
        report.longrepr = f'skipped ({call.excinfo.value.msg}); {REQUIRE_REASON}'


# ----------------------------------------------------------------------------- the `oracle` marker

# A test that needs TensorFlow or ../shared says so: `pytestmark = pytest.mark.oracle` in its module, or
# `@pytest.mark.oracle` on it. `-m "not oracle"` is then the quick subset that needs neither. The marks are kept
# honest at run time: an unmarked test that asks for the `tf` fixture or calls `shared_path` fails, saying so.
ORACLE_FIXTURES = frozenset({'tf'})
UNMARKED = 'needs TensorFlow or ../shared but is not marked: add @pytest.mark.oracle (or a module pytestmark)'
_current_item: pytest.Item | None = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        'markers', "oracle: needs TensorFlow or ../shared; -m 'not oracle' is the quick subset that needs neither"
    )
    # Progress by file on the pytest-xdist controller at the default verbosity (-v keeps a line per test).
    workers = getattr(config.option, 'numprocesses', None)
    if workers and not hasattr(config, 'workerinput') and config.option.verbose <= 0:
        config.pluginmanager.register(FileProgress(config), 'effnet_timm_file_progress')


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Remember the running test (for `shared_path`) and refuse an unmarked test using the `tf` fixture."""
    global _current_item
    _current_item = item
    if ORACLE_FIXTURES & set(getattr(item, 'fixturenames', ())) and item.get_closest_marker('oracle') is None:
        pytest.fail(f'{item.nodeid} {UNMARKED}', pytrace=False)


def _require_oracle_mark() -> None:
    item = _current_item
    if item is not None and item.get_closest_marker('oracle') is None:
        pytest.fail(f'{item.nodeid} {UNMARKED}', pytrace=False)


# ----------------------------------------------------------------------------- progress by file


class FileProgress:
    """One line per finished test file instead of pytest-xdist's row of dots (the default test command runs
    on several workers, whose dots say nothing about where the run is)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.total: collections.Counter[str] = collections.Counter()
        self.outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.worst: dict[str, str] = {}
        self.first_report: dict[str, float] = {}
        self.finished = 0

    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        if not self.total:  # every worker collects the same tests
            self.total.update(_file_of(nodeid) for nodeid in ids)

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(self, report: pytest.TestReport) -> tuple[str, str, str] | None:
        """Counted as pytest counts it, but no letter: the file's line says how its tests went."""
        if hasattr(report, 'wasxfail'):
            return ('xfailed', '', 'XFAIL') if report.skipped else ('xpassed', '', 'XPASS')
        if report.when == 'call':
            return report.outcome, '', report.outcome.upper()  # the word is the summary's (FAILED test - why)
        if report.failed:
            return 'error', '', 'ERROR'
        return ('skipped', '', 'SKIPPED') if report.skipped else ('', '', '')

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        file = _file_of(report.nodeid)
        self.first_report.setdefault(file, time.monotonic())
        rank = {'passed': 0, 'xpassed': 1, 'xfailed': 1, 'skipped': 1, 'failed': 2, 'error': 2}
        outcome = 'error' if report.failed and report.when != 'call' else report.outcome
        if hasattr(report, 'wasxfail'):
            outcome = 'xfailed' if report.skipped else 'xpassed'
        previous = self.worst.get(report.nodeid, 'passed')
        if rank.get(outcome, 2) >= rank.get(previous, 2) and outcome != 'passed':
            self.worst[report.nodeid] = outcome
        if report.when != 'teardown':
            return
        self.outcomes[file][self.worst.pop(report.nodeid, 'passed')] += 1
        self.finished += 1
        if sum(self.outcomes[file].values()) == self.total.get(file, -1):
            counts = ', '.join(f'{n} {kind}' for kind, n in sorted(self.outcomes[file].items()))
            seconds = time.monotonic() - self.first_report[file]
            percent = 100 * self.finished // max(1, sum(self.total.values()))
            self.config.pluginmanager.getplugin('terminalreporter').write_line(
                f'[{percent:3d}%] {file}: {counts} ({seconds:.0f} s)'
            )


def _file_of(nodeid: str) -> str:
    return nodeid.split('::')[0]


# The files that take longest, longest first (from a full run's --durations=0). pytest-xdist hands out whole
# files (--dist loadfile) in collection order; starting with the long ones keeps one worker from finishing
# the run alone with a long file picked up last.
LONGEST_FILES = (
    'tests/convert/test_convert.py',
    'tests/weights/test_first_use.py',
    'tests/models/test_numerics.py',
    'tests/convert/test_hub.py',
    'tests/commands/test_validate.py',
    'tests/commands/test_run_script.py',
    'tests/convert/test_convert_bad_input.py',
    'tests/models/test_performance_features.py',
    'tests/models/test_families.py',
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get('PYTEST_XDIST_WORKER'):
        return  # one process: pytest's own order
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(_file_of(item.nodeid), len(rank)))  # stable: a file keeps its order
