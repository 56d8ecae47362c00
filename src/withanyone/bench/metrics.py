"""MultiID-Bench metrics: identity similarity, copy-paste, robust aggregation (functional core + metric objects).

The functional core follows the paper (arXiv 2510.14975, §MultiID-Bench):

* faces of two images are paired by the Hungarian algorithm on −cosine (:func:`match_faces`);
* Sim(GT) / Sim(Ref) are the mean cosines of the matched pairs;
* CP of one face triple is ``(θ(g,t) − θ(g,r)) / θ(t,r)`` with ``θ = arccos(clip(cos))`` of unit vectors,
  0 when ``θ(t,r) < 1e-6`` (:func:`copy_paste_score`);
* means drop values outside ``[Q1 − 1.5·IQR, Q3 + 1.5·IQR]`` first, or report the median when that would
  drop more than half (:func:`robust_mean`).

The metric objects (``SimGT``, ``SimRef``, ``CopyPaste``) keep per-sample values as state, ``update()`` takes
one sample, ``compute()`` returns a :class:`MetricValue` (mean, robust mean, 95 % bootstrap interval, n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..faces.identity import cosine_matrix, hungarian_match

#: Smallest θ(t, r) (radians) for which CP is defined; below it CP is 0 (GT and reference coincide).
CP_EPS = 1e-6
#: The paper's CP gate on Sim(GT) (ArcFace / insightface buffalo_l cosines): one person, several people.
PAPER_CP_GATE = (0.40, 0.35)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    n = np.linalg.norm(x)
    return x / n if n > 1e-12 else x


def angle(a: np.ndarray, b: np.ndarray, normalisation: str = "exact") -> float:
    """Angle θ (radians) between two embeddings: ``arccos`` of their cosine clipped to [−1, 1]; with
    ``normalisation="release"`` each vector is divided by ``‖x‖ + 1e-6`` first, as the release's evaluator does."""
    if normalisation != "exact":
        from .multi_metrics import normalise

        return float(np.arccos(np.clip(np.dot(normalise(a, normalisation), normalise(b, normalisation)), -1.0, 1.0)))
    return float(np.arccos(np.clip(np.dot(_unit(a), _unit(b)), -1.0, 1.0)))


def match_faces(a: np.ndarray, b: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Pair the faces (embedding rows) of ``a`` with those of ``b`` by the Hungarian algorithm on −cosine.

    Returns ``min(len(a), len(b))`` pairs ``(i, j)`` sorted by ``i`` and the matched cosine similarities.
    """
    return hungarian_match(np.asarray(a), np.asarray(b))


def copy_paste_score(g: np.ndarray, t: np.ndarray, r: np.ndarray, eps: float = CP_EPS,
                     normalisation: str = "exact") -> float:
    """The paper's copy-paste score of one face: ``(θ(g,t) − θ(g,r)) / θ(t,r)``; 0 when ``θ(t,r) < eps``.

    ``g`` generated face, ``t`` ground-truth face, ``r`` reference face (embeddings of one face model).
    −1: the output is the GT identity; +1: the output copies the reference. ``normalisation`` ``"release"``
    reproduces the release's evaluator (vectors divided by ``‖x‖ + 1e-6``; see ``multi_metrics``).
    """
    theta_tr = angle(t, r, normalisation)
    if theta_tr < eps:
        return 0.0
    return (angle(g, t, normalisation) - angle(g, r, normalisation)) / theta_tr


def robust_mean(values: Sequence[float] | np.ndarray) -> float:
    """Mean after dropping values outside ``[Q1 − 1.5·IQR, Q3 + 1.5·IQR]``; the median when that would drop
    more than half of them. NaNs are ignored; ``nan`` for no values."""
    v = np.asarray([x for x in np.asarray(values, dtype=np.float64).reshape(-1) if np.isfinite(x)])
    if v.size == 0:
        return float("nan")
    q1, q3 = np.percentile(v, [25, 75])
    iqr = q3 - q1
    kept = v[(v >= q1 - 1.5 * iqr) & (v <= q3 + 1.5 * iqr)]
    if v.size - kept.size > v.size / 2:
        return float(np.median(v))
    return float(kept.mean())


def bootstrap_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; ``(nan, nan)`` for no values, ``(x, x)`` for one."""
    v = np.asarray([x for x in np.asarray(values, dtype=np.float64).reshape(-1) if np.isfinite(x)])
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return float(lo), float(hi)


@dataclass
class MetricValue:
    """An aggregated metric: plain mean, robust mean, 95 % bootstrap interval of the mean, and count."""

    mean: float
    robust_mean: float
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN → None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def aggregate(values: Sequence[float] | np.ndarray, seed: int = 0) -> MetricValue:
    """Mean, :func:`robust_mean` and :func:`bootstrap_ci` of the finite ``values``."""
    v = np.asarray([x for x in np.asarray(values, dtype=np.float64).reshape(-1) if np.isfinite(x)])
    if v.size == 0:
        nan = float("nan")
        return MetricValue(nan, nan, nan, nan, 0)
    lo, hi = bootstrap_ci(v, seed=seed)
    return MetricValue(float(v.mean()), robust_mean(v), lo, hi, int(v.size))


# ----------------------------------------------------------------------------------------------- per sample


@dataclass
class FaceScores:
    """Identity scores of one generated image against its GT and references, for one face model.

    ``sim_gt``/``sim_ref``: mean matched cosine (None when that side has no face); ``*_unmatched``: mean cosine
    of the pairs the matching did *not* choose (identity blending; None with fewer than two faces a side);
    ``cp``: mean CP over faces matched on both sides; ``cp_faces``: CP per generated face (None if unpaired).
    """

    sim_gt: float | None
    sim_ref: float | None
    sim_gt_unmatched: float | None
    sim_ref_unmatched: float | None
    cp: float | None
    cp_faces: list[float | None]
    gt_pairs: list[tuple[int, int]]
    ref_pairs: list[tuple[int, int]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _unmatched_mean(sim: np.ndarray, pairs: list[tuple[int, int]]) -> float | None:
    if sim.shape[0] < 2 or sim.shape[1] < 2:
        return None
    mask = np.ones(sim.shape, dtype=bool)
    for i, j in pairs:
        mask[i, j] = False
    return float(sim[mask].mean()) if mask.any() else None


def score_faces(out: np.ndarray, gt: np.ndarray | None, refs: np.ndarray | None,
                cp_normalisation: str = "exact") -> FaceScores:
    """Score generated-face embeddings ``out`` (N, D) against GT faces (M, D) and reference faces (R, D).

    Pairings as in the paper: generated↔GT and generated↔reference each by Hungarian matching on −cosine;
    CP of generated face i uses its matched GT face and its matched reference face.
    """
    out = np.atleast_2d(np.asarray(out, dtype=np.float64))
    has_gt = gt is not None and len(gt) > 0
    has_ref = refs is not None and len(refs) > 0
    gt_pairs: list[tuple[int, int]] = []
    ref_pairs: list[tuple[int, int]] = []
    sim_gt = sim_ref = gt_un = ref_un = None
    if has_gt:
        gt = np.atleast_2d(np.asarray(gt, dtype=np.float64))
        gt_pairs, s = match_faces(out, gt)
        sim_gt = float(np.mean(s))
        gt_un = _unmatched_mean(cosine_matrix(out, gt), gt_pairs)
    if has_ref:
        refs = np.atleast_2d(np.asarray(refs, dtype=np.float64))
        ref_pairs, s = match_faces(out, refs)
        sim_ref = float(np.mean(s))
        ref_un = _unmatched_mean(cosine_matrix(out, refs), ref_pairs)
    cp_faces: list[float | None] = [None] * len(out)
    if has_gt and has_ref:
        g2t, g2r = dict(gt_pairs), dict(ref_pairs)
        for i in range(len(out)):
            if i in g2t and i in g2r:
                cp_faces[i] = copy_paste_score(out[i], gt[g2t[i]], refs[g2r[i]], normalisation=cp_normalisation)
    vals = [c for c in cp_faces if c is not None]
    cp = float(np.mean(vals)) if vals else None
    return FaceScores(sim_gt, sim_ref, gt_un, ref_un, cp, cp_faces, gt_pairs, ref_pairs)


def cp_gate_passes(sim_gt: float | None, num_persons: int, gate: tuple[float, float] = PAPER_CP_GATE) -> bool:
    """The paper's CP gate: Sim(GT) above ``gate[0]`` for one person, above ``gate[1]`` for several."""
    if sim_gt is None:
        return False
    return sim_gt > (gate[0] if num_persons <= 1 else gate[1])


# ----------------------------------------------------------------------------------------- metric objects


class Metric:
    """A metric accumulating one value per sample; ``compute()`` aggregates them (torchmetrics style)."""

    name: str = "metric"
    higher_is_better: bool | None = True
    is_differentiable: bool = False

    def __init__(self) -> None:
        self.values: list[float] = []

    def _append(self, value: float | None) -> float | None:
        if value is not None and math.isfinite(value):
            self.values.append(float(value))
        return value

    def merge(self, other: Metric) -> Metric:
        """Add another instance's state (e.g. from another worker) to this one."""
        self.values.extend(other.values)
        return self

    def reset(self) -> None:
        """Drop the accumulated state."""
        self.values.clear()

    def compute(self) -> MetricValue:
        """Mean, robust mean, bootstrap interval and count of the accumulated values."""
        return aggregate(self.values)


class SimGT(Metric):
    """Sim(GT): mean Hungarian-matched cosine between generated and ground-truth faces, per sample."""

    name = "sim_gt"

    def update(self, out: np.ndarray, gt: np.ndarray) -> float | None:
        """Add one sample; returns its value."""
        return self._append(score_faces(out, gt, None).sim_gt)


class SimRef(Metric):
    """Sim(Ref): mean Hungarian-matched cosine between generated and reference faces, per sample."""

    name = "sim_ref"
    higher_is_better = None  # high Sim(Ref) with low Sim(GT) is copy-paste, not fidelity

    def update(self, out: np.ndarray, refs: np.ndarray) -> float | None:
        """Add one sample; returns its value."""
        return self._append(score_faces(out, None, refs).sim_ref)


class CopyPaste(Metric):
    """CP: per sample the mean copy-paste score of its faces; with ``gate`` only samples whose Sim(GT)
    passes :func:`cp_gate_passes` count (the paper's reporting rule)."""

    name = "cp"
    higher_is_better = False

    def __init__(self, gate: tuple[float, float] | None = PAPER_CP_GATE) -> None:
        super().__init__()
        self.gate = gate
        self.gated_out = 0

    def update(self, out: np.ndarray, gt: np.ndarray, refs: np.ndarray, num_persons: int | None = None) -> float | None:
        """Add one sample; returns its CP (None when it has no CP or the gate drops it)."""
        s = score_faces(out, gt, refs)
        if s.cp is None:
            return None
        if self.gate is not None and not cp_gate_passes(s.sim_gt, num_persons or len(np.atleast_2d(refs)), self.gate):
            self.gated_out += 1
            return None
        return self._append(s.cp)
