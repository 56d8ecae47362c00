"""Shared io: atomic writes honour the umask, content fingerprints; the hub offline probe answers fast."""

from __future__ import annotations

import os
import stat
import time

import pytest

from withanyone import hub
from withanyone.io import FileDigests, atomic_write_bytes, atomic_write_json, sha256_file


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_honour_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_json(tmp_path / "report.json", {"a": 1})
        with open(tmp_path / "plain.txt", "w") as f:  # what every other writer gives
            f.write("x")
    finally:
        os.umask(old)
    got = stat.S_IMODE((tmp_path / "report.json").stat().st_mode)
    assert got == 0o666 & ~mask == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)


def test_file_digests_fast_path_and_confirming_hash(tmp_path):
    photo = tmp_path / "obama.jpg"
    photo.write_bytes(b"first photo")
    memo = tmp_path / "digests.json"
    d = FileDigests(memo)
    first = d.digest(photo)
    assert first == sha256_file(photo) and d.stats == {"fast": 0, "hashed": 1, "missing": 0}
    d.save()
    d = FileDigests(memo)  # a new run: unchanged file answered from the memo without reading it
    assert d.digest(photo) == first and d.stats["fast"] == 1
    later = time.time() + 10
    os.utime(photo, (later, later))  # touched, same bytes: hashed again, same fingerprint
    assert d.digest(photo) == first and d.stats["hashed"] == 1
    atomic_write_bytes(photo, b"other photo")  # replaced under the same name, same size
    assert d.digest(photo) != first and d.digest(tmp_path / "gone.jpg") is None


def test_hub_offline_honours_env_and_probes_once_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_offline() and hub.hub_offline(None)
    assert not hub.hub_offline(False) and hub.hub_offline(True)
    assert "HF_HUB_OFFLINE" in hub.offline_reason()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    hub._reset()
    try:
        t0 = time.perf_counter()
        assert hub.hub_offline() is True
        assert hub.hub_offline() is True  # answered from the one probe
        assert time.perf_counter() - t0 < 1.0
        assert hub.offline_reason() == "the hub (127.0.0.1:9) is unreachable from this machine"
    finally:
        hub._reset()


def test_pipeline_loader_fails_fast_without_network(monkeypatch, tmp_path):
    """``generate``'s loader asks only the local cache once the probe finds no hub (it retried for ~23 s)."""
    import huggingface_hub.constants

    from withanyone.errors import ModelNotFoundError
    from withanyone.pipeline.loading import check_base

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub._reset()
    try:
        t0 = time.perf_counter()
        with pytest.raises(ModelNotFoundError, match=r"model_index\.json of hub repo black-forest-labs/FLUX\.1-dev "
                                                     r"is not in the local cache and the hub \(127\.0\.0\.1:9\) is "
                                                     r"unreachable from this machine"):
            check_base("black-forest-labs/FLUX.1-dev")
        assert time.perf_counter() - t0 < 1.0
    finally:
        hub._reset()


def test_safetensors_checkpoints_honour_the_umask(tmp_path):
    torch = pytest.importorskip("torch")
    from withanyone.model.checkpoint import save_state_dict

    old = os.umask(0o022)
    try:
        p = save_state_dict({"w": torch.zeros(2)}, tmp_path / "adapter.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
