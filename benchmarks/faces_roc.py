"""Same-person threshold of a face backend: ROC over every same-person and different-person pair of real photos.

Usage: python benchmarks/faces_roc.py [--backend dlib] [--photos DIR ...] [--plot docs/faces-roc.png]
Photos: ../shared/data/faces (its single-person photos and the labelled faces of its group photos) when
present, plus the bundled samples/faces (≤ 512 px copies of some of the same photos; a photo and its own
copy are not counted as a pair). Every face not labelled in a group photo is somebody not in the folder and
counts as a different person from everyone. Pairs are photo to photo (a gallery names a face by its best
photo). The last line is JSON: pair counts, lowest genuine, closest impostor, the backend's threshold and
its TPR / FPR and margins.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from withanyone.faces import FaceAnalyzer  # noqa: E402
from withanyone.faces.labels import labelled_faces  # noqa: E402

SHARED = (ROOT.parent / "shared" / "data" / "faces").resolve()
SAMPLES = (ROOT / "samples" / "faces").resolve()


def pair_scores(folders: list[Path], analyzer: FaceAnalyzer) -> dict:
    """Cosines of every genuine (same person) and impostor (different people) pair of faces over ``folders``."""
    faces, skipped = [], []
    tags = ["shared" if "shared" in f.resolve().parts else "samples" if f.resolve() == SAMPLES else f.name
            for f in folders]
    for k, folder in enumerate(folders):
        got, skip = labelled_faces(folder, analyzer)
        faces += [(k, f) for f in got]
        skipped += [(f"{tags[k]}:{p}", r) for p, r in skip]
    emb = np.stack([f.embedding for _, f in faces])
    sim = emb @ emb.T
    genuine, impostor = [], []
    for i in range(len(faces)):
        for j in range(i + 1, len(faces)):
            (ki, a), (kj, b) = faces[i], faces[j]
            if a.image == b.image and ki != kj:
                continue  # a photo and its resized copy: not a pair
            pair = (float(sim[i, j]), f"{tags[ki]}:{a.image}", f"{tags[kj]}:{b.image}")
            if a.identity is not None and a.identity == b.identity:
                genuine.append(pair)
            else:
                impostor.append(pair)
    return {"faces": len(faces), "skipped": skipped, "genuine": sorted(genuine), "impostor": sorted(impostor)}


def roc(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, TPR, FPR) where a pair is called "same person" when its cosine reaches the threshold."""
    thr = np.unique(np.concatenate([genuine, impostor, [np.inf]]))[::-1]
    tpr = np.array([(genuine >= t).mean() for t in thr])
    fpr = np.array([(impostor >= t).mean() for t in thr])
    return thr, tpr, fpr


def main(argv: list[str] | None = None) -> dict:
    """Run the measurement; print a table and the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="dlib")
    ap.add_argument("--photos", type=Path, action="append", help="labelled photo folder(s); default: shared + samples")
    ap.add_argument("--plot", type=Path, help="write the ROC plot (PNG) here")
    args = ap.parse_args(argv)
    folders = args.photos or [p for p in (SHARED, SAMPLES) if p.is_dir()]
    t0 = time.perf_counter()
    analyzer = FaceAnalyzer(args.backend)
    res = pair_scores(folders, analyzer)
    g = np.array([s for s, *_ in res["genuine"]])
    im = np.array([s for s, *_ in res["impostor"]])
    thr, tpr, fpr = roc(g, im)
    t = analyzer.threshold
    low, high = res["genuine"][0], res["impostor"][-1]
    print(f"folders: {', '.join(str(f) for f in folders)}; {res['faces']} faces; "
          f"{len(g)} same-person pairs, {len(im)} different-person pairs; skipped {res['skipped']}")
    print(f"lowest genuine {low[0]:.4f} ({low[1]} ~ {low[2]}); closest impostor {high[0]:.4f} ({high[1]} ~ {high[2]})")
    print("five lowest genuine:", [(round(s, 4), a, b) for s, a, b in res["genuine"][:5]])
    print("five closest impostors:", [(round(s, 4), a, b) for s, a, b in res["impostor"][-5:]])
    print(f"{'threshold':>9} {'TPR':>6} {'FPR':>7}")
    for x in sorted({0.90, 0.91, 0.915, 0.92, high[0], 0.921, 0.922, 0.923, 0.924, t, 0.925, low[0], 0.93, 0.94, 0.95}):
        print(f"{x:9.4f} {(g >= x).mean():6.3f} {(im >= x).mean():7.4f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        grid = np.linspace(0.88, 0.97, 400)
        a.plot(grid, [(g >= x).mean() for x in grid], label="TPR (same-person pairs matched)")
        a.plot(grid, [(im >= x).mean() for x in grid], label="FPR (different-person pairs matched)")
        a.axvline(t, color="r", ls="--", lw=1, label=f"threshold {t:.3f}")
        a.axvspan(high[0], low[0], color="g", alpha=0.12, label=f"gap {high[0]:.4f}–{low[0]:.4f}")
        a.set_yscale("symlog", linthresh=1e-3)
        a.set_ylim(0, 1.5)
        a.set_xlabel("threshold (cosine)")
        a.set_title(f"{analyzer.backend_name}: ROC over thresholds ({len(g)} / {len(im)} pairs)")
        a.legend(loc="lower left", fontsize=8)
        bins = np.linspace(min(im.min(), g.min()), 1, 80)
        b.hist(im, bins=bins, alpha=0.6, label="different people", density=True)
        b.hist(g, bins=bins, alpha=0.6, label="same person", density=True)
        b.axvline(t, color="r", ls="--", lw=1, label=f"threshold {t:.3f}")
        b.set_xlabel("cosine (photo vs photo)")
        b.legend(loc="upper left")
        b.set_title(f"gap: impostor ≤ {high[0]:.3f}, genuine ≥ {low[0]:.3f}")
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")
    out = {"backend": analyzer.backend_name, "faces": res["faces"], "genuine_pairs": len(g), "impostor_pairs": len(im),
           "lowest_genuine": round(low[0], 4), "closest_impostor": round(high[0], 4), "threshold": t,
           "tpr": round(float((g >= t).mean()), 4), "fpr": round(float((im >= t).mean()), 4),
           "margin_over_impostor": round(t - high[0], 4), "margin_under_genuine": round(low[0] - t, 4),
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
