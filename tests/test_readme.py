"""The README's two set-up commands are the ones CI runs."""
from __future__ import annotations

import re

from conftest import REPO


def _bash_blocks(text: str) -> list:
    return [block.strip() for block in re.findall(r'```bash\n(.*?)```', text, re.S)]


def test_ci_runs_the_readme_setup_commands_verbatim():
    readme = (REPO / 'README.md').read_text()
    ci = (REPO / '.ci' / 'run').read_text().splitlines()
    install, tests = _bash_blocks(readme)[:2]
    assert 'pip install' in install and 'effnet-convert' in install
    assert 'pytest' in tests
    assert install in ci and tests in ci
