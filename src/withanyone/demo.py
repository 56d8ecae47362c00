"""``make demo``: the main job on photos bundled with the repo (``samples/faces``) or any labelled folder.

A folder: ``<person>/<photo>`` single-person photos (the gallery) and, optionally, ``group/<photo>`` with
``labels.json`` (who is where) at the top (keys ``group/<n>.jpg``) or in ``group/`` (keys ``<n>.jpg``).
What a folder lacks is skipped with the reason, never silently: see ``checks_skipped``.
"""

from __future__ import annotations

from pathlib import Path

from .io import atomic_write_json

#: Bundled sample photos: ``<person>/<n>.jpg`` (gallery), ``group/<n>.jpg`` and ``labels.json``.
SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "faces"


def check_samples_folder(samples: Path) -> None:
    """Raise ``ValueError`` (one line naming the folder) unless ``samples`` has person folders to build a gallery."""
    from .faces.labels import single_person_photos

    if not samples.is_dir():
        raise ValueError(f"--samples {samples}: folder not found (want <person>/<n>.jpg photos, optionally "
                         "group/<n>.jpg with labels.json at the top or in group/)")
    if not any(single_person_photos(samples).values()):
        raise ValueError(f"--samples {samples}: no <person>/<photo> image files (the gallery the demo names "
                         "faces against)")


def run_faces_demo(out: Path, samples: Path = SAMPLES, backend: str = "dlib") -> dict:
    """Name every face in the group photos of ``samples`` against its single-person photos.

    Writes ``<out>/<photo>.png`` (annotated) and ``<out>/faces.json``; returns the summary, whose
    ``all_correct`` says whether every labelled person was named right and every other face left unknown
    (``None`` when the folder has no labels: ``checks_skipped`` says why).
    """
    from .faces import FaceAnalyzer, load_image
    from .faces.draw import draw_faces
    from .faces.identity import IMAGE_SUFFIXES
    from .faces.labels import check_names, find_labels, load_folder_labels

    samples, out = Path(samples), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    analyzer = FaceAnalyzer(backend)
    gallery = _gallery_without_group(samples, analyzer)
    labels = load_folder_labels(samples)
    group = samples / "group"
    unlabelled = sorted(p.relative_to(samples).as_posix() for p in (group.iterdir() if group.is_dir() else [])
                        if p.suffix.lower() in IMAGE_SUFFIXES and p.relative_to(samples).as_posix() not in labels)
    skipped = []
    if find_labels(samples) is None:
        skipped.append({"check": "naming", "reason": f"no labels.json in {samples} or {group}: faces are named, "
                        "not checked"})
    elif unlabelled:
        skipped.append({"check": "naming", "reason": f"{len(unlabelled)} group photo(s) not in labels.json, "
                        f"named but not checked: {', '.join(unlabelled)}"})
    images, checks = [], []
    for rel in sorted(labels) + unlabelled:
        path = samples / rel
        res = analyzer.analyze(path)
        names = gallery.name_faces(res.faces) if res.faces else []
        if rel in labels:
            checks += check_names(rel, res.size, res.faces, [n for n, _ in names], labels[rel])
        tags = [f"{n or 'unknown'} {s:.3f}" for n, s in names]
        if res.ok:
            draw_faces(load_image(path), res.faces, tags).save(out / (Path(rel).stem + ".png"))
        images.append({"image": rel, "error": res.error, "faces": [
            {**f.to_dict(with_embedding=False), "name": n, "match_score": round(s, 4)}
            for f, (n, s) in zip(res.faces, names, strict=False)]})
    summary = {
        "backend": analyzer.backend_name,
        "threshold": analyzer.threshold,
        "gallery": {p.name: len(p.sources) for p in gallery.identities},
        "images": images,
        "checks": [{"image": c.image, "expected": c.expected, "got": c.got, "ok": c.ok} for c in checks],
        "all_correct": all(c.ok for c in checks) if checks else None,
        "checks_skipped": skipped,
    }
    atomic_write_json(out / "faces.json", summary)
    return summary


def _gallery_without_group(samples: Path, analyzer):
    """Gallery from every person folder of ``samples`` except ``group``."""
    import shutil
    import tempfile

    from .faces import Gallery

    tmp = Path(tempfile.mkdtemp(prefix="withanyone-gallery-"))
    try:
        for person in samples.iterdir():
            if person.is_dir() and person.name != "group" and not person.name.startswith("."):
                (tmp / person.name).symlink_to(person.resolve(), target_is_directory=True)
        return Gallery.from_folder(tmp, analyzer)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_bench_demo(out: Path, samples: Path = SAMPLES, backend: str = "dlib", progress: bool = False) -> dict:
    """The MultiID-Bench demo: a mini benchmark from the bundled photos, scored for the calibration methods
    (gt-copy, ref-copy, other-person, face-swap) whose copy-paste is known; writes ``<out>/report.html``.

    Returns ``{"report", "summary", "checks", "checks_skipped", "all_ok", "stats"}``; ``checks`` compare the
    p1 and p2 numbers with the known answers (gt-copy CP −1, ref-copy CP +1, face-swap between and nearer +1,
    gt-copy best Sim(GT)); ``checks_skipped`` lists the subsets or photos the folder cannot give, and why.
    """
    from .bench.calibration import build_calibration, calibration_checks, calibration_plan
    from .bench.clip_metrics import DEFAULT_CLIP, ClipScorer
    from .bench.report import write_reports
    from .bench.runner import run_benchmark
    from .faces import FaceAnalyzer

    out = Path(out)
    plan = calibration_plan(samples)
    skipped = [{"check": what, "reason": why} for what, why in plan["skipped"]]
    bench, methods = build_calibration(samples, out / "calibration", analyzer=FaceAnalyzer(backend))
    # CLIP-I/T when the weights are already on this machine (no download in the demo); else "not computed"
    clip = ClipScorer(DEFAULT_CLIP, offline=True)
    # the calibration checks the definition's identities (CP ±1 exactly), so unit vectors; the release's
    # ‖x‖ + 1e-6 normalisation (the benchmark's default) moves them by ~0.007 with dlib
    stats = run_benchmark(bench, methods, out, face_models=[backend], image_metrics=[clip], progress=progress,
                          cp_normalisation="exact")
    summary = write_reports(out)
    model = summary["face_models"][0]["name"] if summary["face_models"] else backend
    checks = [c for sub in ("p1", "p2") if sub in summary["leaderboard"]
              for c in calibration_checks(summary, face_model=model, subset=sub)]
    return {"report": str(out / "report.html"), "summary": summary, "checks": checks, "checks_skipped": skipped,
            "all_ok": all(c["ok"] for c in checks), "stats": stats}
