"""Where model files come from: a local folder or a hub repo (``_Source``), offline detection, the dtype keyword.

Shared by :mod:`withanyone.pipeline.loading` and :mod:`withanyone.pipeline.memory` (one place, no import cycle).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError


def _offline(local_files_only: bool | None) -> bool:
    """Ask only the local cache: when told to, when ``HF_HUB_OFFLINE`` is set, or when the hub is unreachable
    (one quick probe per process, :mod:`withanyone.hub`) — instead of retrying downloads for half a minute."""
    from ..hub import hub_offline

    return hub_offline(True if local_files_only else None)


class _Source:
    """A local folder or a hub repo, answering 'give me this file' or saying exactly what is missing."""

    def __init__(self, ref: str | os.PathLike, revision: str | None, local_files_only: bool | None, role: str):
        self.ref, self.revision, self.role = str(ref), revision, role
        text = str(ref)
        self.local = (Path(text).expanduser().exists() or text.startswith((".", "/", "~"))
                      or text.count("/") != 1 or os.sep == "\\" and "\\" in text)
        self._told_offline = bool(local_files_only)
        self.offline = not self.local and _offline(local_files_only)
        self.commit: str | None = None

    def file(self, name: str) -> Path:
        """Local path of ``name`` inside this source, downloading it when allowed."""
        if self.local:
            path = Path(self.ref).expanduser() / name
            if not path.is_file():
                raise ModelNotFoundError(f"{self.role}: {path} is missing (local folder {self.ref})")
            return path
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            got = Path(hf_hub_download(self.ref, name, revision=self.revision, local_files_only=self.offline))
        except LocalEntryNotFoundError as exc:  # (a subclass of EntryNotFoundError: test it first)
            from ..hub import download_hint, offline_reason

            why = offline_reason(True if self.offline and self._told_offline else None) if self.offline \
                else "the hub could not be reached"
            raise ModelNotFoundError(
                f"{self.role}: file {name} of hub repo {self.ref} is not in the local cache and {why} "
                f"(and there is no local folder named {self.ref}); "
                f"{download_hint(self.ref, (name,) if self.role == 'adapter' else ())}, or pass a local folder"
            ) from exc
        except EntryNotFoundError as exc:
            raise ModelNotFoundError(f"{self.role}: file {name} does not exist in hub repo {self.ref}") from exc
        except RepositoryNotFoundError as exc:
            raise ModelNotFoundError(f"{self.role}: hub repo {self.ref} does not exist or is private") from exc
        if "snapshots" in got.parts:
            self.commit = got.parts[got.parts.index("snapshots") + 1]
        return got

    def has(self, name: str) -> bool:
        """Whether ``name`` is available (without raising)."""
        try:
            self.file(name)
            return True
        except ModelNotFoundError:
            return False

    def describe(self) -> dict[str, Any]:
        """Where this came from, for sidecars: the path or the repo id and its commit."""
        if self.local:
            return {"path": str(Path(self.ref).expanduser().resolve())}
        return {"repo": self.ref, "revision": self.revision, "commit": self.commit}


def _dtype_kwarg(torch_dtype: Any) -> dict[str, Any]:
    """``dtype=`` for diffusers ≥ 0.36 (``torch_dtype`` is deprecated there), ``torch_dtype=`` before."""
    if torch_dtype is None:
        return {}
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.36") else "torch_dtype": torch_dtype}
