"""Kontext edit preprocessing: what the named options change, on the shared group photos (tiny model for timing).

For each photo of ``../shared/data/faces/group`` (dlib faces, numbered left to right), replacing face 0 only:

- **editable**: whether the release's square canvas can hold every face (``canvas="square"``) vs ours
  ``canvas="photo"`` (always); with ``keep_unreplaced=True`` only the replaced face must fit the square;
- **photo kept**: the fraction of the photo's area inside the canvas (the square crop drops the rest);
- **unreplaced faces changed**: mean |Δ| (grey levels, 0–255) between the condition and the unblurred canvas inside
  the faces that are *not* replaced — the release blurs every face, ``keep_unreplaced=True`` none of them;
- **seam**: the excess mean |Δ| across the edge of the replaced face's blur region (the 2-px band just inside vs
  just outside, minus the same on the unblurred canvas), hard paste (release) vs ``feather=16``;
- **time**: ``prepare_edit`` per option, and one tiny-model edit (2 steps, 64² canvas) per option.

The tiny model is random, so its images say nothing about quality; the condition figures are what the model is
given. Default run ≈ 1–2 min; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GROUP = ROOT.parent / "shared" / "data" / "faces" / "group"
OPTIONS = {
    "release": {},
    "keep_unreplaced": {"keep_unreplaced": True},
    "feather16": {"feather": 16.0},
}


def _band(img: np.ndarray, box, inside: bool, width: int = 2) -> np.ndarray:
    x1, y1, x2, y2 = box
    h, w = img.shape[:2]
    d = 0 if inside else width
    a = img[max(0, y1 - d):min(h, y2 + d), max(0, x1 - d):min(w, x2 + d)].astype(np.float64)
    e = width if inside else 0
    inner = img[max(0, y1 + e):min(h, y2 - e), max(0, x1 + e):min(w, x2 - e)].astype(np.float64)
    return a, inner


def seam(cond: np.ndarray, canvas: np.ndarray, box) -> float:
    """Mean |Δ| between the 2-px rings just inside and just outside ``box``, condition minus canvas."""
    def ring_means(img):
        x1, y1, x2, y2 = box
        h, w = img.shape[:2]
        x1, y1, x2, y2 = max(2, x1), max(2, y1), min(w - 2, x2), min(h - 2, y2)
        f = img.astype(np.float64)
        ins = np.concatenate([f[y1:y1 + 2, x1:x2].reshape(-1, 3), f[y2 - 2:y2, x1:x2].reshape(-1, 3),
                              f[y1:y2, x1:x1 + 2].reshape(-1, 3), f[y1:y2, x2 - 2:x2].reshape(-1, 3)])
        out = np.concatenate([f[y1 - 2:y1, x1:x2].reshape(-1, 3), f[y2:y2 + 2, x1:x2].reshape(-1, 3),
                              f[y1:y2, x1 - 2:x1].reshape(-1, 3), f[y1:y2, x2:x2 + 2].reshape(-1, 3)])
        return np.abs(ins - out).mean()

    return float(ring_means(cond) - ring_means(canvas))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="canvas side / √area (default the release's 512)")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny-model edit timings")
    args = parser.parse_args()

    from withanyone.faces import FaceAnalyzer
    from withanyone.pipeline.edit import EditError, detect_faces, prepare_edit

    fa = FaceAnalyzer("dlib")
    photos = sorted(GROUP.glob("*.jpg"))
    editable = {"square": 0, "photo": 0}
    editable_opt = {k: 0 for k in OPTIONS}  # square canvas, per option (keep_unreplaced: only face 0 must fit)
    kept = {"square": [], "photo": []}
    unreplaced = {k: [] for k in OPTIONS}
    seams = {k: [] for k in OPTIONS}
    prep = {k: [] for k in OPTIONS}
    rows = []
    for path in photos:
        faces = detect_faces(path, fa)
        for canvas in ("square", "photo"):
            for opt, kw in OPTIONS.items():
                t0 = time.perf_counter()
                try:
                    plan = prepare_edit(path, 1, None, replace=[0], canvas=canvas, size=args.size, faces=faces, **kw)
                except EditError as exc:
                    if opt == "release":
                        rows.append(f"{path.name} {canvas}: not editable ({str(exc).split(': ', 1)[1][:60]}…)")
                    continue
                prep[opt].append(time.perf_counter() - t0)
                if canvas == "square":
                    editable_opt[opt] += 1
                cond, canv = np.asarray(plan.condition), np.asarray(plan.canvas)
                h, w = cond.shape[:2]
                others = [(max(0, b[0]), max(0, b[1]), min(w, b[2]), min(h, b[3]))
                          for i, b in enumerate(plan.face_boxes) if i not in plan.replaced]
                diffs = [np.abs(cond[y1:y2, x1:x2].astype(float) - canv[y1:y2, x1:x2].astype(float)).mean()
                         for x1, y1, x2, y2 in others if x2 > x1 and y2 > y1]  # the part inside the canvas
                if diffs:
                    unreplaced[opt].append(float(np.mean(diffs)))
                seams[opt].append(seam(cond, canv, plan.boxes[0]))
                if opt == "release":
                    editable[canvas] += 1
                    tf = plan.transform
                    area = tf.crop_w * tf.crop_h / (plan.photo_size[0] * plan.photo_size[1])
                    kept[canvas].append(area)
                    rows.append(f"{path.name} {canvas}: {plan.size[0]}×{plan.size[1]}, {len(faces)} faces, photo kept "
                                f"{area:.0%}")
    for r in rows:
        print(r)

    tiny = {}
    if not args.no_tiny:
        from withanyone.pipeline.tiny import tiny_kontext_pipeline

        pipe = tiny_kontext_pipeline(face_analyzer=fa)
        pipe.set_progress_bar_config(disable=True)
        photo = GROUP / "3.jpg"
        ref = np.random.default_rng(0).standard_normal(128).astype(np.float32)
        for opt, kw in [*OPTIONS.items(), ("canvas_photo", {"canvas": "photo"})]:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                pipe("", image=str(photo), references=[ref], replace=[0], size=64, seed=0, num_inference_steps=2,
                     max_sequence_length=16, **kw)
                times.append(time.perf_counter() - t0)
            tiny[opt] = round(statistics.median(times), 3)
            print(f"tiny edit ({opt}): {tiny[opt]:.3f} s (median of 3)")

    def mean(v):
        return round(float(np.mean(v)), 3) if v else None

    result = {
        "photos": len(photos),
        "editable": editable,
        "editable_square_by_option": editable_opt,
        "photo_kept": {k: mean(v) for k, v in kept.items()},
        "unreplaced_face_change": {k: mean(v) for k, v in unreplaced.items()},
        "seam_excess": {k: mean(v) for k, v in seams.items()},
        "prepare_ms": {k: round(1000 * statistics.median(v), 1) for k, v in prep.items() if v},
        "tiny_edit_s": tiny,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
