"""The errors effnet_timm raises for things a user can fix; each message is one line naming the problem."""

from __future__ import annotations

__all__ = ['CheckpointError', 'InputError', 'OutputError', 'PretrainedWeightsError', 'first_line']


class InputError(ValueError):
    """Bad input (a file, a name, an argument): the command-line tools print it as one line and exit with 2."""


class CheckpointError(InputError):
    """A checkpoint, source or output that cannot be used; the message is one line naming the file and the item.

    An `InputError`, so every front end reports it as a user error (one line, exit status 2). Raised by the
    converter (effnet_convert.errors re-exports it); defined here so that the runtime, which finds the converter by
    entry point, can tell its errors apart without importing it."""


class OutputError(CheckpointError):
    """The output could not be written (a full disk, a file-size limit, permissions): the input is not at fault,
    so a caller may keep it and try again (the weights cache keeps a verified tarball for the next attempt)."""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and could not be had."""


def first_line(err: BaseException, whole: bool = False) -> str:
    """An exception's message as one line for a report (its type name when empty): the first line, or with
    `whole` every line joined (whitespace runs collapsed), for messages whose later lines name the problem
    (torch's load_state_dict, OS errors with a path). The one error-line helper of effnet_timm."""
    text = str(err).strip() or type(err).__name__
    return ' '.join(text.split()) if whole else text.splitlines()[0].rstrip('.')
