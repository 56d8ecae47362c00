"""Reader for MultiID-2M shards (published or ours) via ``webdataset``, yielding typed samples.

The published reference ``.npy`` files hold pickled dicts. They are read with a restricted unpickler that
admits only numpy arrays/dtypes/scalars, dicts, lists, tuples and plain scalars; any other global (the way a
pickle runs code) raises :class:`UnsafePickleError`.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError, UnsafePickleError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

#: The only globals a reference pickle may name: numpy's array/dtype/scalar reconstructors.
_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}
_SCALARS = (str, bytes, int, float, bool, complex, type(None), np.generic)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(("numpy.dtypes", "numpy._core", "numpy.core")) and name.endswith("DType"):
            return super().find_class(module, name)
        raise UnsafePickleError(self.source, f"it references {module}.{name} (only numpy arrays, dicts, lists "
                                             "and scalars are admitted)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(self.source, "it uses persistent ids")


def _check_tree(obj: Any, source: str, depth: int = 0) -> Any:
    if depth > 32:
        raise UnsafePickleError(source, "nesting deeper than 32 levels")
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            for v in obj.flat:
                _check_tree(v, source, depth + 1)
        return obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_tree(k, source, depth + 1)
            _check_tree(v, source, depth + 1)
        return obj
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _check_tree(v, source, depth + 1)
        return obj
    if isinstance(obj, _SCALARS):
        return obj
    raise UnsafePickleError(source, f"it holds a {type(obj).__name__}")


def load_npy_restricted(data: bytes, source: str = "<bytes>") -> Any:
    """Decode ``.npy`` bytes: a plain array as is, an object array through the restricted unpickler.

    A 0-d object array (how ``np.save`` stores a dict) is unwrapped to the dict itself. Raises
    :class:`UnsafePickleError` for a pickle that names anything but numpy arrays/dtypes/scalars, and
    :class:`DatasetError` for bytes that are not a ``.npy`` file.
    """
    fmt = np.lib.format
    buf = io.BytesIO(data)
    try:
        version = fmt.read_magic(buf)
        shape, fortran, dtype = (fmt.read_array_header_1_0(buf) if version == (1, 0)
                                 else fmt.read_array_header_2_0(buf))
    except (ValueError, EOFError) as exc:
        raise DatasetError(f"{source}: not a .npy file ({exc})") from exc
    if not dtype.hasobject:
        buf.seek(0)
        try:
            return np.load(buf, allow_pickle=False)
        except ValueError as exc:
            raise DatasetError(f"{source}: corrupt .npy array ({exc})") from exc
    try:
        obj = _RestrictedUnpickler(buf, source).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated or malformed pickle streams raise many types
        raise DatasetError(f"{source}: corrupt pickled .npy ({type(exc).__name__}: {exc})") from exc
    _check_tree(obj, source)
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        return obj[()]
    return obj


@dataclass
class MultiIDSample:
    """One training image: encoded bytes, face boxes (N, 4), identity ids per face (None = unknown),
    ArcFace-style embeddings (N, D) or None, caption and scores; ``labels`` is the raw JSON."""

    key: str
    url: str | None
    image_bytes: bytes
    image_ext: str
    bboxes: np.ndarray
    names: list[str | None]
    embeddings: np.ndarray | None
    caption: str | None
    ram_score: float | None
    aesthetics_score: float | None
    labels: dict[str, Any] = field(default_factory=dict)
    shard: str = ""

    @property
    def num_faces(self) -> int:
        """Number of labelled faces."""
        return len(self.bboxes)

    @property
    def identified(self) -> bool:
        """True when every face has an identity."""
        return bool(self.names) and all(n is not None for n in self.names)

    def image(self) -> np.ndarray:
        """Decoded RGB uint8 image."""
        from ..faces.image import decode_image_bytes

        return decode_image_bytes(self.image_bytes, f"{self.shard}#{self.key}")


@dataclass
class ReferenceSample:
    """One reference image of an identity with its embedding(s) (K, D)."""

    key: str
    identity: str | None
    image_bytes: bytes | None
    image_ext: str | None
    embeddings: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    shard: str = ""


def _urls(source: str | Path | Sequence[str | Path]) -> list[str]:
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_dir():
            urls = sorted(str(q) for q in p.glob("*.tar"))
            if not urls:
                raise DatasetError(f"{p}: folder holds no .tar shards")
            return urls
        if not p.exists() and not str(source).startswith(("http://", "https://", "pipe:")) and "{" not in str(source):
            raise DatasetError(f"{p}: no such shard")
        return [str(source)]
    urls = [str(s) for s in source]
    if not urls:
        raise DatasetError("no shards given")
    return urls


def _dataset(source: str | Path | Sequence[str | Path]):
    import webdataset as wds

    return wds.WebDataset(_urls(source), shardshuffle=False, empty_check=False)


def _names(raw: Any, n: int) -> list[str | None]:
    if raw is None:
        return [None] * n
    if isinstance(raw, (str, int)):
        raw = [raw]
    out = [None if v is None or v == "" else str(v) for v in raw]
    if len(out) != n:
        raise ValueError(f"'name' has {len(out)} entries for {n} boxes")
    return out


def parse_sample(d: dict[str, Any]) -> MultiIDSample:
    """Turn one raw webdataset dict (``__key__``, image bytes, ``json`` bytes) into a :class:`MultiIDSample`."""
    key = d.get("__key__", "")
    shard = str(d.get("__url__", ""))
    ext = next((k for k in IMAGE_KEYS if k in d), None)
    if ext is None:
        raise DatasetError(f"{shard}#{key}: sample has no image (expected one of {', '.join(IMAGE_KEYS)})")
    if "json" not in d:
        raise DatasetError(f"{shard}#{key}: sample has no .json labels")
    try:
        labels = json.loads(d["json"])
        boxes = np.asarray(labels.get("bboxes") or [], dtype=np.float32).reshape(-1, 4)
        names = _names(labels.get("name"), len(boxes))
        emb_raw = labels.get("embeddings")
        emb = None if emb_raw is None else np.asarray(emb_raw, dtype=np.float32)
        if emb is not None:
            emb = emb.reshape(len(boxes), -1) if emb.size else np.zeros((len(boxes), 0), np.float32)
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{shard}#{key}: bad labels ({exc})") from exc
    return MultiIDSample(key, labels.get("url"), bytes(d[ext]), ext, boxes, names, emb, labels.get("caption_en"),
                         labels.get("ram_score"), labels.get("aesthetics_score"), labels, shard)


def iter_samples(source: str | Path | Sequence[str | Path]) -> Iterator[MultiIDSample]:
    """Typed samples of ``train_rec``/``train_cp`` shards (a folder of tars, one tar, or a list)."""
    for d in _dataset(source):
        yield parse_sample(d)


def _ref_embeddings(obj: Any, where: str) -> tuple[np.ndarray, dict]:
    meta: dict = {}
    if isinstance(obj, dict):
        meta = {k: v for k, v in obj.items() if k not in ("embeddings", "embedding")}
        emb = obj.get("embeddings", obj.get("embedding"))
        if emb is None:
            raise DatasetError(f"{where}: reference .npy dict has neither 'embeddings' nor 'embedding'")
    else:
        emb = obj
    arr = np.asarray(emb, dtype=np.float32)
    return arr.reshape(1, -1) if arr.ndim == 1 else arr, meta


def iter_references(source: str | Path | Sequence[str | Path]) -> Iterator[ReferenceSample]:
    """Typed reference samples of ``ref/tars`` shards (image + ``.npy`` pickled dict, read restricted)."""
    for d in _dataset(source):
        key = d.get("__key__", "")
        where = f"{d.get('__url__', '')}#{key}"
        if "npy" not in d:
            raise DatasetError(f"{where}: reference sample has no .npy")
        emb, meta = _ref_embeddings(load_npy_restricted(d["npy"], where), where)
        if "json" in d:
            meta = {**json.loads(d["json"]), **meta}
        ext = next((k for k in IMAGE_KEYS if k in d), None)
        ident = meta.get("name", meta.get("id"))
        yield ReferenceSample(key, None if ident is None else str(ident), d[ext] if ext else None, ext, emb, meta,
                              str(d.get("__url__", "")))


def read_cluster_centers(path: str | Path) -> dict[str, np.ndarray]:
    """``ref/cluster_centers.tar`` → identity id → centre (float32 vector)."""
    out: dict[str, np.ndarray] = {}
    for d in _dataset(path):
        key = d["__key__"]
        obj = load_npy_restricted(d["npy"], f"{path}#{key}")
        emb, _ = _ref_embeddings(obj, f"{path}#{key}")
        out[key.rsplit("/", 1)[-1]] = emb.reshape(-1)
    return out


@dataclass
class NegativePool:
    """Reference embeddings of many identities for contrastive negatives."""

    ids: list[str]
    embeddings: np.ndarray
    identity: np.ndarray
    offsets: np.ndarray
    backend: str = ""

    def of(self, identity: str) -> np.ndarray:
        """The (K, D) embeddings of one identity."""
        k = self.ids.index(identity)
        return self.embeddings[self.offsets[k]:self.offsets[k + 1]]

    def negatives_for(self, exclude: Sequence[str]) -> np.ndarray:
        """All pooled embeddings except those of the ``exclude`` identities."""
        bad = [self.ids.index(i) for i in exclude if i in self.ids]
        return self.embeddings[~np.isin(self.identity, bad)]


def read_negative_pool(path: str | Path) -> NegativePool:
    """Load ``negatives.safetensors`` written by the builder."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: negative pool not found")
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        t = {k: f.get_tensor(k) for k in f.keys()}
    try:
        info = json.loads(meta["withanyone"])
        ids = list(info["ids"])
    except (KeyError, ValueError, TypeError) as exc:
        raise DatasetError(f"{path}: missing 'withanyone' metadata with the identity ids") from exc
    return NegativePool(ids, t["embeddings"], t["identity"], t["offsets"], info.get("backend", ""))
