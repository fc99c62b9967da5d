"""The README's commands and numbers are the ones CI runs and the code prints; the package declares what it
imports; CI cannot skip the oracle tests."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / 'README.md'


def _bash_blocks(text: str) -> list:
    return [block.strip() for block in re.findall(r'```bash\n(.*?)```', text, re.S)]


def test_ci_runs_the_readme_setup_commands_verbatim():
    readme = README.read_text()
    ci = (REPO / '.ci' / 'run').read_text().splitlines()
    install, tests = _bash_blocks(readme)[:2]
    assert 'pip install' in install and 'effnet-convert' in install
    assert 'pytest' in tests
    assert install in ci and tests in ci


def test_readme_info_table_is_the_info_command_output(info_output):
    # The block right after the sentence introducing `effnet-timm info`: printed numbers drift when the
    # model or the counter changes, so the README must be regenerated from the command, never typed.
    readme = README.read_text()
    intro = readme.index('`effnet-timm info` counts')
    block = re.search(r'```text\n(.*?)```', readme[intro:], re.S).group(1)
    assert block.rstrip('\n') == info_output.rstrip('\n')


def test_readme_predict_example_prints_what_predict_prints(converted_tiny, capsys, monkeypatch):
    # The example runs on the set-up command's out/demo; converted_tiny is the same conversion.
    from effnet_timm_cli import main

    readme = README.read_text()
    intro = readme.index('On the demo folder from the set-up command')
    command = re.search(r'```bash\n(.*?)```', readme[intro:], re.S).group(1).strip()
    expected = re.search(r'```text\n(.*?)```', readme[intro:], re.S).group(1)
    program, *args = shlex.split(command)
    assert program == 'effnet-timm' and args[0] == 'predict' and 'out/demo' in args
    monkeypatch.chdir(REPO)  # the example's image paths are relative to the checkout
    assert main([str(converted_tiny) if a == 'out/demo' else a for a in args]) == 0
    out = capsys.readouterr().out
    assert out.rstrip('\n') == expected.rstrip('\n').replace('out/demo', str(converted_tiny))


# ----------------------------------------------------------------------------- packaging


def _requirement_names(requirements: list) -> set:
    return {re.match(r'[A-Za-z0-9_.-]+', r).group(0).lower().replace('_', '-') for r in requirements}


def _imports(path: Path, top_level_only: bool) -> set:
    """Module roots a file imports (absolute imports, stdlib and our own excluded). Imports guarded by
    ``except ImportError`` are optional by construction and left out."""
    roots = set()

    def visit(nodes, in_function: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
                visit(node.handlers + node.orelse + node.finalbody, in_function)
                continue
            if isinstance(node, ast.Import) and not (top_level_only and in_function):
                roots.update(alias.name.split('.')[0] for alias in node.names)
            elif (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and node.module
                and not (top_level_only and in_function)
            ):
                roots.add(node.module.split('.')[0])
            inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(list(ast.iter_child_nodes(node)), inner)

    visit(ast.parse(path.read_text()).body, False)
    return roots - set(sys.stdlib_module_names) - {'effnet_timm', 'effnet_convert', 'effnet_timm_cli'}


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    types_ = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in ('ImportError', 'ModuleNotFoundError') for t in types_)


def test_every_imported_package_is_declared():
    project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
    runtime = _requirement_names(project['dependencies'])
    declared = runtime.union(*(_requirement_names(extra) for extra in project['optional-dependencies'].values()))
    declared |= {'tensorflow', 'keras'}  # the `test` extra's tensorflow-cpu (keras comes with it)
    dists = importlib.metadata.packages_distributions()
    sources = sorted((REPO / 'effnet_timm').rglob('*.py')) + sorted((REPO / 'convert' / 'effnet_convert').rglob('*.py'))
    sources.append(REPO / 'effnet_timm_cli.py')

    def dist(module: str) -> str:
        return dists.get(module, [module])[0].lower().replace('_', '-')

    for path in sources:
        # Imported when the module loads: a runtime dependency (Pillow was imported without being declared).
        top = {dist(m) for m in _imports(path, top_level_only=True)}
        assert top <= runtime, f'{path.name} imports {sorted(top - runtime)} at load time, not runtime dependencies'
        anywhere = {dist(m) for m in _imports(path, top_level_only=False)}
        assert anywhere <= declared, f'{path.name} imports {sorted(anywhere - declared)}, declared nowhere'


def test_tf_exact_jpeg_decoder_is_a_runtime_dependency():
    # preprocessing falls back to Pillow (accurate DCT, ~1 level off) without it: a plain install must not.
    project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
    assert {'simplejpeg', 'pillow'} <= _requirement_names(project['dependencies'])


# ----------------------------------------------------------------------------- CI fails what it would skip

TINY_TESTS = """
import pytest
from conftest import shared_path

@pytest.mark.oracle
def test_shared():
    shared_path('efficientnet-b0')

@pytest.mark.oracle
def test_tf(tf):
    pass

def test_unmarked_shared():
    shared_path('efficientnet-b0')

def test_unmarked_tf(tf):
    pass

def test_own_skip():
    pytest.skip('a file of ../shared is absent')

def test_importorskip():
    pytest.importorskip('no_such_module_for_effnet_timm')

@pytest.mark.skipif(True, reason='declared: not on this platform')
def test_platform():
    pass

def test_machine_skip():
    pytest.skip('this CPU build has no float16 conv')

def test_plain():
    pass
"""


@pytest.fixture(scope='module')
def tiny_suite(tmp_path_factory) -> Path:
    """A test file using the suite's conftest, with ../shared hidden and TensorFlow made unimportable."""
    root = tmp_path_factory.mktemp('ci_rules')
    (root / 'conftest.py').write_text((REPO / 'tests' / 'conftest.py').read_text())
    (root / 'test_tiny.py').write_text(TINY_TESTS)
    no_tf = root / 'no_tf' / 'tensorflow'
    no_tf.mkdir(parents=True)
    (no_tf / '__init__.py').write_text("raise ImportError('TensorFlow hidden by the test')\n")
    return root


def _run_tiny(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ('CI', 'EFFNET_TIMM_REQUIRE_ORACLES', 'PYTEST_ADDOPTS')}
    clean.update(EFFNET_TIMM_SHARED=str(root / 'no_shared'), PYTHONPATH=str(root / 'no_tf'), **env)
    return subprocess.run(
        [
            sys.executable,
            '-m',
            'pytest',
            '-p',
            'no:cacheprovider',
            '--rootdir',
            str(root),
            '-c',
            os.devnull,
            *args,
            str(root / 'test_tiny.py'),
        ],
        cwd=root,
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _outcomes(root: Path, **env: str) -> dict[str, str]:
    xml = root / f'junit-{len(env)}-{"-".join(env.values())}.xml'
    _run_tiny(root, f'--junitxml={xml}', **env)
    outcomes = {}
    for case in ET.parse(xml).getroot().iter('testcase'):
        kinds = [child.tag for child in case if child.tag in ('failure', 'error', 'skipped')]
        # A failing fixture is an 'error', a failing test body a 'failure': both fail the run.
        outcomes[case.get('name')] = (
            {'failure': 'failed', 'error': 'failed'}.get(kinds[0], kinds[0]) if kinds else 'passed'
        )
    return outcomes


@pytest.mark.parametrize('env', [{}, {'CI': 'false'}])
def test_missing_oracles_skip_outside_ci(tiny_suite, env):
    assert _outcomes(tiny_suite, **env) == {
        'test_shared': 'skipped',
        'test_tf': 'skipped',
        'test_unmarked_shared': 'failed',  # not marked `oracle`: fails everywhere, so the marks stay honest
        'test_unmarked_tf': 'failed',
        'test_own_skip': 'skipped',
        'test_importorskip': 'skipped',
        'test_platform': 'skipped',
        'test_machine_skip': 'skipped',
        'test_plain': 'passed',
    }


@pytest.mark.parametrize('env', [{'CI': 'true'}, {'CI': '1'}, {'EFFNET_TIMM_REQUIRE_ORACLES': '1'}])
def test_missing_oracles_fail_under_ci(tiny_suite, env):
    assert _outcomes(tiny_suite, **env) == {
        'test_shared': 'failed',
        'test_tf': 'failed',
        'test_unmarked_shared': 'failed',
        'test_unmarked_tf': 'failed',
        'test_own_skip': 'failed',
        'test_importorskip': 'failed',
        'test_platform': 'skipped',
        'test_machine_skip': 'skipped',
        'test_plain': 'passed',
    }


def test_ci_failure_says_why(tiny_suite):
    proc = _run_tiny(tiny_suite, '-rfE', CI='true')
    assert proc.returncode == 1
    assert re.search(r'FAILED .*test_shared - .*efficientnet-b0 is absent .*instead of skipping', proc.stdout), (
        proc.stdout[-3000:]
    )
    assert re.search(r'ERROR .*test_tf - .*TensorFlow .*cannot be imported', proc.stdout), proc.stdout[-3000:]


def test_oracle_marker_selects_the_tests_needing_tensorflow_or_shared(tiny_suite):
    proc = _run_tiny(tiny_suite, '--collect-only', '-q', '-m', 'oracle')
    assert re.findall(r'::(test_\w+)', proc.stdout) == ['test_shared', 'test_tf'], proc.stdout[-3000:]
    proc = _run_tiny(tiny_suite, '-q', '-m', 'not oracle', CI='true')  # the quick subset needs neither
    assert proc.returncode == 1 and '2 deselected' in proc.stdout  # own skips still fail under CI
    assert re.search(r'FAILED .*test_unmarked_shared - .*is not marked: add @pytest.mark.oracle', proc.stdout)


def test_oracle_marks_are_explicit_in_the_test_files():
    # The marks are written where a reader sees them, not derived by scanning the tests' code.
    conftest = (REPO / 'tests' / 'conftest.py').read_text()
    assert 'co_names' not in conftest and 'add_marker(pytest.mark.oracle' not in conftest
    marked = [p.name for p in sorted((REPO / 'tests').rglob('test_*.py')) if 'pytest.mark.oracle' in p.read_text()]
    assert {'test_tf_reference.py', 'test_first_use.py', 'test_convert.py'} <= set(marked)
