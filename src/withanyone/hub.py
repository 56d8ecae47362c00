"""Is the Hugging Face hub usable? One quick answer per process, so offline use is the fast path.

``HF_HUB_OFFLINE=1`` (or an explicit ``offline=True``) means offline. Otherwise the hub's host is probed once
with a TCP connection that gives up after :data:`PROBE_TIMEOUT_S`; no network (no DNS, no route, refused)
counts as offline too, so a loader asks only its local cache instead of retrying downloads for a minute.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

#: Longest wait for the one connection probe.
PROBE_TIMEOUT_S = 0.8
_TRUE = ("1", "true", "yes", "on")
_reachable: bool | None = None
_lock = threading.Lock()


def env_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for offline mode."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> tuple[str, int]:
    """Host and port of the hub (``HF_ENDPOINT`` or huggingface.co)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _probe(host: str, port: int, timeout: float) -> bool:
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=connect, daemon=True)  # DNS lookups ignore socket timeouts: bound them here
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub opens (probed once per process; a proxy in the environment counts
    as reachable, since the probe cannot see through it)."""
    global _reachable
    with _lock:
        if _reachable is None:
            if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
                _reachable = True
            else:
                _reachable = _probe(*hub_endpoint(), timeout)
        return _reachable


def hub_offline(offline: bool | None = None) -> bool:
    """True when the hub must not be asked. ``offline`` True or False decides; None (auto) means offline
    when ``HF_HUB_OFFLINE`` is set or the network probe fails."""
    if offline is not None:
        return bool(offline)
    return env_offline() or not hub_reachable()


def offline_reason(offline: bool | None = None) -> str:
    """Why :func:`hub_offline` is true, in words (for messages)."""
    if offline:
        return "offline mode is on (--offline)"
    if env_offline():
        return "offline mode is on (HF_HUB_OFFLINE)"
    host, port = hub_endpoint()
    return f"the hub ({host}:{port}) is unreachable from this machine"


def _reset() -> None:
    """Forget the probe result (tests)."""
    global _reachable
    with _lock:
        _reachable = None


#: Hub repos behind a licence click-through: accept it on the repo page and log in before downloading.
GATED_REPOS = frozenset({"black-forest-labs/FLUX.1-dev", "briaai/RMBG-2.0", "black-forest-labs/FLUX.1-Kontext-dev"})
#: Files a download of the repo can leave out: FLUX.1-dev's original-format single files (diffusers reads the
#: component folders), 23.8 GB + 0.3 GB.
SKIPPABLE_FILES = {"black-forest-labs/FLUX.1-dev": ("flux1-dev.safetensors", "ae.safetensors"),
                   "black-forest-labs/FLUX.1-Kontext-dev": ("flux1-kontext-dev.safetensors", "ae.safetensors")}


def download_command(repo: str, files: tuple[str, ...] | list[str] = (), local_dir: str | None = None) -> str:
    """The ``hf download`` command line that fetches ``repo`` (or just ``files`` of it) into the hub cache."""
    parts = ["hf", "download", repo, *files]
    if not files:
        for name in SKIPPABLE_FILES.get(repo, ()):
            parts += ["--exclude", name]
    if local_dir:
        parts += ["--local-dir", str(local_dir)]
    return " ".join(parts)


def download_hint(repo: str, files: tuple[str, ...] | list[str] = (), local_dir: str | None = None) -> str:
    """How to get ``repo`` in words: the real ``hf`` commands, licence and login first for a gated repo."""
    cmd = download_command(repo, files, local_dir)
    if repo in GATED_REPOS:
        return (f"{repo} is gated: accept its licence at https://huggingface.co/{repo}, log in with "
                f"`hf auth login`, then run `{cmd}`")
    return f"download it with `{cmd}`"
