"""Calibrate the failure-taxonomy thresholds of a face model on real photos (``withanyone.bench.taxonomy``).

Usage: python benchmarks/taxonomy.py [--backend dlib] [--backend insightface:pack=antelopev2] [--photos DIR]

From ``../shared/data/faces``: every person with two or more photos gives a reference (photo 1, padded as the
runner pads references) and slot faces (the other photos, each warped to an aligned 256² crop and detected
there, as a face standing in a slot); people with one photo are strangers. For every ordered pair (A, B) of
people and every slot photo it builds two-slot samples whose answer is known:

* ``clean``      slots [A, B]                 → no label (its labels are the false positives)
* ``swap``       slots [B, A]                 → swap
* ``dominance``  slots [A, A'] (A' another photo of A, else the same) → dominance
* ``blend``      slots [50/50 pixel blend of A's and B's aligned faces, B] → blending
* ``stranger``   slots [a stranger, B]        → drift

and three-slot ``clean`` / ``swap`` (two of three exchanged) samples over triples. A grid over (drift,
blend_floor, blend_margin) picks the thresholds with the best mean detection rate minus mean false-positive
rate on clean samples (ties: the centre of the best region). Each backend whose weights are not available is
reported as uncalibrated. Last line: JSON with per backend the detection rates, the clean false-positive
rates, the chosen thresholds and the current defaults' figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from withanyone.bench.cache import REF_PAD, pad_to_square  # noqa: E402
from withanyone.bench.runner import FaceModelSpec  # noqa: E402
from withanyone.bench.taxonomy import (  # noqa: E402
    LABELS,
    TaxonomyThresholds,
    aligned_crop,
    classify,
    pixel_blend,
    thresholds_for,
)
from withanyone.faces import FaceAnalyzer, load_image  # noqa: E402
from withanyone.faces.labels import single_person_photos  # noqa: E402

SHARED = (ROOT.parent / "shared" / "data" / "faces").resolve()
#: The label each kind of sample must get.
EXPECT = {"swap": "swap", "dominance": "dominance", "blend": "blending", "stranger": "drift", "swap3": "swap"}


def _largest(analyzer: FaceAnalyzer, image: np.ndarray):
    faces = analyzer.detect(image)
    return max(faces, key=lambda f: f.area) if faces else None


def gather(analyzer: FaceAnalyzer, photos_dir: Path) -> dict:
    """Reference and slot embeddings per person, stranger embeddings, and blend embeddings per pair."""
    people, strangers, crops = {}, [], {}
    skipped = []
    for name, photos in single_person_photos(photos_dir).items():
        slot_embs = []
        ref = None
        for k, p in enumerate(photos):
            im = load_image(p)
            f = _largest(analyzer, im)
            if f is None:
                skipped.append(str(p))
                continue
            crop = aligned_crop(im, f.landmarks)
            cf = _largest(analyzer, crop)
            if cf is None:
                skipped.append(f"{p} (aligned crop)")
                continue
            if k == 0 and len(photos) >= 2:
                rf = _largest(analyzer, pad_to_square(im, REF_PAD)[0])
                ref = rf.embedding if rf is not None else None
                continue
            slot_embs.append(cf.embedding)
            crops.setdefault(name, crop)
        if len(photos) >= 2 and ref is not None and slot_embs:
            people[name] = {"ref": ref, "slots": slot_embs}
        elif len(photos) == 1 and slot_embs:
            strangers.append(slot_embs[0])
    blends = {}
    names = sorted(people)
    for a, b in itertools.combinations(names, 2):
        f = _largest(analyzer, pixel_blend(crops[a], crops[b]))
        if f is None:
            skipped.append(f"blend {a}+{b}")
            continue
        blends[(a, b)] = blends[(b, a)] = f.embedding
    return {"people": people, "strangers": strangers, "blends": blends, "skipped": skipped}


def cases(data: dict) -> list[tuple[str, np.ndarray]]:
    """(kind, slot × reference cosine matrix) of every constructed sample."""
    people, out = data["people"], []
    names = sorted(people)

    def sims(slot_embs, refs):
        return np.stack(slot_embs) @ np.stack([people[r]["ref"] for r in refs]).T

    for a, b in itertools.permutations(names, 2):
        sa, sb = people[a]["slots"], people[b]["slots"]
        for k in range(max(len(sa), len(sb))):
            fa, fb = sa[k % len(sa)], sb[k % len(sb)]
            out.append(("clean", sims([fa, fb], [a, b])))
            out.append(("swap", sims([fb, fa], [a, b])))
            out.append(("dominance", sims([fa, sa[(k + 1) % len(sa)]], [a, b])))
        if (a, b) in data["blends"]:
            out.append(("blend", sims([data["blends"][(a, b)], sb[0]], [a, b])))
        for s in data["strangers"]:
            out.append(("stranger", sims([s, sb[0]], [a, b])))
    for a, b, c in itertools.combinations(names, 3):
        fa, fb, fc = people[a]["slots"][0], people[b]["slots"][0], people[c]["slots"][0]
        out.append(("clean", sims([fa, fb, fc], [a, b, c])))
        out.append(("swap3", sims([fb, fa, fc], [a, b, c])))
    return out


def evaluate(samples: list[tuple[str, np.ndarray]], th: TaxonomyThresholds) -> dict:
    """Detection rate (intended label present) and primary-label accuracy per kind; clean false positives."""
    got: dict[str, list] = {}
    for kind, m in samples:
        got.setdefault(kind, []).append(classify([list(r) for r in m], 0, th))
    det = {k: float(np.mean([EXPECT[k] in t.labels for t in v])) for k, v in got.items() if k in EXPECT}
    primary = {k: float(np.mean([t.primary == EXPECT[k] for t in v])) for k, v in got.items() if k in EXPECT}
    clean = got.get("clean", [])
    fp = {lab: float(np.mean([lab in t.labels for t in clean])) for lab in LABELS} if clean else {}
    fp_any = float(np.mean([bool(t.labels) for t in clean])) if clean else None
    n = {k: len(v) for k, v in got.items()}
    return {"detection": det, "primary_accuracy": primary, "clean_fp": fp, "clean_fp_any": fp_any, "n": n}


def score(ev: dict) -> float:
    """Mean detection rate minus the clean samples' any-label false-positive rate."""
    return float(np.mean(list(ev["detection"].values()))) - float(ev["clean_fp_any"] or 0.0)


def _slot_stats(samples: list[tuple[str, np.ndarray]]) -> dict:
    """Per case and slot (padded to the most slots): best cosine, second best, best reference, validity."""
    c, s = len(samples), max(m.shape[0] for _, m in samples)
    top1, top2 = np.full((c, s), -9.0), np.full((c, s), -9.0)
    best, valid = np.zeros((c, s), int), np.zeros((c, s), bool)
    for i, (_, m) in enumerate(samples):
        order = np.argsort(-m, axis=1, kind="stable")
        k = m.shape[0]
        top1[i, :k] = m[np.arange(k), order[:, 0]]
        top2[i, :k] = m[np.arange(k), order[:, 1]] if m.shape[1] > 1 else -9.0
        best[i, :k], valid[i, :k] = order[:, 0], True
    kinds = np.array([k for k, _ in samples])
    return {"top1": top1, "top2": top2, "best": best, "valid": valid, "kinds": kinds}


def fast_score(st: dict, d: float, f: float, m: float) -> float:
    """:func:`score` of thresholds (d, f, m), vectorised (the same rules as ``classify``; missing/extra
    cannot occur in these samples)."""
    valid = st["valid"]
    blend = valid & (st["top2"] >= f) & (st["top1"] - st["top2"] < m)
    drift = valid & ~blend & (st["top1"] < d)
    claim = valid & ~blend & ~drift
    swap = claim & (st["best"] != np.arange(valid.shape[1])[None])
    dom = np.zeros(len(valid), bool)
    for a, b in itertools.combinations(range(valid.shape[1]), 2):
        dom |= claim[:, a] & claim[:, b] & (st["best"][:, a] == st["best"][:, b])
    has = {"swap": swap.any(1), "blending": blend.any(1), "drift": drift.any(1), "dominance": dom}
    kinds = st["kinds"]
    det = [has[EXPECT[k]][kinds == k].mean() for k in EXPECT if (kinds == k).any()]
    clean = kinds == "clean"
    fp = (has["swap"] | has["blending"] | has["drift"] | dom)[clean].mean()
    return float(np.mean(det) - fp)


def calibrate(samples: list[tuple[str, np.ndarray]], lo: float, hi: float, step: float,
              margins: np.ndarray) -> tuple[TaxonomyThresholds, dict]:
    """The grid point of best :func:`score` (the best point nearest the centre of all best points), and its
    evaluation (by ``classify`` itself)."""
    grid = np.round(np.arange(lo, hi + step / 2, step), 4)
    st = _slot_stats(samples)
    results = [(fast_score(st, d, f, m), float(d), float(f), float(m))
               for d in grid for f in grid for m in margins]
    best = max(r[0] for r in results)
    top = np.array([r[1:] for r in results if r[0] >= best - 1e-9])
    centre = top.mean(0)
    pick = top[np.argmin(np.linalg.norm((top - centre) / np.array([step, step, margins[1] - margins[0]]), axis=1))]
    th = TaxonomyThresholds(float(pick[0]), float(pick[1]), float(pick[2]), calibrated=True)
    ev = evaluate(samples, th)
    if abs(score(ev) - best) > 1e-9:
        raise AssertionError(f"vectorised score {best} differs from classify's {score(ev)}")
    return th, {"score": best, "grid_points_at_best": len(top), **ev}


def _round(d):
    if isinstance(d, dict):
        return {k: _round(v) for k, v in d.items()}
    return round(d, 4) if isinstance(d, float) else d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", action="append", default=None,
                    help="face model spec as for `bench run -f` (repeatable; default dlib and insightface antelopev2)")
    ap.add_argument("--photos", type=Path, default=SHARED)
    args = ap.parse_args()
    specs = args.backend or ["dlib", "insightface:pack=antelopev2"]
    report = {"photos": str(args.photos), "backends": {}}
    for text in specs:
        spec = FaceModelSpec.parse(text)
        t0 = time.perf_counter()
        try:
            analyzer = FaceAnalyzer(spec.backend, **spec.options)
        except Exception as exc:  # no weights here: say so, keep the other backends
            report["backends"][text] = {"calibrated": False, "reason": f"{type(exc).__name__}: {exc}".splitlines()[0],
                                        "defaults": thresholds_for(spec.backend).to_dict()}
            print(f"{text}: not calibrated ({report['backends'][text]['reason']})", file=sys.stderr)
            continue
        data = gather(analyzer, args.photos)
        samples = cases(data)
        arc = analyzer.backend_name != "dlib"
        lo, hi, step = (0.05, 0.6, 0.025) if arc else (0.85, 0.95, 0.005)
        margins = np.round(np.arange(0.01, 0.151, 0.01), 3) if arc else np.round(np.arange(0.005, 0.0501, 0.0025), 4)
        th, ev = calibrate(samples, lo, hi, step, margins)
        default = thresholds_for(analyzer.backend_name)
        entry = {"calibrated": True, "people": len(data["people"]), "strangers": len(data["strangers"]),
                 "blends": len(data["blends"]) // 2, "skipped": data["skipped"],
                 "chosen": {k: v for k, v in th.to_dict().items() if k in ("drift", "blend_floor", "blend_margin")},
                 "chosen_eval": _round(ev),
                 "default": {k: v for k, v in default.to_dict().items() if k in ("drift", "blend_floor", "blend_margin")},
                 "default_eval": _round(evaluate(samples, default)), "seconds": round(time.perf_counter() - t0, 1)}
        report["backends"][text] = entry
        print(f"{text}: chosen {entry['chosen']} · detection {entry['chosen_eval']['detection']} · clean FP "
              f"{entry['chosen_eval']['clean_fp_any']} (n={entry['chosen_eval']['n']})", file=sys.stderr)
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
