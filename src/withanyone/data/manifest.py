"""Units of work and the append-only manifest of completed ones (what makes a build resumable)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import append_jsonl, atomic_write_json, read_jsonl
from .errors import ConfigMismatchError


def make_units(n_items: int, unit_size: int) -> list[range]:
    """Split item indices ``0..n_items`` into consecutive units of ``unit_size`` (the last may be shorter)."""
    if unit_size < 1:
        raise ValueError(f"unit_size must be ≥ 1, got {unit_size}")
    return [range(s, min(s + unit_size, n_items)) for s in range(0, n_items, unit_size)]


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object (settings, identity tables…)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class UnitManifest:
    """Completed units of one stage, as JSONL lines ``{"unit": i, "key": fingerprint, ...}``.

    A unit counts as done only if its line carries the current ``key`` (the stage's input fingerprint), so a
    changed upstream result silently re-does the stage instead of mixing old and new outputs.
    """

    def __init__(self, path: str | Path, key: str = ""):
        self.path = Path(path)
        self.key = key

    def done(self) -> set[int]:
        """Indices of units completed under the current key (a torn last line is ignored)."""
        return {int(r["unit"]) for r in read_jsonl(self.path) if r.get("key", "") == self.key and "unit" in r}

    def records(self) -> dict[int, dict]:
        """Last record per completed unit under the current key."""
        return {int(r["unit"]): r for r in read_jsonl(self.path) if r.get("key", "") == self.key and "unit" in r}

    def mark(self, unit: int, **info: Any) -> None:
        """Record ``unit`` as completed (fsynced append)."""
        append_jsonl(self.path, {"unit": int(unit), "key": self.key, **info})


def check_settings(work: Path, settings: dict, inputs: Sequence[dict], overwrite: bool = False) -> str:
    """Store (first run) or compare (rerun) the build settings and input list; returns their fingerprint.

    Raises :class:`ConfigMismatchError` when ``work`` holds a build of other inputs or settings, unless
    ``overwrite`` (then the old work is cleared by the caller).
    """
    fp = fingerprint({"settings": settings, "inputs": list(inputs)})
    path = work / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != fp and not overwrite:
            changed = sorted(k for k in set(old.get("settings", {})) | set(settings)
                             if old.get("settings", {}).get(k) != settings.get(k))
            what = f"settings differ ({', '.join(changed)})" if changed else "the input photos differ"
            raise ConfigMismatchError(f"{work.parent} holds a build with other inputs or settings: {what}; "
                                      "use another --out or pass --overwrite")
    atomic_write_json(path, {"fingerprint": fp, "settings": settings, "n_inputs": len(inputs)})
    return fp
