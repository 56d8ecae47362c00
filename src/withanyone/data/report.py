"""Build report: identities, photos per identity, faces per photo, rejections by reason, and assignment-score
histograms (PNG, matplotlib)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write_json


def assigned_unit_path(work: Path, unit: int) -> Path:
    """Where the write stage records each photo's outcome (names, scores, rejection) for one unit."""
    return work / "assigned" / f"unit-{unit:06d}.json"


def load_assignments(out: str | Path) -> Iterator[dict[str, Any]]:
    """Per-photo outcomes of a finished build, in input order: ``source``, ``search_name``, ``size``,
    ``reason`` (rejection or None), ``train_rec``/``train_cp`` flags and ``faces`` (bbox, name, score…)."""
    folder = Path(out) / "_work" / "assigned"
    for p in sorted(folder.glob("unit-*.json")):
        yield from json.loads(p.read_text())


def summarize(out: str | Path, bank_table: dict[str, dict], extra: dict[str, Any]) -> dict[str, Any]:
    """Stream the per-photo outcomes into counts and write ``report.json`` plus two PNG histograms."""
    out = Path(out)
    reasons: Counter[str] = Counter()
    faces_per_photo: Counter[int] = Counter()
    per_identity: Counter[str] = Counter()
    unknown_reasons: Counter[str] = Counter()
    assigned_scores: list[float] = []
    unknown_scores: list[float] = []
    margins: list[float] = []
    corrupt: list[dict[str, str]] = []
    photos = rec = cp = small = 0
    for ph in load_assignments(out):
        photos += 1
        small += ph.get("small_faces", 0)
        if ph["reason"]:
            key = ph["reason"]
            reasons[key] += 1
            if key == "unreadable":
                corrupt.append({"source": ph["source"], "reason": ph.get("error") or "unreadable"})
            continue
        rec += int(ph["train_rec"])
        cp += int(ph["train_cp"])
        faces_per_photo[len(ph["faces"])] += 1
        for f in ph["faces"]:
            if f["name"] is not None:
                per_identity[f["name"]] += 1
                assigned_scores.append(f["score"])
            else:
                unknown_reasons[f["unknown"] or "unknown"] += 1
                if np.isfinite(f["score"]):
                    unknown_scores.append(f["score"])
            if np.isfinite(f["score"]) and f["runner_up"] > -1:
                margins.append(f["score"] - f["runner_up"])
    report = {
        "photos": photos, "train_rec": rec, "train_cp": cp,
        "identities": len(bank_table),
        "reference_photos_per_identity": {k: v["members"] for k, v in sorted(bank_table.items())},
        "train_photos_per_identity": dict(sorted(per_identity.items())),
        "faces_per_photo": {str(k): v for k, v in sorted(faces_per_photo.items())},
        "rejected": dict(sorted(reasons.items())),
        "small_faces_dropped": small,
        "unknown_faces": dict(sorted(unknown_reasons.items())),
        "corrupt_inputs": corrupt,
        "assignment_scores": {"assigned": _stats(assigned_scores), "unknown": _stats(unknown_scores)},
        "histograms": ["report_scores.png", "report_faces.png"],
        **extra,
    }
    _plot_scores(out / "report_scores.png", assigned_scores, unknown_scores, margins,
                 extra.get("thresholds", {}))
    _plot_faces(out / "report_faces.png", faces_per_photo, report["reference_photos_per_identity"])
    atomic_write_json(out / "report.json", report)
    return report


def _stats(v: list[float]) -> dict[str, float | int | None]:
    if not v:
        return {"n": 0, "min": None, "median": None, "max": None}
    a = np.asarray(v)
    return {"n": len(a), "min": round(float(a.min()), 4), "median": round(float(np.median(a)), 4),
            "max": round(float(a.max()), 4)}


def _save(fig: Any, path: Path) -> None:
    import io

    from ..io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())


def _plot_scores(path: Path, assigned: list[float], unknown: list[float], margins: list[float],
                 thresholds: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    allv = assigned + unknown
    bins = np.linspace(min(allv, default=0.0), max(allv, default=1.0) + 1e-6, 30)
    a.hist([assigned, unknown], bins=bins, label=["assigned", "unknown"], stacked=True)
    if "assign" in thresholds:
        a.axvline(thresholds["assign"], color="k", ls="--", lw=1, label="threshold")
    a.set_title("best centre similarity per face")
    a.legend()
    b.hist(margins, bins=30)
    if "margin" in thresholds:
        b.axvline(thresholds["margin"], color="k", ls="--", lw=1)
    b.set_title("best − runner-up")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _plot_faces(path: Path, faces_per_photo: Counter[int], refs: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ks = sorted(faces_per_photo)
    a.bar([str(k) for k in ks], [faces_per_photo[k] for k in ks])
    a.set_title("faces per kept photo")
    counts = list(refs.values())
    b.hist(counts, bins=range(0, max(counts, default=1) + 2))
    b.set_title("reference photos per identity")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
