"""Content-hash face cache: each image is detected and embedded once per face model, across runs and methods.

Entries are keyed by ``sha256(file bytes)`` plus the preprocessing variant (plain, or padded to a black
square for references) and appended to ``<cache_dir>/<face model key>.jsonl`` as soon as they are computed,
so a rerun, a resumed run or a newly added method reuses them. Embeddings round-trip exactly (float32
values stored as JSON floats).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageLoadError
from ..io import append_jsonl, read_jsonl

#: Reference images are padded to a black square this many times their longer side before detection.
REF_PAD = 1.5


def pad_to_square(image: np.ndarray, factor: float = REF_PAD) -> tuple[np.ndarray, tuple[int, int]]:
    """The image centred on a black square of side ``factor`` × its longer side; returns it and the (x, y)
    offset of the original image inside it."""
    h, w = image.shape[:2]
    side = int(round(factor * max(h, w)))
    side = max(side, h, w)
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    ox, oy = (side - w) // 2, (side - h) // 2
    canvas[oy:oy + h, ox:ox + w] = image
    return canvas, (ox, oy)


def repair_jsonl(path: Path) -> int:
    """Cut a torn last line (left by a killed run) so new rows start on a fresh line; returns bytes cut."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
    return len(data) - keep


@dataclass
class CachedFaces:
    """Faces of one image for one face model (boxes in the original image's pixels), or why there are none."""

    key: str | None
    faces: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    size: tuple[int, int] = (0, 0)

    @property
    def embeddings(self) -> np.ndarray:
        """(num_faces, D) float32 unit embeddings, largest face first."""
        if not self.faces:
            return np.zeros((0, 0), dtype=np.float32)
        return np.asarray([f["embedding"] for f in self.faces], dtype=np.float32)

    @property
    def boxes(self) -> list[list[float]]:
        """Face boxes (x1, y1, x2, y2), largest face first."""
        return [f["bbox"] for f in self.faces]


def face_model_key(analyzer: Any) -> str:
    """A file-safe key naming a face model and its settings (``dlib-1a2b3c4d``)."""
    spec = json.dumps(analyzer.backend.spec(), sort_keys=True, default=str)
    return f"{analyzer.backend_name}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def compute_faces(analyzer: Any, data: bytes, name: str, key: str, pad: float | None) -> CachedFaces:
    """Decode ``data``, optionally pad it, detect and embed its faces (boxes back in original pixels)."""
    from ..faces.image import decode_image_bytes

    try:
        if not data:
            raise ImageLoadError(name, "file is empty (0 bytes)")
        arr = decode_image_bytes(data, name)
    except ImageLoadError as exc:
        res = CachedFaces(key, error=exc.reason)
    else:
        h, w = arr.shape[:2]
        off = (0, 0)
        if pad:
            arr, off = pad_to_square(arr, pad)
        found = analyzer.detect(arr)
        faces = []
        for f in found:
            shift = np.array([off[0], off[1]], dtype=np.float32)
            faces.append({
                "bbox": [float(v) for v in (f.bbox - np.tile(shift, 2))],
                "score": float(f.score),
                "landmarks": [[float(x), float(y)] for x, y in (f.landmarks - shift)],
                "embedding": [float(v) for v in f.embedding],
            })
        res = CachedFaces(key, faces, None, (w, h))
    return res


class EmbeddingCache:
    """Faces + embeddings per image content for one :class:`~withanyone.faces.FaceAnalyzer`.

    ``stats`` counts ``hits`` / ``misses``; ``analyzer.calls`` counts the model calls actually made.
    """

    def __init__(self, analyzer: Any, cache_dir: str | Path | None = None):
        self.analyzer = analyzer
        self.key = face_model_key(analyzer)
        self.path = Path(cache_dir) / f"{self.key}.jsonl" if cache_dir is not None else None
        self.stats = {"hits": 0, "misses": 0}
        self._mem: dict[str, CachedFaces] = {}
        if self.path is not None:
            repair_jsonl(self.path)
            for rec in read_jsonl(self.path):
                self._mem[rec["key"]] = CachedFaces(rec["key"], rec["faces"], rec.get("error"),
                                                    tuple(rec.get("size", (0, 0))))

    def __len__(self) -> int:
        return len(self._mem)

    def faces(self, image: str | Path | bytes, pad: float | None = None) -> CachedFaces:
        """Faces of ``image`` (a path or encoded bytes), optionally padded to a black square first.

        A missing or unreadable file gives ``error`` set (missing files are not cached: they may appear).
        """
        name = str(image) if not isinstance(image, bytes) else f"<{len(image)} bytes>"
        if isinstance(image, bytes):
            data = image
        else:
            p = Path(image)
            if not p.is_file():
                return CachedFaces(None, error=f"{name}: no such file")
            try:
                data = p.read_bytes()
            except OSError as exc:
                return CachedFaces(None, error=f"{name}: unreadable ({exc.strerror or exc})")
        key = hashlib.sha256(data).hexdigest() + (f":pad{pad:g}" if pad else "")
        hit = self._mem.get(key)
        if hit is not None:
            self.stats["hits"] += 1
            return CachedFaces(key, hit.faces, f"{name}: {hit.error}" if hit.error else None, hit.size)
        self.stats["misses"] += 1
        res = compute_faces(self.analyzer, data, name, key, pad)
        self._store(res)
        return CachedFaces(key, res.faces, f"{name}: {res.error}" if res.error else None, res.size)

    def _store(self, res: CachedFaces) -> None:
        self._mem[res.key] = res
        if self.path is not None:
            append_jsonl(self.path, {"key": res.key, "faces": res.faces, "error": res.error, "size": list(res.size)})

    def prefetch(self, items: Iterable[tuple[str | Path, float | None]], workers: int = 2,
                 progress: bool = False) -> int:
        """Compute every ``(path, pad)`` not cached yet in ``workers`` processes (each loads the face model
        once); results are appended to the cache as they arrive. Returns the number of images computed."""
        import multiprocessing as mp

        from ..progress import track

        todo, seen = [], set()
        for path, pad in items:
            p = Path(path)
            if not p.is_file():
                continue
            key = hashlib.sha256(p.read_bytes()).hexdigest() + (f":pad{pad:g}" if pad else "")
            if key not in self._mem and key not in seen:
                seen.add(key)
                todo.append((str(p), pad, key))
        if not todo:
            return 0
        if workers <= 1:
            for path, pad, _ in track(todo, total=len(todo), description="faces", enabled=progress):
                self.faces(path, pad)
            return len(todo)
        ctx = mp.get_context("spawn")
        with ctx.Pool(min(workers, len(todo)), initializer=_worker_init, initargs=(self.analyzer.backend.spec(),)) as pool:
            for res in track(pool.imap_unordered(_worker_faces, todo), total=len(todo), description="faces",
                             enabled=progress):
                self.stats["misses"] += 1
                if res.error is None:
                    self.analyzer.calls["detect"] += 1
                    self.analyzer.calls["embed"] += len(res.faces)
                self._store(res)
        return len(todo)


_WORKER: Any = None


def _worker_init(spec: dict) -> None:
    global _WORKER
    from ..faces import FaceAnalyzer

    spec = dict(spec)
    _WORKER = FaceAnalyzer(spec.pop("backend"), **spec)


def _worker_faces(item: tuple[str, float | None, str]) -> CachedFaces:
    path, pad, key = item
    return compute_faces(_WORKER, Path(path).read_bytes(), path, key, pad)
