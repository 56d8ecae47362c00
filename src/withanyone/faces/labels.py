"""Ground-truth labels for group photos (``labels.json``: who is where) and checking names against them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .types import Face


@dataclass
class LabelCheck:
    """One labelled person compared with the face found nearest to their labelled centre."""

    image: str
    expected: str | None
    got: str | None
    distance: float

    @property
    def ok(self) -> bool:
        """True when the predicted name equals the label (unknown faces must stay unknown)."""
        return self.expected == self.got


def load_labels(path: str | Path) -> dict[str, dict]:
    """Read ``labels.json``; keys are image paths relative to its folder."""
    data = json.loads(Path(path).read_text())
    return {k: v for k, v in data.items() if isinstance(v, dict) and "people" in v}


def check_names(image: str, size: tuple[int, int], faces: list[Face], names: list[str | None],
                label: dict) -> list[LabelCheck]:
    """Compare names given to ``faces`` with a label entry; people without a centre are skipped, and every
    detected face not matched to a labelled centre must be unknown (``expected=None``)."""
    w, h = size
    centres = np.array([f.center for f in faces]) if faces else np.zeros((0, 2))
    used: set[int] = set()
    out: list[LabelCheck] = []
    for person in label["people"]:
        if "cx" not in person:
            continue
        target = np.array([person["cx"] * w, person["cy"] * h])
        if len(centres) == 0:
            out.append(LabelCheck(image, person["id"], None, float("inf")))
            continue
        d = np.linalg.norm(centres - target, axis=1) / max(w, h)
        k = int(d.argmin())
        used.add(k)
        out.append(LabelCheck(image, person["id"], names[k], float(d[k])))
    for k, name in enumerate(names):
        if k not in used:
            out.append(LabelCheck(image, None, name, float("nan")))
    return out
