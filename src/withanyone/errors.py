"""Typed errors shared by the whole project; each names the file or argument at fault."""

from __future__ import annotations


class WithAnyoneError(Exception):
    """Base class of every error this package raises on purpose."""


class ImageLoadError(WithAnyoneError, ValueError):
    """An image could not be read; ``source`` names the file (or the in-memory object) and ``reason`` why."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot read image {source}: {reason}")


class ModelNotFoundError(WithAnyoneError, FileNotFoundError):
    """Model weights are missing; the message says where we looked and how to get them."""


class FaceCountError(WithAnyoneError, ValueError):
    """An image holds a number of faces other than the one required."""
