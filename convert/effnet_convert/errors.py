"""The one error type the converter raises for bad input checkpoints and sources."""

from effnet_timm.errors import InputError


class CheckpointError(InputError):
    """A checkpoint, source or output that cannot be used; the message is one line naming the file and the item.

    An `InputError`, so every front end reports it as a user error (one line, exit status 2)."""


class OutputError(CheckpointError):
    """The output could not be written (a full disk, a file-size limit, permissions): the input is not at fault,
    so a caller may keep it and try again (the weights cache keeps a verified tarball for the next attempt)."""
