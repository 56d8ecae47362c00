"""Multi-person metrics beyond the paper: count accuracy, identity confusion, and CP as the release computes it.

* **count accuracy** (MultiHuman-Testbench's check): an output is correct when the number of faces detected
  in it equals the number of people asked for; the benchmark value is the fraction of correct outputs.
* **identity confusion**: each generated face is paired with one of the GT's people by the Hungarian
  algorithm on box overlap (−IoU, the GT's person boxes rescaled to the output's size; person ``k`` is
  reference ``k``); a paired face is *confused* when its nearest reference by cosine is not that person's
  reference. The value is the fraction of paired faces that are confused (faces overlapping no GT person
  are left out). Swapping two people's places gives 1.0; blending two identities into one face shows up
  as a face nearer the wrong reference.
* **CP normalisation**: the release divides each embedding by ``‖x‖ + 1e-6`` before the angles
  (``release``); ``exact`` uses unit vectors. For identical vectors the release's angle is
  ``arccos(1/(1+1e-6)²) ≈ 1.4e-3`` rad instead of 0, which moves CP by up to ~1.5e-3.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: The release's normalisation epsilon: ``x / (‖x‖ + 1e-6)``.
RELEASE_EPS = 1e-6
CP_NORMALISATIONS = ("release", "exact")


def normalise(x: np.ndarray, mode: str = "release") -> np.ndarray:
    """``x / (‖x‖ + 1e-6)`` (``release``) or ``x / ‖x‖`` (``exact``), as float64."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    n = float(np.linalg.norm(x))
    if mode == "release":
        return x / (n + RELEASE_EPS)
    if mode == "exact":
        return x / n if n > 1e-12 else x
    raise ValueError(f"CP normalisation {mode!r}: expected one of {', '.join(CP_NORMALISATIONS)}")


def count_correct(detected: int | None, asked: int) -> bool | None:
    """Whether an output shows as many faces as people asked for; None when nothing could be detected on."""
    if detected is None:
        return None
    return int(detected) == int(asked)


def count_accuracy(pairs: Sequence[tuple[int | None, int]]) -> float | None:
    """Fraction of ``(detected, asked)`` pairs that match (pairs with ``detected`` None left out)."""
    vals = [c for d, a in pairs if (c := count_correct(d, a)) is not None]
    return float(np.mean(vals)) if vals else None


def box_iou(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of ``x1, y1, x2, y2`` boxes."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def identity_confusion(out_emb: np.ndarray, out_boxes: Sequence[Sequence[float]],
                       person_boxes: Sequence[Sequence[float]], ref_emb: np.ndarray
                       ) -> tuple[float | None, list[dict[str, Any]]]:
    """Fraction of generated faces whose nearest reference is not the one of the GT person they stand in for.

    ``person_boxes[k]`` is where reference ``k``'s person is (output pixels). Returns the fraction (None when
    no face overlaps a person box) and per generated face ``{"person", "nearest", "iou", "confused"}``
    (``person`` None for a face paired with nobody).
    """
    from scipy.optimize import linear_sum_assignment

    out_emb = np.atleast_2d(np.asarray(out_emb, dtype=np.float64))
    ref_emb = np.atleast_2d(np.asarray(ref_emb, dtype=np.float64))
    n = len(out_boxes)
    faces: list[dict[str, Any]] = [{"person": None, "nearest": None, "iou": 0.0, "confused": None}
                                   for _ in range(n)]
    if n == 0 or len(person_boxes) == 0 or ref_emb.size == 0:
        return None, faces
    ou = out_emb / np.linalg.norm(out_emb, axis=1, keepdims=True)
    ru = ref_emb / np.linalg.norm(ref_emb, axis=1, keepdims=True)
    nearest = np.argmax(ou @ ru.T, axis=1)
    iou = box_iou(out_boxes, person_boxes)
    rows, cols = linear_sum_assignment(-iou)
    for i, k in zip(rows, cols, strict=True):
        faces[i]["nearest"] = int(nearest[i])
        if iou[i, k] > 0 and k < len(ref_emb):
            faces[i].update(person=int(k), iou=float(iou[i, k]), confused=bool(nearest[i] != k))
    for i in range(n):
        if faces[i]["nearest"] is None:
            faces[i]["nearest"] = int(nearest[i])
    judged = [f["confused"] for f in faces if f["confused"] is not None]
    return (float(np.mean(judged)) if judged else None), faces


def person_boxes_for(sample_boxes: Sequence[Sequence[float]] | None, gt_size: tuple[int, int] | None,
                     out_size: tuple[int, int] | None, gt_boxes: Sequence[Sequence[float]] | None = None,
                     gt_emb: np.ndarray | None = None, ref_emb: np.ndarray | None = None
                     ) -> list[list[float]] | None:
    """Where each reference's person is, in output pixels: the benchmark's boxes (``bboxes[k]`` is person
    ``k``) rescaled from the GT's size; without them the GT's detected faces, each given to the reference it
    matches by Hungarian cosine. None when neither is available."""
    if not gt_size or not out_size or min(gt_size) <= 0 or min(out_size) <= 0:
        return None
    sx, sy = out_size[0] / gt_size[0], out_size[1] / gt_size[1]

    def scale(b: Sequence[float]) -> list[float]:
        return [float(b[0]) * sx, float(b[1]) * sy, float(b[2]) * sx, float(b[3]) * sy]

    if sample_boxes and all(isinstance(b, (list, tuple)) and len(b) == 4 for b in sample_boxes):
        return [scale(b) for b in sample_boxes]
    if gt_boxes and gt_emb is not None and ref_emb is not None and len(gt_emb) and len(ref_emb):
        from ..faces.identity import hungarian_match

        pairs, _ = hungarian_match(np.asarray(ref_emb), np.asarray(gt_emb))
        by_ref = dict(pairs)
        if len(by_ref) < len(ref_emb):
            return None
        return [scale(gt_boxes[by_ref[k]]) for k in range(len(ref_emb))]
    return None
