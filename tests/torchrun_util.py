"""Launching torchrun workers from tests: a free loopback port, a loopback-only environment, the ranks' errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def loopback_env() -> dict[str, str]:
    """Environment for torchrun workers that talk over loopback only, one thread each (as torchrun's default)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    # Worker scripts in tests/*/ import this module too.
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get('PYTHONPATH', '')]))
    for name in ('lo', 'lo0'):
        if Path('/sys/class/net', name).exists() or sys.platform == 'darwin' and name == 'lo0':
            env['GLOO_SOCKET_IFNAME'] = name
            break
    return env


def failure_report(proc: subprocess.CompletedProcess) -> str:
    """The ranks' own errors first: torchrun's summary at the end names only the exit codes."""
    lines = (proc.stdout + proc.stderr).splitlines()
    ranks = [line for line in lines if line.startswith('[rank')]
    return '\n'.join(ranks[-40:] + lines[-15:])
