"""Atomic file writes, append-only JSONL and content fingerprints of input files, shared by every long job."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename.

    The file gets the permissions any other writer would give it (0666 less the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and fsync, so a crash leaves at most one partial last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Records of a JSONL file, skipping a torn (partial) last line left by a crash."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class FileDigests:
    """Content fingerprints (sha256) of input files, remembered between runs in a JSON file.

    Fast path: a file whose size, mtime, ctime and inode are those recorded keeps its recorded hash.
    Anything else (a photo replaced under the same name, a regenerated output) is hashed again to confirm,
    so a touched but identical file keeps its fingerprint and a changed one gets a new one.
    ``stats`` counts ``fast`` (stat matched), ``hashed`` (read) and ``missing`` files.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.stats = {"fast": 0, "hashed": 0, "missing": 0}
        self._memo: dict[str, list] = {}
        self._dirty = False
        if self.path is not None and self.path.is_file():
            try:
                memo = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                memo = {}  # a damaged memo only costs a re-hash
            if isinstance(memo, dict):
                self._memo = {k: v for k, v in memo.items() if isinstance(v, list) and len(v) == 5}

    def digest(self, path: str | os.PathLike) -> str | None:
        """sha256 of the file's content, or None when it does not exist (or cannot be read)."""
        key = os.path.abspath(os.fspath(path))
        try:
            st = os.stat(key)
        except OSError:
            self.stats["missing"] += 1
            return None
        if not os.path.isfile(key):
            self.stats["missing"] += 1
            return None
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        old = self._memo.get(key)
        if old is not None and old[:4] == stamp:
            self.stats["fast"] += 1
            return str(old[4])
        try:
            digest = sha256_file(key)
        except OSError:
            self.stats["missing"] += 1
            return None
        self.stats["hashed"] += 1
        self._memo[key] = [*stamp, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        """Write the memo (atomically) when it changed."""
        if self.path is not None and self._dirty:
            atomic_write_json(self.path, self._memo)
            self._dirty = False
