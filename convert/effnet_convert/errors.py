"""The one error type the converter raises for bad input checkpoints and sources."""

from effnet_timm.errors import InputError


class CheckpointError(InputError):
    """A checkpoint, source or output that cannot be used; the message is one line naming the file and the item.

    An `InputError`, so every front end reports it as a user error (one line, exit status 2)."""
