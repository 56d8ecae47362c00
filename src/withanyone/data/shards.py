"""Writers for the published MultiID-2M layout: WebDataset shards (atomic, byte-reproducible), the label
schema, ``identities.json``, cluster centres and the negative pool (safetensors)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write_bytes, atomic_write_json

#: Fixed tar metadata so that a rerun writes byte-identical shards.
TAR_MTIME = 0.0
TAR_USER = "withanyone"


def write_shard(path: str | Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write samples (``__key__`` plus ``ext → bytes``) as a WebDataset tar, atomically; returns the count.

    The tar is written to a hidden temporary file in the same folder, fsynced and renamed over ``path``,
    so a reader (or a killed run) never sees a partial shard. Entries carry fixed mtime/owner.
    """
    import webdataset as wds

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, user=TAR_USER, group=TAR_USER, mode=0o444, encoder=False, mtime=TAR_MTIME) as w:
                for s in samples:
                    w.write(s)
                    n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporary shard files a killed run left behind (``.<name>.<pid>.tmp``); returns how many."""
    n = 0
    for p in Path(folder).rglob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def json_bytes(obj: Any) -> bytes:
    """Deterministic JSON encoding (sorted keys, UTF-8)."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


def npy_bytes(obj: Any) -> bytes:
    """``np.save`` bytes: a plain array, or (dict/list) a pickled object array as in the published refs."""
    buf = io.BytesIO()
    if isinstance(obj, np.ndarray):
        np.save(buf, obj, allow_pickle=False)
    else:
        np.save(buf, np.array(obj, dtype=object) if not isinstance(obj, dict) else _object_scalar(obj),
                allow_pickle=True)
    return buf.getvalue()


def _object_scalar(d: dict) -> np.ndarray:
    arr = np.empty((), dtype=object)
    arr[()] = d
    return arr


def image_label(url: str, bboxes: Sequence[Sequence[float]], names: Sequence[str | None],
                embeddings: Sequence[Sequence[float]], caption: str | None = None, ram_score: float | None = None,
                aesthetics_score: float | None = None, **extra: Any) -> dict[str, Any]:
    """A per-image label in the published schema (``url, ram_score, bboxes, aesthetics_score, caption_en,
    name, embeddings``) plus our extra keys (landmarks, detection/assignment scores…)."""
    return {"url": url, "ram_score": ram_score, "bboxes": [list(map(float, b)) for b in bboxes],
            "aesthetics_score": aesthetics_score, "caption_en": caption, "name": list(names),
            "embeddings": [list(map(float, e)) for e in embeddings], **extra}


def write_identities(path: str | Path, table: dict[str, dict]) -> None:
    """``identities.json``: identity id → search name(s) and member count."""
    atomic_write_json(path, table)


def write_cluster_centers(path: str | Path, ids: Sequence[str], centers: np.ndarray) -> int:
    """``ref/cluster_centers.tar``: one ``<id>.npy`` (float32 centre) per identity."""
    return write_shard(path, ({"__key__": i, "npy": npy_bytes(np.asarray(c, dtype=np.float32))}
                              for i, c in zip(ids, centers, strict=True)))


def write_negative_pool(path: str | Path, ids: Sequence[str], per_identity: Sequence[np.ndarray],
                        backend: str = "") -> None:
    """Negative pool for contrastive training (safetensors): ``embeddings`` (M, D) float32, ``identity``
    (M,) int64 index into the ``ids`` list, ``offsets`` (I+1,) int64; ids and backend in the ``withanyone``
    metadata entry (JSON)."""
    from safetensors.numpy import save

    mats = [np.asarray(e, dtype=np.float32).reshape(len(e), -1) for e in per_identity]
    dim = mats[0].shape[1] if mats else 0
    emb = np.concatenate(mats, 0) if mats else np.zeros((0, dim), np.float32)
    ident = np.concatenate([np.full(len(m), k, np.int64) for k, m in enumerate(mats)]) if mats else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(m) for m in mats])]).astype(np.int64)
    data = save({"embeddings": np.ascontiguousarray(emb), "identity": ident, "offsets": offsets},
                # one metadata key: safetensors orders several keys by a hash map, which breaks byte-identity
                metadata={"withanyone": json.dumps({"format": "withanyone-negatives-v1", "ids": list(ids),
                                                    "backend": backend}, sort_keys=True)})
    atomic_write_bytes(path, data)
