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


def one_line(text: str) -> str:
    """A multi-line message (a head, ``- item`` lines, more text) as one line, the items joined by '; '."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    items = [ln[2:] for ln in lines if ln.startswith("- ")]
    rest = [ln for ln in lines if not ln.startswith("- ")]
    head = rest[0] if rest else ""
    return " ".join(filter(None, [head, "; ".join(items) + "." if items else "", *rest[1:]]))
