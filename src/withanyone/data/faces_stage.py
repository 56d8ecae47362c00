"""Faces stage: read each photo, detect and embed its faces, and measure size, sharpness and pose."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write_text
from .ingest import InputItem, read_item_bytes

#: Faces within this |yaw proxy| are called frontal (nose tip within 25 % of the eye distance of the eye midpoint).
FRONTAL_YAW = 0.25


@dataclass
class FaceRecord:
    """One detected face with the measurements the filters and the label schema need."""

    bbox: list[float]
    score: float
    landmarks: list[list[float]]
    embedding: list[float]
    size: float
    sharpness: float
    yaw: float
    #: The recognizer's raw norm (insightface; 1.0 for dlib): labels store ``embedding × embedding_norm``, the raw
    #: vector the published MultiID-2M labels hold and the adapter is fed at generation.
    embedding_norm: float = 1.0

    @property
    def frontal(self) -> bool:
        """Frontal/profile proxy: nose tip close to the eye midpoint."""
        return abs(self.yaw) <= FRONTAL_YAW

    def embedding_array(self) -> np.ndarray:
        """Embedding as float32."""
        return np.asarray(self.embedding, dtype=np.float32)

    def raw_embedding(self) -> list[float]:
        """The embedding at the recognizer's raw norm (what the labels store)."""
        return [float(v) * self.embedding_norm for v in self.embedding]


@dataclass
class PhotoRecord:
    """Faces-stage result for one input photo (``error`` set when it could not be read)."""

    index: int
    item: InputItem
    size: tuple[int, int] = (0, 0)
    faces: list[FaceRecord] = field(default_factory=list)
    error: str | None = None

    @property
    def key(self) -> str:
        """WebDataset sample key (stable: the photo's position in the ingest list)."""
        return f"{self.index:08d}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"index": self.index, "item": self.item.to_dict(), "size": list(self.size), "error": self.error,
                "faces": [vars(f) for f in self.faces]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhotoRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["index"]), InputItem.from_dict(d["item"]), tuple(d["size"]),
                   [FaceRecord(**f) for f in d["faces"]], d.get("error"))


def laplacian_sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian of a grayscale image (higher = sharper)."""
    from scipy import ndimage

    return float(ndimage.laplace(np.asarray(gray, dtype=np.float32)).var())


def yaw_proxy(landmarks: np.ndarray) -> float:
    """Signed horizontal offset of the nose tip from the eye midpoint, in eye distances (0 = frontal)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    eyes_mid = (lm[0] + lm[1]) / 2
    eye_dist = max(float(np.linalg.norm(lm[1] - lm[0])), 1e-6)
    return float((lm[2, 0] - eyes_mid[0]) / eye_dist)


def analyze_photo(analyzer: Any, index: int, item: InputItem, fetch: bool = False) -> PhotoRecord:
    """Run the face stack on one input; read/decode failures become ``error`` (never raises on bad input)."""
    from ..errors import ImageLoadError
    from ..faces import align_face
    from ..faces.image import decode_image_bytes

    rec = PhotoRecord(index, item)
    try:
        data = read_item_bytes(item, fetch=fetch)
        image = decode_image_bytes(data, item.source)
    except ImageLoadError as exc:
        rec.error = exc.reason
        return rec
    except (OSError, ValueError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
        return rec
    rec.size = (int(image.shape[1]), int(image.shape[0]))
    try:
        faces = analyzer.detect(image)
    except Exception as exc:  # a backend failing on one odd image must not kill the run
        rec.error = f"face backend failed: {type(exc).__name__}: {exc}"
        return rec
    for f in faces:
        aligned = align_face(image, f.landmarks, 112).astype(np.float32)
        gray = aligned @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        rec.faces.append(FaceRecord(
            bbox=[float(v) for v in f.bbox], score=float(f.score),
            landmarks=[[float(x), float(y)] for x, y in f.landmarks],
            embedding=[float(v) for v in f.embedding], size=float(f.size),
            sharpness=laplacian_sharpness(gray), yaw=yaw_proxy(f.landmarks),
            embedding_norm=float((f.extra or {}).get("embedding_norm", 1.0))))
    return rec


def unit_path(work: Path, unit: int) -> Path:
    """Where the faces stage stores one unit's records."""
    return work / "faces" / f"unit-{unit:06d}.json"


def unit_inputs_path(work: Path, unit: int) -> Path:
    """Where the driver lists one unit's inputs (JSON ``[[index, InputItem dict], …]``) for the workers."""
    return work / "inputs" / f"unit-{unit:06d}.json"


def write_unit_inputs(work: Path, items: list[InputItem], units: list[range]) -> None:
    """Write each unit's input list once (rows sent through Ray then carry only the unit index)."""
    for u, idx in enumerate(units):
        path = unit_inputs_path(work, u)
        if not path.exists():
            atomic_write_text(path, json.dumps([[i, items[i].to_dict()] for i in idx]))


def write_unit(path: Path, records: list[PhotoRecord]) -> None:
    """Write a unit's records atomically."""
    atomic_write_text(path, json.dumps([r.to_dict() for r in records]) + "\n")


def read_unit(path: Path) -> list[PhotoRecord]:
    """Records of one unit written by :func:`write_unit`."""
    return [PhotoRecord.from_dict(d) for d in json.loads(path.read_text())]


class FaceUnitWorker:
    """Ray Data callable class: builds the face analyzer once per actor, then processes whole units.

    Each input row names a unit; the worker reads the unit's inputs (:func:`unit_inputs_path`), analyses
    its photos, writes the unit file atomically and
    returns a summary row (the driver appends it to the manifest).
    """

    def __init__(self, backend_spec: dict, work: str, fetch: bool = False):
        import os

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from ..faces import FaceAnalyzer

        spec = dict(backend_spec)
        self.analyzer = FaceAnalyzer(spec.pop("backend"), **spec)
        self.work = Path(work)
        self.fetch = fetch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import os
        import time

        out: dict[str, list] = {"unit": [], "photos": [], "faces": [], "errors": [], "t0": [], "t1": [], "pid": []}
        for unit in batch["unit"]:
            t0 = time.time()
            items = json.loads(unit_inputs_path(self.work, int(unit)).read_text())
            records = [analyze_photo(self.analyzer, int(i), InputItem.from_dict(d), self.fetch) for i, d in items]
            write_unit(unit_path(self.work, int(unit)), records)
            out["unit"].append(int(unit))
            out["photos"].append(len(records))
            out["faces"].append(sum(len(r.faces) for r in records))
            out["errors"].append(sum(r.error is not None for r in records))
            out["t0"].append(t0)
            out["t1"].append(time.time())
            out["pid"].append(os.getpid())
        return out
