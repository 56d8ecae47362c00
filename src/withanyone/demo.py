"""``make demo``: the main job on photos bundled with the repo (``samples/faces``)."""

from __future__ import annotations

from pathlib import Path

from .io import atomic_write_json

#: Bundled sample photos: ``<person>/<n>.jpg`` (gallery), ``group/<n>.jpg`` and ``labels.json``.
SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "faces"


def run_faces_demo(out: Path, samples: Path = SAMPLES, backend: str = "dlib") -> dict:
    """Name every face in the bundled group photos against the bundled single-person photos.

    Writes ``<out>/<photo>.png`` (annotated) and ``<out>/faces.json``; returns the summary, whose
    ``all_correct`` says whether every labelled person was named right and every other face left unknown.
    """
    from .faces import FaceAnalyzer, load_image
    from .faces.draw import draw_faces
    from .faces.labels import check_names, load_labels

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    analyzer = FaceAnalyzer(backend)
    gallery = _gallery_without_group(samples, analyzer)
    labels = load_labels(samples / "labels.json")
    images, checks = [], []
    for rel in sorted(labels):
        path = samples / rel
        res = analyzer.analyze(path)
        names = gallery.name_faces(res.faces) if res.faces else []
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
        "all_correct": all(c.ok for c in checks),
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
            if person.is_dir() and person.name != "group":
                (tmp / person.name).symlink_to(person.resolve(), target_is_directory=True)
        return Gallery.from_folder(tmp, analyzer)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_bench_demo(out: Path, samples: Path = SAMPLES, backend: str = "dlib", progress: bool = False) -> dict:
    """The MultiID-Bench demo: a mini benchmark from the bundled photos, scored for the calibration methods
    (gt-copy, ref-copy, other-person, face-swap) whose copy-paste is known; writes ``<out>/report.html``.

    Returns ``{"report", "summary", "checks", "all_ok", "stats"}``; ``checks`` compare the p1 numbers with
    the known answers (gt-copy CP −1, ref-copy CP +1, face-swap between and nearer +1, gt-copy best Sim(GT)).
    """
    from .bench.calibration import build_calibration, calibration_checks
    from .bench.clip_metrics import DEFAULT_CLIP, ClipScorer
    from .bench.report import write_reports
    from .bench.runner import run_benchmark
    from .faces import FaceAnalyzer

    out = Path(out)
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
    return {"report": str(out / "report.html"), "summary": summary, "checks": checks,
            "all_ok": all(c["ok"] for c in checks), "stats": stats}
