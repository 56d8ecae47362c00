"""Failure taxonomy of multi-person outputs: *which* failure a group picture shows.

Each of a sample's people has a **slot**: the box where that person should be (MultiID-Bench: the GT's person
boxes, person ``k`` = reference ``k``; MultiHuman-Testbench: boxes from the pose image; any sample with boxes).
Every generated face goes to the slot its box overlaps most (the share of the face box inside the slot box;
one face per slot, Hungarian on that overlap); faces overlapping no free slot then go to the free slots by
nearest centre, and faces left over are *extra*. Each filled slot gets its similarity vector: the cosine of
its face to every reference. From those vectors (``s_i``: slot ``i``'s vector, ``b_i`` its best reference):

* **blending** — slot ``i`` resembles two references about equally: the second-best cosine is at least
  ``blend_floor`` and within ``blend_margin`` of the best (checked first: such a slot is not called anything
  else);
* **drift** — slot ``i`` resembles no reference: its best cosine is below ``drift``;
* **swap** — slot ``i`` clearly resembles another person's reference: ``b_i ≠ i``;
* **dominance** — one reference is the clear best (not drift, not blending) of two or more slots (a repeated
  person; its second slot is a swap too);
* **missing** / **extra** — fewer / more faces than slots (a slot with no face; a face left over).

A sample can carry several labels; its **primary** label is the first of :data:`LABELS` it carries
(count failures first, then dominance, which explains the swap it causes, then swap, blending, drift);
``none`` means no failure. Thresholds are per face model (:data:`THRESHOLDS`; calibrated on real photos by
``benchmarks/taxonomy.py``, see docs/bench.md "Failure taxonomy"); labels are computed when a report is
built, from the vectors the runner stores (``slot_sims``, ``slot_faces``, ``extra_faces``), so a changed
threshold needs no rescoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Labels in precedence order: a sample's primary label is the first it carries.
LABELS = ("missing", "extra", "dominance", "swap", "blending", "drift")
#: The primary label of a sample without failure.
NONE = "none"
#: Row fields the runner stores for the taxonomy (a scored row without them is rescored once).
ROW_FIELDS = ("slot_boxes", "slot_faces", "slot_sims", "extra_faces")
#: Why a row is rescored when it lacks them.
MISSING_DATA = "no failure-taxonomy data (row written by an older version)"


@dataclass(frozen=True)
class TaxonomyThresholds:
    """Per face model: ``drift`` (best cosine below it = resembles nobody), ``blend_floor`` and
    ``blend_margin`` (second-best at least the floor and within the margin of the best = blending)."""

    drift: float
    blend_floor: float
    blend_margin: float
    calibrated: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for summary.json)."""
        return asdict(self)


#: Thresholds per face backend. dlib: chosen by ``benchmarks/taxonomy.py`` on ``shared/data/faces`` (its
#: cosines are compressed: same person ≥ 0.93, different ≤ 0.92). insightface (antelopev2 / buffalo_l
#: ArcFace): no pack is available offline here, so these are NOT calibrated — set from the usual ArcFace
#: scale (different people |cos| ≲ 0.3, same person 0.5–0.8; generated faces of good methods ≈ 0.4–0.5).
THRESHOLDS: dict[str, TaxonomyThresholds] = {
    "dlib": TaxonomyThresholds(drift=0.905, blend_floor=0.85, blend_margin=0.05, calibrated=True,
                               note="calibrated by benchmarks/taxonomy.py on shared/data/faces"),
    "insightface": TaxonomyThresholds(drift=0.25, blend_floor=0.25, blend_margin=0.08, calibrated=False,
                                      note="uncalibrated: no antelopev2/buffalo_l weights were available offline"),
}


def thresholds_for(backend: str | None) -> TaxonomyThresholds:
    """The thresholds of a face backend (``dlib``, ``insightface``, or a pack name like ``antelopev2``)."""
    b = (backend or "dlib").lower()
    if b in THRESHOLDS:
        return THRESHOLDS[b]
    if b in ("onnx", "antelopev2", "buffalo_l") or b.startswith("insightface"):
        return THRESHOLDS["insightface"]
    raise ValueError(f"no failure-taxonomy thresholds for face backend {backend!r}; known: {', '.join(THRESHOLDS)}")


# ------------------------------------------------------------------------------------------- slot data


def _overlap(faces: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """(F, S): share of each face box's area that lies inside each slot box."""
    x1 = np.maximum(faces[:, None, 0], slots[None, :, 0])
    y1 = np.maximum(faces[:, None, 1], slots[None, :, 1])
    x2 = np.minimum(faces[:, None, 2], slots[None, :, 2])
    y2 = np.minimum(faces[:, None, 3], slots[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = np.clip((faces[:, 2] - faces[:, 0]) * (faces[:, 3] - faces[:, 1]), 1e-9, None)
    return inter / area[:, None]


def assign_slots(face_boxes: Sequence[Sequence[float]], slot_boxes: Sequence[Sequence[float]]) -> list[int | None]:
    """Per slot, the index of the generated face in it (None: empty): one face per slot by the largest
    overlap (share of the face inside the slot), then faces overlapping no free slot to free slots by nearest
    centre; faces not placed are extra."""
    from scipy.optimize import linear_sum_assignment

    f = np.asarray(face_boxes, dtype=np.float64).reshape(-1, 4)
    s = np.asarray(slot_boxes, dtype=np.float64).reshape(-1, 4)
    out: list[int | None] = [None] * len(s)
    if not len(f) or not len(s):
        return out
    ov = _overlap(f, s)
    rows, cols = linear_sum_assignment(-ov)
    for i, k in zip(rows, cols, strict=True):
        if ov[i, k] > 0:
            out[int(k)] = int(i)
    free_f = [i for i in range(len(f)) if i not in out]
    free_s = [k for k in range(len(s)) if out[k] is None]
    if free_f and free_s:
        fc = (f[free_f, :2] + f[free_f, 2:]) / 2
        sc = (s[free_s, :2] + s[free_s, 2:]) / 2
        dist = np.linalg.norm(fc[:, None] - sc[None], axis=2)
        for a, b in zip(*linear_sum_assignment(dist), strict=True):
            out[free_s[int(b)]] = free_f[int(a)]
    return out


def slot_data(out_emb: np.ndarray, out_boxes: Sequence[Sequence[float]], slot_boxes: Sequence[Sequence[float]],
              ref_emb: np.ndarray) -> dict[str, Any]:
    """The row fields the taxonomy needs: ``slot_boxes``, ``slot_faces`` (face index per slot or None),
    ``slot_sims`` (per slot the cosines of its face to every reference, or None) and ``extra_faces``."""
    from ..faces.identity import cosine_matrix

    faces = assign_slots(out_boxes, slot_boxes)
    cm = cosine_matrix(out_emb, ref_emb) if len(out_boxes) else np.zeros((0, len(ref_emb)))
    sims = [None if i is None else [round(float(v), 6) for v in cm[i]] for i in faces]
    return {"slot_boxes": [[float(v) for v in b] for b in slot_boxes], "slot_faces": faces, "slot_sims": sims,
            "extra_faces": int(len(out_boxes) - sum(i is not None for i in faces))}


def slot_boxes_for(sample_boxes: Sequence[Sequence[float]] | None, meta: dict[str, Any], out_size: tuple[int, int],
                   people: Sequence[Sequence[float]] | None) -> list[list[float]] | None:
    """Slot boxes in output pixels: ``people`` (the runner's person boxes) when given; else the sample's own
    boxes — in the frame ``meta["boxes_size"]`` or ``meta["pose_size"]`` (MultiHuman-Testbench: the pose
    image's size) ``= [w, h]`` when given, as fractions of the output when every value is ≤ 1, else already
    in output pixels. None without boxes."""
    if people is not None:
        return [[float(v) for v in b] for b in people]
    if not sample_boxes or not all(isinstance(b, (list, tuple)) and len(b) == 4 for b in sample_boxes):
        return None
    w, h = out_size
    frame = meta.get("boxes_size") or meta.get("pose_size")
    if isinstance(frame, (list, tuple)) and len(frame) == 2 and min(float(frame[0]), float(frame[1])) > 0:
        sx, sy = w / float(frame[0]), h / float(frame[1])
    elif max(float(v) for b in sample_boxes for v in b) <= 1.0:
        sx, sy = float(w), float(h)
    else:
        sx = sy = 1.0
    return [[float(b[0]) * sx, float(b[1]) * sy, float(b[2]) * sx, float(b[3]) * sy] for b in sample_boxes]


def missing_data(row: dict[str, Any]) -> list[str]:
    """``[MISSING_DATA]`` for a scored row without the taxonomy fields (so the runner rescores it once)."""
    return [MISSING_DATA] if row.get("status") == "ok" and "slot_sims" not in row else []


# -------------------------------------------------------------------------------------- classification


@dataclass
class Taxonomy:
    """A sample's failure labels (in :data:`LABELS` order), its primary label and each slot's status."""

    labels: list[str] = field(default_factory=list)
    primary: str = NONE
    slots: list[str] = field(default_factory=list)
    #: per slot: the reference it resembles most (None for an empty slot)
    best: list[int | None] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


def classify_slot(sims: Sequence[float] | None, slot: int, th: TaxonomyThresholds) -> str:
    """One slot's status: ``empty``, ``blending``, ``drift``, ``swap`` or ``ok``."""
    if sims is None:
        return "empty"
    s = np.asarray(sims, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    top1 = float(s[order[0]])
    if len(s) >= 2:
        top2 = float(s[order[1]])
        if top2 >= th.blend_floor and top1 - top2 < th.blend_margin:
            return "blending"
    if top1 < th.drift:
        return "drift"
    return "swap" if int(order[0]) != slot else "ok"


def classify(slot_sims: Sequence[Sequence[float] | None], extra_faces: int, th: TaxonomyThresholds) -> Taxonomy:
    """Labels of one sample from its per-slot similarity vectors and the number of faces in no slot."""
    slots = [classify_slot(s, k, th) for k, s in enumerate(slot_sims)]
    best = [None if s is None else int(np.argmax(s)) for s in slot_sims]
    found = set()
    if "empty" in slots:
        found.add("missing")
    if extra_faces > 0:
        found.add("extra")
    found.update(st for st in slots if st in ("swap", "blending", "drift"))
    claimed = [b for b, st in zip(best, slots, strict=True) if st in ("ok", "swap")]
    if any(claimed.count(b) > 1 for b in claimed):
        found.add("dominance")
    labels = [lab for lab in LABELS if lab in found]
    return Taxonomy(labels, labels[0] if labels else NONE, slots, best)


def classify_row(row: dict[str, Any], th: TaxonomyThresholds) -> Taxonomy | None:
    """A result row's taxonomy; None when it cannot be classified (an unscored row, a missing reference, no
    slot boxes, or a row written before the taxonomy existed). An output without a face: every slot missing."""
    n = int(row.get("num_persons") or 0)
    if row.get("status") != "ok":
        if row.get("reason") == "no face in output" and n > 0:
            return Taxonomy(["missing"], "missing", ["empty"] * n, [None] * n)
        return None
    sims = row.get("slot_sims")
    if not isinstance(sims, list) or not sims:
        return None
    try:
        return classify(sims, int(row.get("extra_faces") or 0), th)
    except (TypeError, ValueError, IndexError):  # a hand-edited or torn row: unclassified, never a crash
        return None


def rates(rows: Sequence[dict[str, Any]], th: TaxonomyThresholds, min_people: int = 2) -> dict[str, Any]:
    """Per-label rates over the classifiable rows with at least ``min_people`` people: ``n``, ``rates``
    (fraction carrying each label), ``primary`` (counts per primary label, ``none`` included), ``failed``
    (fraction with any label) and ``unclassified`` (rows left out)."""
    tax = [(r, classify_row(r, th)) for r in rows if int(r.get("num_persons") or 0) >= min_people]
    got = [t for _, t in tax if t is not None]
    n = len(got)
    out: dict[str, Any] = {"n": n, "unclassified": len(tax) - n,
                           "rates": {lab: (sum(lab in t.labels for t in got) / n if n else None) for lab in LABELS},
                           "primary": {lab: sum(t.primary == lab for t in got) for lab in (*LABELS, NONE)},
                           "failed": (sum(bool(t.labels) for t in got) / n if n else None)}
    return out


def by_people_count(rows: Sequence[dict[str, Any]], th: TaxonomyThresholds) -> dict[int, dict[str, int]]:
    """``{people: {primary label: count, ..., "n": count}}`` over the classifiable rows (one person included)."""
    out: dict[int, dict[str, int]] = {}
    for r in rows:
        t = classify_row(r, th)
        if t is None:
            continue
        n = int(r.get("num_persons") or 0)
        d = out.setdefault(n, {lab: 0 for lab in (*LABELS, NONE)} | {"n": 0})
        d[t.primary] += 1
        d["n"] += 1
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------ calibration image helpers


def aligned_crop(image: np.ndarray, landmarks: np.ndarray, size: int = 256, face_share: float = 0.5) -> np.ndarray:
    """The face warped by its 5 ArcFace-order landmarks into a ``size``² frame, the ArcFace template scaled to
    the central ``face_share`` of it (so two people's crops line up pixel for pixel)."""
    from ..faces.align import ARCFACE_TEMPLATE, estimate_similarity, warp_affine

    dst = ARCFACE_TEMPLATE * (size * face_share / 112.0) + size * (1 - face_share) / 2
    m = estimate_similarity(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), dst)
    return warp_affine(image, m, (size, size))


def pixel_blend(a: np.ndarray, b: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``alpha·a + (1 − alpha)·b`` of two same-size uint8 images."""
    if a.shape != b.shape:
        raise ValueError(f"images to blend differ in size: {a.shape} vs {b.shape}")
    return (alpha * a.astype(np.float32) + (1 - alpha) * b.astype(np.float32)).round().astype(np.uint8)


def place_in_slots(crops: Sequence[np.ndarray | None], size: int = 256, gap: int = 64) -> tuple[np.ndarray,
                                                                                                 list[list[float]]]:
    """A canvas with the square ``crops`` left to right (None: a slot left empty) and the slot boxes: each
    crop's central half (where :func:`aligned_crop` puts the face) grown by a quarter."""
    n = len(crops)
    canvas = np.zeros((size, n * size + (n - 1) * gap, 3), dtype=np.uint8)
    boxes = []
    for k, c in enumerate(crops):
        x = k * (size + gap)
        if c is not None:
            canvas[:, x:x + size] = c
        boxes.append([x + size * 0.1875, size * 0.1875, x + size * 0.8125, size * 0.8125])
    return canvas, boxes


# ------------------------------------------------------------------------------------------- reporting

#: Colours of the labels in the plot (``none`` light grey).
COLOURS = {"missing": "#8c564b", "extra": "#e377c2", "dominance": "#d62728", "swap": "#ff7f0e",
           "blending": "#9467bd", "drift": "#1f77b4", NONE: "#dddddd"}


def thresholds_by_model(face_models: Sequence[dict[str, Any]], names: Sequence[str] = ()
                        ) -> dict[str, TaxonomyThresholds]:
    """Thresholds per face-model name: from run.json's ``face_models`` entries (their ``backend``), and for
    other ``names`` from the name itself (``dlib…`` → dlib, ``insightface``/pack names → insightface)."""
    out: dict[str, TaxonomyThresholds] = {}
    for f in face_models:
        if isinstance(f, dict) and f.get("name"):
            try:
                out[str(f["name"])] = thresholds_for(str(f.get("backend") or f["name"]))
            except ValueError:
                pass
    for n in names:
        if n not in out and n != "average":
            guess = "dlib" if n.startswith("dlib") else n.split("-")[0]
            try:
                out[n] = thresholds_for(guess)
            except ValueError:
                pass
    return out


def taxonomy_summary(rows: Sequence[dict[str, Any]], face_models: Sequence[dict[str, Any]], methods: Sequence[str],
                     benchmark: str | None = None) -> dict[str, Any]:
    """The report's ``taxonomy`` section: thresholds per face model, per-method label rates over the
    multi-person samples, and primary-label counts per benchmark (a row's ``source``, else ``benchmark``),
    method and people count."""
    names = list(dict.fromkeys(r["face_model"] for r in rows))
    ths = thresholds_by_model(face_models, names)
    per: dict[str, Any] = {}
    by: dict[str, Any] = {}
    for fm, th in ths.items():
        sel = [r for r in rows if r["face_model"] == fm]
        if not sel:
            continue
        per[fm] = {m: rates([r for r in sel if r["method"] == m], th) for m in methods
                   if any(r["method"] == m for r in sel)}
        sources = list(dict.fromkeys(str(r.get("source") or benchmark or "benchmark") for r in sel))
        by[fm] = {src: {m: {str(k): v for k, v in by_people_count(
            [r for r in sel if r["method"] == m and str(r.get("source") or benchmark or "benchmark") == src],
            th).items()} for m in per[fm]} for src in sources}
    return {"labels": list(LABELS), "thresholds": {fm: th.to_dict() for fm, th in ths.items() if fm in per},
            "methods": per, "by_people": by}


def failure_plot(summary: dict[str, Any], face_model: str) -> bytes | None:
    """PNG: per benchmark, per people count, one bar per method stacked by primary label (share of that
    method's classified samples with that many people; n above each bar). None without classified rows."""
    tax = (summary.get("taxonomy") or {}).get("by_people", {}).get(face_model)
    if not tax or not any(c for per in tax.values() for c in per.values()):
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    srcs = list(tax)
    width_in = sum(1.5 + len({k for m in per.values() for k in m}) * max(1.2, 0.5 * len(per)) for per in tax.values())
    fig, axes = plt.subplots(1, len(srcs), figsize=(max(5.0, width_in), 4.8), squeeze=False)
    for ax, src in zip(axes[0], srcs, strict=True):
        per = tax[src]
        methods = [m for m in per if per[m]]
        counts = sorted({int(k) for m in methods for k in per[m]})
        width = 0.8 / max(1, len(methods))
        for j, m in enumerate(methods):
            for x, c in enumerate(counts):
                d = per[m].get(str(c))
                if not d or not d["n"]:
                    continue
                pos, bottom = x - 0.4 + width * (j + 0.5), 0.0
                for lab in (*LABELS, NONE):
                    share = d[lab] / d["n"]
                    if share:
                        ax.bar(pos, share, width * 0.92, bottom=bottom, color=COLOURS[lab],
                               edgecolor="white", linewidth=0.5)
                        bottom += share
                ax.text(pos, 1.01, f"n={d['n']}", ha="center", va="bottom", fontsize=6.5)
        groups = [f"{c} {'person' if c == 1 else 'people'}" for c in counts]
        if len(methods) > 1:  # method names under the bars, the people count under each group
            ticks = [x - 0.4 + width * (j + 0.5) for x in range(len(counts)) for j in range(len(methods))]
            ax.set_xticks(ticks, [m for _ in counts for m in methods], rotation=35, ha="right", fontsize=7)
            for x, g in enumerate(groups):
                ax.text(x, -0.24, g, ha="center", va="top", fontsize=9, transform=ax.get_xaxis_transform())
        else:
            ax.set_xticks(range(len(counts)), groups)
        ax.set_ylim(0, 1.18)
        ax.set_ylabel("share of samples (primary label)")
        ax.set_title(f"failures by people count · {src} · {face_model}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[lab]) for lab in (*LABELS, NONE)]
    fig.legend(handles, [*LABELS, "no failure"], loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f} %"


def _threshold_note(fm: str, th: dict[str, Any]) -> str:
    state = "calibrated on real photos" if th.get("calibrated") else "UNCALIBRATED (no weights to calibrate on here)"
    return (f"{fm}: drift below {th['drift']:g}, blending when the second-best reference is ≥ {th['blend_floor']:g} "
            f"and within {th['blend_margin']:g} of the best — {state}")


def taxonomy_md(summary: dict[str, Any], plot_files: dict[str, str] | None = None) -> list[str]:
    """Markdown lines of the failure-taxonomy section (empty when nothing was classified)."""
    tax = summary.get("taxonomy") or {}
    if not tax.get("methods"):
        return []
    lines = ["## Failure taxonomy (multi-person samples)", "",
             "Share of each method's multi-person samples carrying each label (a sample may carry several); "
             "*primary* is the first label in the order missing, extra, dominance, swap, blending, drift "
             "(docs/bench.md, \"Failure taxonomy\").", ""]
    for fm, per in tax["methods"].items():
        lines += [f"- thresholds {_threshold_note(fm, tax['thresholds'][fm])}", ""]
        if not any(e["n"] or e["unclassified"] for e in per.values()):
            lines += ["No multi-person samples.", ""]
            per = {}
        else:
            lines += [f"| method ({fm}) | n | any failure | " + " | ".join(LABELS) + " | unclassified |",
                      "|---|---|---|" + "---|" * len(LABELS) + "---|"]
        for m, e in per.items():
            lines.append(f"| {m} | {e['n']} | {_pct(e['failed'])} | "
                         + " | ".join(_pct(e["rates"][lab]) for lab in LABELS) + f" | {e['unclassified']} |")
        lines.append("")
        if plot_files and fm in plot_files:
            lines += [f"![failures by people count, {fm}]({plot_files[fm]})", ""]
    return lines


def taxonomy_html(summary: dict[str, Any], plots: dict[str, bytes] | None = None) -> str:
    """The failure-taxonomy section of ``report.html`` (table per face model and the plot)."""
    import base64
    import html

    e = html.escape
    tax = summary.get("taxonomy") or {}
    if not tax.get("methods"):
        return ""
    parts = ["<h2 id='taxonomy'>Failure taxonomy (multi-person samples)</h2><p class='note'>Share of each "
             "method's multi-person samples carrying each label (several possible); primary label order: missing, "
             "extra, dominance, swap, blending, drift.</p>"]
    for fm, per in tax["methods"].items():
        parts.append(f"<p class='note'>Thresholds {e(_threshold_note(fm, tax['thresholds'][fm]))}</p>")
        if not any(v["n"] or v["unclassified"] for v in per.values()):
            parts.append("<p class='note'>No multi-person samples.</p>")
        else:
            parts.append(f"<table class='taxonomy' data-face-model='{e(fm, quote=True)}'><thead><tr><th>method</th>"
                         "<th>n</th><th>any failure</th>" + "".join(f"<th>{lab}</th>" for lab in LABELS)
                         + "<th>unclassified</th></tr></thead><tbody>")
            for m, ent in per.items():
                cells = "".join(f"<td class='num' data-label='{lab}'>{_pct(ent['rates'][lab])}</td>"
                                for lab in LABELS)
                parts.append(f"<tr><td>{e(m)}</td><td class='num'>{ent['n']}</td><td class='num'>"
                             f"{_pct(ent['failed'])}</td>{cells}<td class='num'>{ent['unclassified']}</td></tr>")
            parts.append("</tbody></table>")
        png = (plots or {}).get(fm)
        if png:
            parts.append(f"<img class='plot' alt='failures by people count, {e(fm, quote=True)}' "
                         f"src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>")
    return "".join(parts)


def failure_plots(summary: dict[str, Any]) -> dict[str, bytes]:
    """:func:`failure_plot` of every face model with classified rows."""
    out = {}
    for fm in (summary.get("taxonomy") or {}).get("by_people", {}):
        png = failure_plot(summary, fm)
        if png is not None:
            out[fm] = png
    return out


def taxonomy_lines(summary: dict[str, Any]) -> list[str]:
    """One console line per face model: each method's primary labels over its multi-person samples."""
    out = []
    for fm, per in ((summary.get("taxonomy") or {}).get("methods") or {}).items():
        parts = []
        for m, e in per.items():
            if not e["n"]:
                continue
            counts = ", ".join(f"{lab} {n}" for lab, n in e["primary"].items() if n and lab != NONE)
            parts.append(f"{m}: {counts or 'no failure'} (n={e['n']})")
        if parts:
            out.append(f"failure taxonomy ({fm}, multi-person samples, primary labels): " + " · ".join(parts))
    return out
