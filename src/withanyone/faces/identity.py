"""Identity helpers: cosine similarities, Hungarian pairing, and naming faces against a gallery."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linear_sum_assignment

from .types import Face, l2_normalize

if TYPE_CHECKING:
    from .analyzer import FaceAnalyzer

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities between rows of ``a`` (N, D) and ``b`` (M, D) → (N, M) float64."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.size == 0 or b.size == 0:
        return np.zeros((a.shape[0] if a.size else 0, b.shape[0] if b.size else 0))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]}")
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.clip(an @ bn.T, -1.0, 1.0)


def hungarian_match(a: np.ndarray, b: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Pair rows of ``a`` with rows of ``b`` maximising total cosine similarity (Hungarian algorithm).

    Returns ``min(N, M)`` index pairs ``(i, j)`` sorted by ``i`` and their similarities.
    """
    sim = cosine_matrix(a, b)
    if sim.size == 0:
        return [], np.zeros(0)
    rows, cols = linear_sum_assignment(-sim)
    order = np.argsort(rows)
    rows, cols = rows[order], cols[order]
    return [(int(i), int(j)) for i, j in zip(rows, cols, strict=True)], sim[rows, cols]


@dataclass
class Identity:
    """A named person: the unit-norm embeddings of their photos and the files they came from."""

    name: str
    embeddings: np.ndarray
    sources: list[str] = field(default_factory=list)

    @property
    def center(self) -> np.ndarray:
        """Unit-norm mean embedding."""
        return l2_normalize(self.embeddings.mean(0))


@dataclass
class Gallery:
    """Known people to name faces against; a person's score is their best-matching photo."""

    identities: list[Identity]
    threshold: float
    backend: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """Person names, in gallery order."""
        return [p.name for p in self.identities]

    @classmethod
    def from_folder(cls, folder: str | Path, analyzer: FaceAnalyzer, workers: int = 1,
                    progress: bool = False) -> Gallery:
        """Build from ``folder/<person>/<photo>``; each photo with exactly one face enrols that face.

        Photos with several faces (e.g. a ``group/`` folder: which face is the person?), no face, or that cannot
        be read are not enrolled; they are listed in ``skipped`` with the reason, and people left without any
        enrolled photo in ``dropped``. Both are logged as a warning.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(f"gallery folder not found: {folder}")
        paths: list[Path] = []
        owners: list[str] = []
        for person in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for img in sorted(person.iterdir()):
                if img.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(img)
                    owners.append(person.name)
        if not paths:
            raise ValueError(f"gallery {folder}: no <person>/<photo> image files "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))}) found")
        results = analyzer.analyze_many(paths, workers=workers, progress=progress, description="gallery")
        per: dict[str, list[tuple[np.ndarray, str]]] = {}
        skipped: list[tuple[str, str]] = []
        for owner, res in zip(owners, results, strict=True):
            if res.error:
                skipped.append((res.source, res.error))
            elif not res.faces:
                skipped.append((res.source, "no face found"))
            elif len(res.faces) > 1:
                skipped.append((res.source, f"{len(res.faces)} faces: cannot tell which one is {owner!r}"))
            else:
                per.setdefault(owner, []).append((res.faces[0].embedding, res.source))
        ids = [Identity(n, np.stack([e for e, _ in v]), [s for _, s in v]) for n, v in per.items()]
        dropped = sorted(set(owners) - set(per))
        if not ids:
            reasons = "; ".join(f"{Path(s).name}: {r}" for s, r in skipped[:3])
            raise ValueError(f"gallery {folder}: none of its {len(paths)} photos holds exactly one readable face "
                             f"({reasons}{'; …' if len(skipped) > 3 else ''})")
        if skipped:
            logger.warning("gallery %s: %d photo(s) not enrolled%s", folder, len(skipped),
                           f"; people without any enrolled photo: {', '.join(dropped)}" if dropped else "")
        return cls(ids, analyzer.threshold, analyzer.backend_name, skipped, dropped)

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """(num_faces, num_people) similarity: per person, the best match over their photos."""
        emb = np.atleast_2d(embeddings)
        return np.stack([cosine_matrix(emb, p.embeddings).max(1) for p in self.identities], axis=1)

    def name_faces(self, faces: Sequence[Face] | np.ndarray) -> list[tuple[str | None, float]]:
        """Name each face (or embedding row): a one-to-one Hungarian assignment of faces to people,
        kept where the similarity reaches the threshold; ``(None, best score)`` otherwise."""
        if len(faces) == 0:
            return []
        emb = np.stack([f.embedding for f in faces]) if isinstance(faces[0], Face) else np.asarray(faces)
        s = self.scores(emb)
        out: list[tuple[str | None, float]] = [(None, float(row.max())) for row in s]
        rows, cols = linear_sum_assignment(-s)
        for i, j in zip(rows, cols, strict=True):
            if s[i, j] >= self.threshold:
                out[i] = (self.identities[j].name, float(s[i, j]))
        return out
