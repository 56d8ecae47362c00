"""Assignment: each face → nearest identity centre (faiss), kept only if similar enough and clear of the
runner-up; thresholds are per backend because embedding spaces differ."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..faces.backends.dlib_backend import SAME_PERSON_THRESHOLD as DLIB_SAME_PERSON
from ..faces.types import l2_normalize


@dataclass(frozen=True)
class Thresholds:
    """Per-backend cosine thresholds: ``assign`` (face ↔ centre), ``margin`` over the runner-up centre,
    ``member`` (bank photo ↔ its cluster), ``merge`` (two names' centres = one person)."""

    assign: float
    margin: float
    member: float
    merge: float

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return asdict(self)


#: dlib cosines are compressed: assign and member are dlib's same-person threshold (one source:
#: ``faces/backends/dlib_backend.py``). On the shared photos same person ≥ 0.929 (photo vs photo) and ≥ 0.969
#: (face vs centre), different people ≤ 0.919 (photo vs photo) and ≤ 0.915 (centre vs centre); unknown
#: faces reach at most 0.898 against a centre and the smallest true-vs-runner-up gap is 0.055, so a 0.02
#: margin rejects only genuinely ambiguous faces. ArcFace (insightface) follows the paper: assign above
#: 0.45 (0.4–0.5 in the paper), margin 0.1 (ArcFace cosines spread over [−0.2, 0.9]), members 0.45,
#: merge at 0.6.
BACKEND_THRESHOLDS: dict[str, Thresholds] = {
    "dlib": Thresholds(assign=DLIB_SAME_PERSON, margin=0.02, member=DLIB_SAME_PERSON, merge=0.95),
    "insightface": Thresholds(assign=0.45, margin=0.10, member=0.45, merge=0.60),
}


def thresholds_for(backend: str, same_person: float | None = None) -> Thresholds:
    """Thresholds for a backend name; unknown backends derive them from their same-person threshold."""
    if backend in BACKEND_THRESHOLDS:
        return BACKEND_THRESHOLDS[backend]
    if backend in ("onnx", "antelopev2", "buffalo_l") or backend.startswith("insightface"):
        return BACKEND_THRESHOLDS["insightface"]
    t = 0.5 if same_person is None else float(same_person)
    return Thresholds(assign=t, margin=0.1 * (1 - t) + 0.01, member=t, merge=t + 0.5 * (1 - t))


@dataclass
class Assignment:
    """Outcome for one face: identity id or None, best and runner-up similarity, and why it is unknown."""

    id: str | None
    score: float
    runner_up: float
    reason: str | None = None


class CenterIndex:
    """faiss inner-product index over unit-norm identity centres."""

    def __init__(self, ids: Sequence[str], centers: np.ndarray, thresholds: Thresholds):
        import faiss

        self.ids = list(ids)
        self.thresholds = thresholds
        self.dim = int(centers.shape[1]) if self.ids else 0
        self.index = faiss.IndexFlatIP(max(self.dim, 1))
        if self.ids:
            self.index.add(np.ascontiguousarray(l2_normalize(centers), dtype=np.float32))

    def search(self, emb: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, indices) of the ``k`` nearest centres per row; missing neighbours are −1."""
        emb = np.ascontiguousarray(l2_normalize(np.atleast_2d(emb)), dtype=np.float32)
        return self.index.search(emb, k)

    def assign(self, emb: np.ndarray) -> list[Assignment]:
        """Assign the faces of ONE photo: threshold + margin per face, then at most one face per identity
        (a face claiming an identity already taken by a more similar face in the photo stays unknown)."""
        emb = np.asarray(emb, dtype=np.float32)
        if emb.size == 0:
            return []
        emb = np.atleast_2d(emb)
        if not self.ids:
            return [Assignment(None, float("nan"), float("nan"), "no_identities") for _ in emb]
        if emb.shape[1] != self.dim:
            raise ValueError(f"embedding size {emb.shape[1]} does not match the centres' {self.dim}")
        sims, idx = self.search(emb, min(2, len(self.ids)))
        t = self.thresholds
        out = []
        for s, i in zip(sims, idx, strict=True):
            best = float(s[0])
            second = float(s[1]) if len(s) > 1 and i[1] >= 0 else -1.0
            if best < t.assign:
                out.append(Assignment(None, best, second, "below_threshold"))
            elif best - second < t.margin:
                out.append(Assignment(None, best, second, "ambiguous"))
            else:
                out.append(Assignment(self.ids[int(i[0])], best, second))
        taken: set[str] = set()
        for k in sorted(range(len(out)), key=lambda k: -out[k].score):
            a = out[k]
            if a.id is None:
                continue
            if a.id in taken:
                out[k] = Assignment(None, a.score, a.runner_up, "duplicate_in_photo")
            else:
                taken.add(a.id)
        return out
