"""The errors effnet_timm raises for things a user can fix; each message is one line naming the problem."""

from __future__ import annotations

__all__ = ['InputError', 'PretrainedWeightsError', 'first_line']


class InputError(ValueError):
    """Bad input (a file, a name, an argument): the command-line tools print it as one line and exit with 2."""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and could not be had."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line reports."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0].rstrip('.')
