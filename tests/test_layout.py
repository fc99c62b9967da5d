"""The house rules of the layout: dependencies run one way (README, "Layout"), no module reaches into another's
private names, and effnet_timm finds the converter by entry point instead of importing it."""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / 'effnet_timm'
# Which parts of effnet_timm each part may import (besides itself). Top level: errors, files, compat.
ALLOWED = {
    'models': {'compat', 'env', 'errors', 'files'},
    'data': {'compat', 'env', 'errors', 'files'},
    'weights': {'compat', 'env', 'errors', 'files', 'models', 'data'},
    'effnet_v1': {'compat', 'env', 'errors', 'files', 'models', 'weights'},
    'commands': {'compat', 'env', 'errors', 'files', 'models', 'data', 'weights', 'effnet_v1'},
}


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) of every import in `path`, relative ones resolved."""
    package = '.'.join(path.relative_to(REPO / 'convert' if 'convert' in path.parts else REPO).with_suffix('').parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split('.')[: -node.level] if node.level else []
            module = '.'.join([*base, node.module] if node.module else base)
            found.append((module, [alias.name for alias in node.names], node.lineno))
    return found


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob('*.py')) + sorted((REPO / 'convert' / 'effnet_convert').glob('*.py'))


def test_the_runtime_never_imports_the_converter():
    offenders = [
        f'{p.relative_to(REPO)}:{line}'
        for p in sorted(PACKAGE.rglob('*.py'))
        for module, _, line in _imports(p)
        if module.split('.')[0] == 'effnet_convert'
    ]
    assert not offenders, f'effnet_timm imports effnet_convert (it finds it by entry point): {offenders}'


def test_dependencies_run_one_way_inside_effnet_timm():
    offenders = []
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(PACKAGE).with_suffix('').parts
        part = parts[0]
        if part not in ALLOWED:
            continue
        for module, names, line in _imports(path):
            if module.split('.')[0] != 'effnet_timm':
                continue
            # `import effnet_timm`: the package, i.e. the registry (effnet_v1) and everything it imports
            target = module.split('.')[1] if '.' in module else names[0] if names else 'effnet_v1'
            if target not in (part, *ALLOWED[part]):
                offenders.append(f'{path.relative_to(REPO)}:{line} imports {module} ({part} may not use {target})')
    assert not offenders, '\n'.join(offenders)


def test_no_module_imports_another_modules_private_names():
    offenders = [
        f'{p.relative_to(REPO)}:{line} imports {name} from {module}'
        for p in _sources()
        for module, names, line in _imports(p)
        for name in names
        if name.startswith('_')
        and not name.startswith('__')
        and module.split('.')[0] in ('effnet_timm', 'effnet_convert')
    ]
    assert not offenders, offenders


def test_every_folder_says_in_one_line_what_it_owns():
    for init in sorted(PACKAGE.glob('*/__init__.py')):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and '\n' not in doc, f'{init.relative_to(REPO)}: a one-line docstring'


def test_the_converter_is_registered_and_found_by_entry_point():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from effnet_convert.converter import convert
    from effnet_timm.weights.converter import ENTRY_POINT_GROUP, TF_CHECKPOINT, tf_checkpoint_converter

    project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
    assert project['entry-points'][ENTRY_POINT_GROUP][TF_CHECKPOINT] == 'effnet_convert.converter:convert'
    assert tf_checkpoint_converter() is convert


def test_an_installed_converter_plugs_in_by_its_entry_point(tmp_path, monkeypatch):
    import importlib

    from effnet_timm.weights.converter import ENTRY_POINT_GROUP, TF_CHECKPOINT, tf_checkpoint_converter

    (tmp_path / 'other_converter.py').write_text('def convert(source, out_dir, **kwargs):\n    return "other"\n')
    dist = tmp_path / 'other_converter-1.0.dist-info'
    dist.mkdir()
    (dist / 'METADATA').write_text('Metadata-Version: 2.1\nName: other-converter\nVersion: 1.0\n')
    (dist / 'entry_points.txt').write_text(
        textwrap.dedent(f"""
        [{ENTRY_POINT_GROUP}]
        {TF_CHECKPOINT} = other_converter:convert
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        assert tf_checkpoint_converter()('x', 'y') == 'other'
    finally:
        sys.modules.pop('other_converter', None)


def test_the_runtime_loads_without_the_converter():
    # effnet_timm is usable (cache, model) with effnet_convert absent; only a conversion needs it.
    import subprocess

    code = (
        'import sys; sys.modules["effnet_convert"] = None\n'
        'import effnet_timm.weights.cache, effnet_timm.weights.converter, effnet_timm, timm\n'
        'timm.create_model("effnet_v1_b0")\n'
        'assert "effnet_convert" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]\n'
    )
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_one_error_line_helper():
    from effnet_timm.errors import first_line

    err = RuntimeError('Error(s) in loading state_dict:\n\tMissing key(s): "a".\n')
    assert first_line(err) == 'Error(s) in loading state_dict:'
    assert first_line(err, whole=True) == 'Error(s) in loading state_dict: Missing key(s): "a".'
    assert first_line(OSError()) == first_line(OSError(), whole=True) == 'OSError'
