"""The ``Face`` record every backend returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Face:
    """One detected face.

    ``bbox`` is (x1, y1, x2, y2) in image pixels; ``landmarks`` are 5 points (x, y) in ArcFace order
    (image-left eye, image-right eye, nose tip, left mouth corner, right mouth corner); ``embedding`` is a
    unit-norm float32 identity vector of the backend (``None`` if not computed); ``backend`` names it.
    """

    bbox: np.ndarray
    score: float
    landmarks: np.ndarray
    embedding: np.ndarray | None = None
    backend: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bbox = np.asarray(self.bbox, dtype=np.float32).reshape(4)
        self.landmarks = np.asarray(self.landmarks, dtype=np.float32).reshape(5, 2)
        self.score = float(self.score)
        if self.embedding is not None:
            self.embedding = np.asarray(self.embedding, dtype=np.float32).reshape(-1)

    @property
    def width(self) -> float:
        """Box width in pixels."""
        return float(self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        """Box height in pixels."""
        return float(self.bbox[3] - self.bbox[1])

    @property
    def size(self) -> float:
        """Face size: the shorter side of the box, in pixels."""
        return min(self.width, self.height)

    @property
    def area(self) -> float:
        """Box area in pixels²."""
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        """Box centre (x, y) in pixels."""
        return float((self.bbox[0] + self.bbox[2]) / 2), float((self.bbox[1] + self.bbox[3]) / 2)

    def to_dict(self, with_embedding: bool = True) -> dict[str, Any]:
        """A JSON-ready dict (lists of floats)."""
        out: dict[str, Any] = {
            "bbox": [round(float(v), 2) for v in self.bbox],
            "score": round(self.score, 4),
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
            "backend": self.backend,
        }
        if with_embedding and self.embedding is not None:
            out["embedding"] = [float(v) for v in self.embedding]
        out.update({k: v for k, v in self.extra.items() if isinstance(v, (str, int, float, bool, type(None)))})
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Face:
        """Inverse of :meth:`to_dict`."""
        emb = d.get("embedding")
        return cls(
            bbox=d["bbox"], score=d.get("score", 1.0), landmarks=d["landmarks"],
            embedding=None if emb is None else np.asarray(emb, dtype=np.float32), backend=d.get("backend", ""),
        )


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Scale vectors to unit length along ``axis`` (zero vectors stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(n, eps)).astype(np.float32)
