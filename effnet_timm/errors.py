"""The errors effnet_timm raises for things a user can fix; each message is one line naming the problem."""

from __future__ import annotations

__all__ = ['InputError', 'PretrainedWeightsError', 'first_line']


class InputError(ValueError):
    """Bad input (a file, a name, an argument): the command-line tools print it as one line and exit with 2."""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and could not be had."""


def first_line(err: BaseException, whole: bool = False) -> str:
    """An exception's message as one line for a report (its type name when empty): the first line, or with
    `whole` every line joined (whitespace runs collapsed), for messages whose later lines name the problem
    (torch's load_state_dict, OS errors with a path). The one error-line helper of effnet_timm."""
    text = str(err).strip() or type(err).__name__
    return ' '.join(text.split()) if whole else text.splitlines()[0].rstrip('.')
