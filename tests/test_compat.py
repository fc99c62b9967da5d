"""The private timm and torch APIs effnet_timm uses are all in effnet_timm/compat.py, and all still there."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

from effnet_timm import compat


@pytest.mark.parametrize('api', compat.PRIVATE_APIS, ids=lambda a: f'{a.module}.{a.name}')
def test_private_api_is_present(api):
    import timm
    import torch

    assert compat.lookup(api) is not None, (
        f'{api.module}.{api.name} ({api.why}) is gone in timm {timm.__version__} / torch {torch.__version__}; '
        f'tested with {compat.TESTED_VERSIONS}: adapt effnet_timm/compat.py'
        + ('' if api.required else ' (optional: effnet_timm falls back to the plain path without it)')
    )


def test_a_missing_private_api_fails_the_import_with_one_clear_line(monkeypatch):
    missing = compat.PrivateApi('timm.models._builder', '_no_such_function', True, 'a test')
    monkeypatch.setattr(compat, 'PRIVATE_APIS', (*compat.PRIVATE_APIS, missing))
    with pytest.raises(
        ImportError, match=r'needs timm\.models\._builder\._no_such_function \(a test\), absent from timm'
    ):
        compat._require('timm.models._builder', '_no_such_function')


def test_no_module_outside_compat_uses_a_private_timm_or_torch_name():
    private = re.compile(
        r'timm\.\w+\._\w+|from timm[\w.]* import _|torch\._C|torch\.ops\.mkldnn\._'
        r'|\b(?:F|nn|functional|batchnorm|modules)\.(?:\w+\.)*_[a-z]\w*'  # torch.nn's private names
    )
    offenders = []
    for path in sorted(REPO.glob('effnet_timm/**/*.py')) + sorted(REPO.glob('convert/effnet_convert/*.py')):
        if path.name == 'compat.py':
            continue
        offenders += [
            f'{path.relative_to(REPO)}:{n}'
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if private.search(line)
        ]
    assert not offenders, 'private timm/torch names outside effnet_timm/compat.py: ' + ', '.join(offenders)


def test_private_apis_bound_their_packages_in_pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    deps = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['dependencies']
    for package in ('timm', 'torch'):
        spec = next(d for d in deps if re.match(rf'{package}\b', d))
        assert re.search(r',\s*<', spec), f'{spec}: effnet_timm/compat.py uses private {package} APIs: bound it above'
