"""effnet_timm's settings from environment variables: one reader per kind, a bad value is one line naming it."""

from __future__ import annotations

import math
import os

from .errors import InputError

__all__ = ['env_flag', 'env_float', 'env_int']


def env_flag(name: str) -> bool:
    """Whether `name` is set to a true value (1, true, yes, on), as huggingface_hub reads its flags."""
    return os.environ.get(name, '').strip().lower() in ('1', 'true', 'yes', 'on')


def env_int(name: str, default: int, minimum: int, what: str = 'an integer') -> int:
    """`name` as an integer >= `minimum`, or `default` when unset or empty."""
    raw = os.environ.get(name, '').strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise InputError(f'{name}={raw!r}: expected {what} >= {minimum}')
    return value


def env_float(name: str, default: float, minimum: float) -> float:
    """`name` as a finite number >= `minimum`, or `default` when unset or empty."""
    raw = os.environ.get(name, '').strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= minimum or math.isinf(value):
        raise InputError(f'{name}={raw!r}: expected a number of at least {minimum:g}')
    return value
