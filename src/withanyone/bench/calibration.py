"""A mini benchmark from the bundled photos, with calibration "methods" whose copy-paste is known.

* ``gt-copy`` — the output is the GT photo itself: Sim(GT) = 1, CP = −1.
* ``ref-copy`` — the output is the reference photo as the benchmark sees it, padded to its black square
  (side by side for two people, laid out so the detector sees each square as on its own): CP = +1. ``ref-copy-unpadded`` (one person) is the raw photo: with dlib
  its CP lands near 0.9, not 1, because re-detection on other pixels moves the embedding (cos ≈ 0.999)
  by a sizeable fraction of dlib's small GT–reference angle (≈ 0.3 rad).
* ``other-person`` — a photo of somebody else: low Sim(GT) and Sim(Ref), CP gated out.
* ``face-swap`` — each reference face warped onto its GT face with the 5-point similarity alignment and
  feathered in: the GT scene with the reference identity, so CP lies between −1 and +1, near +1.

Layout written: ``<out>/benchmark/<id>/{ori.jpg, ref_k.jpg, meta.json}`` (the authors' layout) and
``<out>/methods/<method>/<id>.jpg``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..io import atomic_write_bytes, atomic_write_json
from .cache import REF_PAD, pad_to_square
from .readers import read_folder_layout, read_method_outputs
from .samples import Benchmark, MethodOutputs

CALIBRATION_METHODS = ("gt-copy", "ref-copy", "other-person", "face-swap")
#: Methods written besides the four: the unpadded reference photos.
EXTRA_METHODS = ("ref-copy-unpadded",)


def _people(samples: Path) -> dict[str, list[Path]]:
    """Person folders with at least two photos (photo 1 is the GT, photo 2 the reference), in name order."""
    from ..faces.labels import single_person_photos

    return {p: photos for p, photos in single_person_photos(samples).items() if len(photos) >= 2}


def calibration_plan(samples: str | Path) -> dict:
    """Which samples a folder gives: ``people`` (``{person: [gt, ref]}``, one-person samples), ``groups``
    (``{group photo: people left to right}``, two-person samples) and ``skipped`` (``[(what, why)]``).

    A labelled group photo (``labels.json`` at the top or in ``group/``) makes a two-person sample when it shows
    exactly two faces, both labelled with a centre, and both people have a folder of two or more photos.
    """
    from ..faces.labels import find_labels, load_folder_labels

    samples = Path(samples)
    people = _people(samples)
    skipped: list[tuple[str, str]] = []
    groups: dict[str, tuple[str, ...]] = {}
    labels = load_folder_labels(samples)
    if find_labels(samples) is None:
        skipped.append(("two-person samples", f"no labels.json in {samples} or {samples / 'group'}"))
    for rel, label in sorted(labels.items()):
        known = [p for p in label["people"] if p.get("id") and "cx" in p]
        n = label.get("faces", len(label["people"]))
        if not (samples / rel).is_file():
            skipped.append((rel, "labelled but the file is missing"))
        elif n != 2 or len(known) != 2:
            skipped.append((rel, f"{n} face(s), {len(known)} labelled with a person and centre (want 2 and 2)"))
        elif missing := [p["id"] for p in known if p["id"] not in people]:
            skipped.append((rel, f"no folder of ≥ 2 photos for {', '.join(missing)}"))
        else:
            groups[rel] = tuple(p["id"] for p in sorted(known, key=lambda p: p["cx"]))
    if labels and not groups:
        skipped.append(("two-person samples", "no labelled group photo qualifies (see above)"))
    if len(people) < 2:
        skipped.append(("one-person samples", f"{len(people)} person folder(s) with two photos or more (want 2)"))
    return {"people": {p: photos[:2] for p, photos in people.items()}, "groups": groups, "skipped": skipped}


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        shutil.copyfile(src, dst)


def _save_png(img: np.ndarray, dst: Path) -> None:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    atomic_write_bytes(dst, buf.getvalue())


def _save_jpg(img: np.ndarray | Image.Image, dst: Path) -> None:
    import io

    im = img if isinstance(img, Image.Image) else Image.fromarray(np.ascontiguousarray(img))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=95)
    atomic_write_bytes(dst, buf.getvalue())


def side_by_side(paths: list[Path], pad: float | None = None, gap: int = 0) -> np.ndarray:
    """Images placed left to right, unscaled, ``gap`` black pixels apart, on a black canvas (a multi-person
    reference copy); with ``pad`` each is first padded to a black square as references are before detection."""
    from ..faces import load_image

    ims = [load_image(p) for p in paths]
    if pad:
        ims = [pad_to_square(im, pad)[0] for im in ims]
    h = max(i.shape[0] for i in ims)
    canvas = np.zeros((h, sum(i.shape[1] for i in ims) + gap * (len(ims) - 1), 3), dtype=np.uint8)
    x = 0
    for im in ims:
        canvas[:im.shape[0], x:x + im.shape[1]] = im
        x += im.shape[1] + gap
    return canvas


def faithful_side_by_side(paths: list[Path], analyzer, pad: float = REF_PAD, max_gap: int = 16) -> np.ndarray:
    """:func:`side_by_side` of padded references with the gap (0…``max_gap`` px) at which the detector finds
    each reference face exactly as in its own padded square (embedding cosine ≥ 0.99999).

    Detectors work on a pixel grid (dlib's HOG: 8-px cells on an upsampled pyramid), so a face shifted by
    an arbitrary offset is boxed a pixel or two differently and its embedding moves (cos ≈ 0.999) — a large
    share of the small GT–reference angle of a compressed embedding like dlib's. A true copy must not move.
    """
    from ..faces import load_image
    from ..faces.identity import hungarian_match

    want = []
    for p in paths:
        faces = analyzer.detect(pad_to_square(load_image(p), pad)[0])
        if not faces:
            return side_by_side(paths, pad=pad)
        want.append(faces[0].embedding)
    want_arr = np.stack(want)
    best, best_gap = -1.0, 0
    for gap in range(max_gap + 1):
        faces = analyzer.detect(side_by_side(paths, pad=pad, gap=gap))
        if len(faces) < len(paths):
            continue
        _, sims = hungarian_match(want_arr, np.stack([f.embedding for f in faces]))
        if sims.min() > best:
            best, best_gap = float(sims.min()), gap
        if best >= 0.99999:
            break
    return side_by_side(paths, pad=pad, gap=best_gap)


def _shrunk_copy(src: Path, dst: Path, max_side: int) -> None:
    """A JPEG copy of ``src`` no larger than ``max_side`` (reused when present)."""
    if dst.exists():
        return
    im = Image.open(src).convert("RGB")
    im.thumbnail((max_side, max_side), Image.LANCZOS)
    _save_jpg(im, dst)


def face_swap(target: np.ndarray, target_face, source: np.ndarray, source_face) -> np.ndarray:
    """Warp ``source_face`` onto ``target_face`` (5-point similarity) and blend it in with a feathered oval."""
    from ..faces.align import apply_affine, estimate_similarity, warp_affine

    m = estimate_similarity(source_face.landmarks, target_face.landmarks)
    h, w = target.shape[:2]
    warped = warp_affine(source, m, (w, h))
    # an oval over the warped source face: eyes to chin, cheek to cheek
    box = source_face.bbox
    corners = apply_affine(m, np.array([[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]]]))
    cx, cy = (float(v) for v in corners.mean(0))
    rx = 0.42 * float(np.linalg.norm(corners[1] - corners[0]))
    ry = 0.55 * float(np.linalg.norm(corners[3] - corners[0]))
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).ellipse([cx - rx, cy - ry * 0.95, cx + rx, cy + ry * 1.05], fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(max(1.0, rx * 0.15)))
    a = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    return (warped.astype(np.float32) * a + target.astype(np.float32) * (1 - a)).round().astype(np.uint8)


def build_calibration(samples: str | Path, out: str | Path, analyzer=None) -> tuple[Benchmark, list[MethodOutputs]]:
    """Build the mini benchmark and the four calibration methods from the bundled ``samples`` photos.

    One-person samples: per person with ≥ 2 photos, GT = photo 1, reference = photo 2. Two-person samples:
    the labelled group photos that qualify (:func:`calibration_plan`). Files already written are reused.
    """
    from ..faces import FaceAnalyzer, load_image
    from ..faces.identity import hungarian_match

    samples, out = Path(samples), Path(out)
    bdir, mdir = out / "benchmark", out / "methods"
    analyzer = analyzer or FaceAnalyzer("dlib")
    plan = calibration_plan(samples)
    photos = plan["people"]
    people = list(photos)
    if len(people) < 2:
        raise ValueError(f"{samples}: need at least two person folders with two photos each, found {len(people)}")
    items: list[dict] = []
    for k, person in enumerate(people):
        other = people[(k + 1) % len(people)]
        items.append({"id": f"p1_{person}", "gt": photos[person][0], "refs": [photos[person][1]],
                      "other": photos[other][0], "names": [person],
                      "prompt": f"a photo of {person.replace('_', ' ')}"})
    groups = list(plan["groups"])
    for k, g in enumerate(groups):
        names = plan["groups"][g]
        # somebody else: the next group photo, or with only one, the first person not in this one (else none)
        others = [samples / x for x in groups if x != g] or [photos[p][0] for p in people if p not in names]
        items.append({"id": f"p2_{Path(g).stem}_{'_'.join(names)}", "gt": samples / g,
                      "refs": [photos[n][1] for n in names], "other": others[k % len(others)] if others else None,
                      "names": list(names), "prompt": f"{' and '.join(n.replace('_', ' ') for n in names)} together"})
    for it in items:
        folder = bdir / it["id"]
        _copy(it["gt"], folder / "ori.jpg")
        n = len(it["refs"])
        for k, r in enumerate(it["refs"], 1):
            if n == 1:
                _copy(r, folder / f"ref_{k}.jpg")
            else:  # small enough that the padded squares side by side fit the detector unscaled (≤ 1024 px)
                _shrunk_copy(r, folder / f"ref_{k}.jpg", int(1000 / (REF_PAD * n)))
        it["refs"] = [folder / f"ref_{k}.jpg" for k in range(1, n + 1)]
        if not (folder / "meta.json").is_file():
            atomic_write_json(folder / "meta.json", {"prompt": it["prompt"], "num_persons": len(it["refs"]),
                                                     "names": it["names"]})
        _copy(it["gt"], mdir / "gt-copy" / f"{it['id']}.jpg")
        if not (mdir / "ref-copy" / f"{it['id']}.png").exists():
            # the references exactly as the benchmark sees them (padded squares), so detection sees the same
            # pixels; PNG keeps them lossless
            copy = (side_by_side(it["refs"], pad=REF_PAD) if len(it["refs"]) == 1
                    else faithful_side_by_side(it["refs"], analyzer))
            _save_png(copy, mdir / "ref-copy" / f"{it['id']}.png")
        # the raw photos: shows how much re-detection jitter alone moves CP
        if len(it["refs"]) == 1:
            _copy(it["refs"][0], mdir / "ref-copy-unpadded" / f"{it['id']}.jpg")
        elif not (mdir / "ref-copy-unpadded" / f"{it['id']}.png").exists():
            _save_png(side_by_side(it["refs"]), mdir / "ref-copy-unpadded" / f"{it['id']}.png")
        if it["other"] is not None:
            _copy(it["other"], mdir / "other-person" / f"{it['id']}.jpg")
        swap_path = mdir / "face-swap" / f"{it['id']}.jpg"
        if not swap_path.exists():
            target = load_image(it["gt"])
            gt_faces = analyzer.detect(target)[: len(it["refs"])]
            refs = [(load_image(r), analyzer.detect(r)) for r in it["refs"]]
            refs = [(img, faces[0]) for img, faces in refs if faces]
            if gt_faces and refs:
                pairs, _ = hungarian_match(np.stack([f.embedding for f in gt_faces]),
                                           np.stack([f.embedding for _, f in refs]))
                for i, j in pairs:
                    target = face_swap(target, gt_faces[i], refs[j][0], refs[j][1])
            _save_jpg(target, swap_path)
    bench, _ = read_folder_layout(bdir, output_name=None, name="calibration")
    ids = [s.id for s in bench]
    methods = [read_method_outputs(mdir / m, m, sample_ids=ids) for m in CALIBRATION_METHODS + EXTRA_METHODS]
    return bench, methods


def calibration_checks(summary: dict, face_model: str = "dlib", tol: float = 0.01, subset: str = "p1") -> list[dict]:
    """The known answers, checked on one subset of a calibration run's summary: gt-copy CP −1, ref-copy
    CP +1, face-swap between them and closer to +1, gt-copy the highest Sim(GT).

    The two-person ref-copy is laid out by :func:`faithful_side_by_side`, so the same checks hold on p2.
    """
    allm = summary["leaderboard"][subset][face_model]

    def val(method: str, metric: str) -> float | None:
        v = allm.get(method, {}).get(metric)
        return None if v is None else v.get("mean")

    checks = []
    gt_cp, ref_cp, swap_cp = val("gt-copy", "cp_all"), val("ref-copy", "cp_all"), val("face-swap", "cp_all")
    checks.append({"check": f"{subset} gt-copy CP = -1.00", "value": gt_cp,
                   "ok": gt_cp is not None and abs(gt_cp + 1) <= tol})
    checks.append({"check": f"{subset} ref-copy CP = +1.00", "value": ref_cp,
                   "ok": ref_cp is not None and abs(ref_cp - 1) <= tol})
    checks.append({"check": f"{subset} face-swap CP between, closer to +1", "value": swap_cp,
                   "ok": swap_cp is not None and gt_cp is not None and ref_cp is not None
                   and gt_cp < swap_cp < ref_cp and swap_cp > 0})
    sims = {m: val(m, "sim_gt") for m in CALIBRATION_METHODS}
    best = max((m for m in sims if sims[m] is not None), key=lambda m: sims[m], default=None)
    checks.append({"check": f"{subset} gt-copy has the highest Sim(GT)", "value": sims.get("gt-copy"),
                   "ok": best == "gt-copy"})
    return checks


def dump_checks(checks: list[dict]) -> str:
    """Checks as a compact JSON string."""
    return json.dumps(checks)
