"""The one error type the converter raises for bad input checkpoints and sources."""


class CheckpointError(Exception):
    """A checkpoint or source that cannot be used; the message is one line naming the file and the item."""
