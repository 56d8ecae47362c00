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


@dataclass
class LabelledFace:
    """One face of a labelled photo folder: who it is (``None``: nobody in the folder), its photo and embedding."""

    identity: str | None
    image: str
    embedding: np.ndarray


def find_labels(folder: str | Path) -> Path | None:
    """The ``labels.json`` of a photo folder: ``<folder>/labels.json`` (keys ``group/<n>.jpg``) or
    ``<folder>/group/labels.json`` (keys ``<n>.jpg`` or ``group/<n>.jpg``); ``None`` when there is none."""
    folder = Path(folder)
    for path in (folder / "labels.json", folder / "group" / "labels.json"):
        if path.is_file():
            return path
    return None


def load_folder_labels(folder: str | Path) -> dict[str, dict]:
    """Labels of a photo folder (either layout of :func:`find_labels`), keyed by path relative to ``folder``;
    ``{}`` when it has none."""
    folder = Path(folder)
    path = find_labels(folder)
    if path is None:
        return {}
    labels = load_labels(path)
    if path.parent == folder:
        return labels
    base = path.parent.relative_to(folder).as_posix()
    return {k if k.startswith(base + "/") else f"{base}/{k}": v for k, v in labels.items()}


def single_person_photos(folder: str | Path) -> dict[str, list[Path]]:
    """``{person: [photos]}`` of a ``<person>/<n>.<ext>`` folder (every folder but ``group``), sorted."""
    from .identity import IMAGE_SUFFIXES

    folder = Path(folder)
    return {p.name: sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            for p in sorted(folder.iterdir()) if p.is_dir() and p.name != "group" and not p.name.startswith(".")}


def labelled_faces(folder: str | Path, analyzer) -> tuple[list[LabelledFace], list[tuple[str, str]]]:
    """Every face of a labelled photo folder with its identity: the one face of each single-person photo and,
    from the labelled group photos, each labelled person's face (the face nearest their centre) and every
    other detected face as ``None`` (nobody in the folder). Returns ``(faces, skipped)``; ``skipped`` lists
    ``(photo, reason)`` for single-person photos without exactly one face."""
    folder = Path(folder)
    faces: list[LabelledFace] = []
    skipped: list[tuple[str, str]] = []
    for person, photos in single_person_photos(folder).items():
        for photo in photos:
            rel = photo.relative_to(folder).as_posix()
            res = analyzer.analyze(photo)
            if res.error or len(res.faces) != 1:
                skipped.append((rel, res.error or f"{len(res.faces)} faces"))
                continue
            faces.append(LabelledFace(person, rel, res.faces[0].embedding))
    for rel, label in sorted(load_folder_labels(folder).items()):
        res = analyzer.analyze(folder / rel)
        if res.error:
            skipped.append((rel, res.error))
            continue
        ids: list[str | None] = [None] * len(res.faces)
        w, h = res.size
        for person in label["people"]:
            if "cx" not in person or not res.faces:
                continue
            d = [np.hypot(f.center[0] - person["cx"] * w, f.center[1] - person["cy"] * h) for f in res.faces]
            ids[int(np.argmin(d))] = person["id"]
        faces += [LabelledFace(i, rel, f.embedding) for i, f in zip(ids, res.faces, strict=True)]
    return faces, skipped
