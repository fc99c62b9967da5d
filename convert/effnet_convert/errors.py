"""The error types the converter raises for bad input checkpoints and sources, and for outputs it cannot write.

Defined in effnet_timm.errors (the runtime tells them apart without importing the converter); named here too.
"""

from effnet_timm.errors import CheckpointError, OutputError

__all__ = ['CheckpointError', 'OutputError']
