"""Run a Python script (timm's `train.py`, `validate.py`, ...) with effnet_timm's models registered in timm.

The library behind `effnet-timm run SCRIPT [ARGS...]`: the script runs as `python SCRIPT ARGS...` would run it
(`__name__ == '__main__'`, `sys.argv == [SCRIPT, *ARGS]`, the script's folder first on `sys.path`), in a process
where `import effnet_timm` has already registered `effnet_v1_*`, so `--model effnet_v1_b3` works unedited.
Under `torchrun --no-python effnet-timm run train.py ...` every rank does the same.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError

__all__ = ['run_script']


def run_script(script: str | os.PathLike, args: Sequence[str] = ()) -> int:
    """Run `script` as `__main__` with `sys.argv = [script, *args]`; return 0 when it ends without `sys.exit`.

    `SystemExit` raised by the script (`sys.exit(3)`, argparse's exit 2, `sys.exit('message')`) propagates
    unchanged, so the process exits as `python SCRIPT` would; other exceptions propagate with their traceback.
    A script that does not exist or is not a file is an `InputError`.
    """
    path = Path(script)
    if not path.exists():
        raise InputError(f'{script}: no such script')
    if not path.is_file():
        raise InputError(f'{script}: not a file (give the path of a Python script)')
    import effnet_timm  # noqa: F401  - registers effnet_v1_* with timm before the script creates a model

    with _as_main(str(script), list(args), str(path.resolve().parent)):
        runpy.run_path(str(script), run_name='__main__')
    return 0


@contextmanager
def _as_main(argv0: str, args: list[str], folder: str) -> Iterator[None]:
    # `python SCRIPT` puts the script's folder first on sys.path (so `import utils` beside train.py works) and
    # argv[0] is the path as typed. runpy only swaps argv[0] and `__main__` itself; restore the rest after,
    # so a caller in Python (tests, notebooks) gets its own argv and path back.
    saved_argv, saved_path = sys.argv, sys.path[:]
    sys.argv = [argv0, *args]
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
