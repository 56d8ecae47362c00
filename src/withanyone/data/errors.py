"""Typed errors of the dataset builder and reader; each names the file at fault."""

from __future__ import annotations

from ..errors import WithAnyoneError


class DatasetError(WithAnyoneError, ValueError):
    """A dataset build or read failed; the message names the file or argument and the problem."""


class InputError(DatasetError):
    """An ``--input`` is missing, empty or of an unknown kind; ``source`` names it."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"input {source}: {reason}")


class UnsafePickleError(DatasetError):
    """A pickled ``.npy`` asked for something other than numpy arrays, dicts, lists and scalars."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"refusing to unpickle {source}: {reason}")


class ConfigMismatchError(DatasetError):
    """``--out`` holds a build made with other settings; resuming it would mix two datasets."""
