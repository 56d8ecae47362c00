"""Reference photos as the app sees them: each upload analysed at once (face crop + warnings, never an
exception), several photos of one person merged into one identity, layout-photo faces assigned to people.

A person with several photos gets the *mean* of their unit ArcFace vectors, renormalised to unit length and
then scaled to the mean raw norm of those photos (the release feeds insightface's raw, unnormalised
embedding to the adapter's MLP, which is not scale-invariant). The SigLIP crop comes from the *most frontal*
photo (smallest nose offset from the eye midpoint, relative to the eye distance; ties within 0.05 go to
the larger face).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..faces.image import MAX_PIXELS
from ..pipeline.references import Reference, choose_face, face_arcface, raw_box, square_crop

#: Faces whose shorter box side is under this many pixels are flagged as too small to carry an identity.
MIN_FACE_PX = 64
#: Photos with a longer side above this are flagged as huge (they work, but are slow to upload and analyse).
HUGE_SIDE = 6000
#: The release was trained with 1–4 people; the app allows up to this many, flagged.
MAX_PEOPLE = 8
TRAINED_PEOPLE = 4


@dataclass
class PhotoAnalysis:
    """One uploaded photo: the face used (or None), its crop for display, and warnings for the user."""

    name: str
    face: Any = None
    crop: np.ndarray | None = None
    image: np.ndarray | None = None
    faces_found: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether this photo contributes an identity."""
        return self.face is not None and self.face.embedding is not None


def frontality(face: Any) -> float:
    """1 for a frontal face, lower as the nose moves off the eye midpoint (5-point landmarks)."""
    lm = np.asarray(face.landmarks, dtype=np.float64)
    eye_dist = float(np.linalg.norm(lm[1] - lm[0]))
    if eye_dist <= 1e-6:
        return 0.0
    offset = abs(float(lm[2, 0] - (lm[0, 0] + lm[1, 0]) / 2)) / eye_dist
    return float(max(0.0, 1.0 - offset))


def analyse_photo(source: Any, analyzer: Any, name: str | None = None, min_face: int = MIN_FACE_PX,
                  max_pixels: int = MAX_PIXELS, reference_face: str = "score") -> PhotoAnalysis:
    """Detect and embed the faces of one upload; every problem becomes a warning (no exception). The face used
    is chosen as the pipeline chooses (``reference_face``: ``"score"``, the release's, or ``"largest"``)."""
    from ..errors import WithAnyoneError
    from ..faces.image import describe_source, load_image

    label = name or (Path(source).name if isinstance(source, (str, Path)) else describe_source(source))
    res = PhotoAnalysis(label)
    try:
        image = load_image(source, max_pixels=max_pixels)
    except WithAnyoneError as exc:
        res.warnings.append(f"{label}: {getattr(exc, 'reason', exc)} — photo ignored")
        return res
    h, w = image.shape[:2]
    if max(h, w) > HUGE_SIDE:
        res.warnings.append(f"{label}: huge photo ({w}x{h}); it works, but a photo under {HUGE_SIDE} px per side "
                            "uploads and analyses faster")
    try:
        faces = analyzer.detect(image)
    except Exception as exc:  # a backend failure on one photo must not take the app down
        res.warnings.append(f"{label}: face analysis failed ({type(exc).__name__}: {exc}) — photo ignored")
        return res
    res.faces_found = len(faces)
    res.image = image
    if not faces:
        res.warnings.append(f"{label}: no face found — photo ignored; use a photo where the face is clearly visible")
        return res
    face = choose_face(faces, reference_face)
    if len(faces) > 1:
        x1, y1, x2, y2 = (int(v) for v in face.bbox)
        rule = "the largest" if reference_face == "largest" else "the highest-scoring (as the release)"
        res.warnings.append(f"{label}: {len(faces)} faces found — using {rule} one (box {x1},{y1},{x2},{y2}, "
                            "shown on the left); crop the photo to choose another")
    if face.size < min_face:
        res.warnings.append(f"{label}: the face is small ({face.size:.0f} px, under {min_face} px) — identity "
                            "will be weak; use a closer photo")
    res.face = face
    res.crop = square_crop(image, raw_box(face), size=256)
    return res


def merge_identity(photos: Sequence[PhotoAnalysis], need_crop: bool = False) -> Reference | None:
    """One person's :class:`Reference` from their usable photos: mean ArcFace direction at the mean raw norm,
    the SigLIP crop (if ``need_crop``) from the most frontal photo. ``None`` when no photo has a face."""
    good = [p for p in photos if p.ok]
    if not good:
        return None
    raw = np.stack([face_arcface(p.face) for p in good]).astype(np.float64)
    norms = np.linalg.norm(raw, axis=1)
    unit = raw / norms[:, None]
    mean = unit.mean(axis=0)
    vec = mean / np.linalg.norm(mean) * float(norms.mean())
    best = best_photo(good)
    crop = square_crop(best.image, raw_box(best.face)) if need_crop and best.image is not None else None
    return Reference(vec.astype(np.float32), crop, source=" + ".join(p.name for p in good), bbox=best.face.bbox)


def best_photo(photos: Sequence[PhotoAnalysis]) -> PhotoAnalysis:
    """The most frontal usable photo (ties within 0.05 broken by the larger face)."""
    good = [p for p in photos if p.ok]
    if not good:
        raise ValueError("no photo with a face")
    return max(good, key=lambda p: (round(frontality(p.face) / 0.05), p.face.size))


@dataclass
class LayoutAssignment:
    """Boxes from a layout photo in output pixels, one per person (reference order), and how they were chosen."""

    boxes: list[tuple[float, float, float, float]]
    method: str  # "identity" or "left-to-right"
    similarities: list[float | None]
    faces: list[Any]
    image: np.ndarray


def assign_layout(layout: Any, people: Sequence[Reference | None], height: int, width: int, analyzer: Any,
                  threshold: float | None = None) -> LayoutAssignment:
    """Face boxes of a layout photo for ``people``: matched by identity (Hungarian on cosine similarity) when
    every person's best match clears the analyzer's same-person ``threshold``, else the largest faces left to
    right. Boxes map to ``width × height`` keeping their aspect (the layout photo letterboxed, as
    :func:`withanyone.pipeline.layout.layout_box`). Raises ``FaceCountError`` when there are too few faces."""
    from scipy.optimize import linear_sum_assignment

    from ..errors import FaceCountError
    from ..faces.image import describe_source, load_image

    image = load_image(layout)
    n = len(people)
    faces = analyzer.detect(image)
    if len(faces) < n:
        raise FaceCountError(f"layout photo {describe_source(layout)} shows {len(faces)} face(s) for {n} "
                             "people; use a photo with at least one face per person, or draw the boxes")
    thr = float(threshold if threshold is not None else getattr(analyzer, "threshold", 0.3))
    chosen: list[Any] | None = None
    sims: list[float | None] = [None] * n
    if all(p is not None for p in people) and all(f.embedding is not None for f in faces):
        refs = np.stack([p.arcface / np.linalg.norm(p.arcface) for p in people])
        embs = np.stack([f.embedding / np.linalg.norm(f.embedding) for f in faces])
        cos = refs @ embs.T  # [people, faces]
        rows, cols = linear_sum_assignment(-cos)
        if all(cos[r, c] >= thr for r, c in zip(rows, cols, strict=True)):
            chosen = [faces[c] for c in cols]
            sims = [float(cos[r, c]) for r, c in zip(rows, cols, strict=True)]
    method = "identity"
    if chosen is None:
        method = "left-to-right"
        chosen = sorted(sorted(faces, key=lambda f: -f.area)[:n], key=lambda f: f.center[0])
    from ..pipeline.layout import layout_box

    h0, w0 = image.shape[:2]
    boxes = [layout_box(f.bbox, (w0, h0), height, width) for f in chosen]
    return LayoutAssignment(boxes, method, sims, chosen, image)
