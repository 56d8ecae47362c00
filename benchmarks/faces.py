"""Face stack speed: per backend, detection ms/image, embedding ms/face, and 1- vs 2-worker throughput.

Usage: python benchmarks/faces.py [--repeat 3] [--photos DIR]
Photos: ../shared/data/faces when present, else the bundled samples/faces. Ratios are measured side by
side in one run (the machine is noisy). The last line is JSON with the default (dlib) backend's figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from withanyone.faces import FaceAnalyzer, load_image  # noqa: E402


def photo_set(folder: Path) -> list[Path]:
    """Single-person photos (sorted) of a ``<person>/<n>.jpg`` folder."""
    return [p for p in sorted(folder.glob("*/*.jpg")) if p.parent.name != "group"]


def time_backend(analyzer: FaceAnalyzer, photos: list[Path], repeat: int) -> dict:
    """Median detection ms/image, embedding ms/face and end-to-end ms/photo (load + detect + embed)."""
    images = [load_image(p) for p in photos]
    analyzer.detect(images[0])  # warm up
    det, emb, e2e = [], [], []
    for _ in range(repeat):
        for path, img in zip(photos, images, strict=True):
            t0 = time.perf_counter()
            faces = analyzer.backend.detect(img, embed=False)
            t1 = time.perf_counter()
            analyzer.backend.embed(img, faces)
            t2 = time.perf_counter()
            det.append((t1 - t0) * 1e3)
            if faces:
                emb.append((t2 - t1) * 1e3 / len(faces))
            t3 = time.perf_counter()
            analyzer.detect(path)
            e2e.append((time.perf_counter() - t3) * 1e3)
    return {"detect_ms_per_image": statistics.median(det), "embed_ms_per_face": statistics.median(emb) if emb else None,
            "ms_per_photo": statistics.mean(e2e)}


def throughput(analyzer: FaceAnalyzer, photos: list[Path], workers: int) -> float:
    """Photos per second through ``FaceAnalyzer.analyze_many`` with ``workers`` processes, warm pool."""
    if workers > 1:
        analyzer.start_workers(workers)
        analyzer.analyze_many(photos[:workers], workers=workers, progress=False)  # models loaded in each
    t0 = time.perf_counter()
    analyzer.analyze_many(photos, workers=workers, progress=False)
    return len(photos) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--photos", type=Path, default=None)
    ap.add_argument("--batch-copies", type=int, default=3, help="copies of the photo set in the throughput batch")
    args = ap.parse_args()
    folder = args.photos or (ROOT.parent / "shared" / "data" / "faces")
    if not folder.is_dir():
        folder = ROOT / "samples" / "faces"
    photos = photo_set(folder)
    print(f"photos: {len(photos)} from {folder}")

    backends: list[dict] = [{"backend": "dlib"}]
    try:
        from _packs import build_benchmark_pack  # random weights of realistic size, see its docstring

        pack_dir = Path(tempfile.mkdtemp(prefix="bench-pack-"))
        build_benchmark_pack(pack_dir)
        backends.append({"backend": "insightface", "pack": str(pack_dir)})
    except ImportError as exc:
        print(f"insightface backend skipped: {exc}")

    results = {}
    for spec in backends:
        opts = {k: v for k, v in spec.items() if k != "backend"}
        analyzer = FaceAnalyzer(spec["backend"], **opts)
        t = time_backend(analyzer, photos, args.repeat)
        batch = photos * args.batch_copies
        # Interleave 1- and 2-worker runs so both see the same machine load.
        r1, r2 = [], []
        for _ in range(2):
            r1.append(throughput(analyzer, batch, 1))
            r2.append(throughput(analyzer, batch, 2))
        analyzer.close()
        t["photos_per_s_1_worker"] = max(r1)
        t["photos_per_s_2_workers"] = max(r2)
        t["scaling_2_vs_1"] = max(r2) / max(r1)
        results[spec["backend"]] = t
        print(f"[{spec['backend']}] detect {t['detect_ms_per_image']:.0f} ms/image, "
              f"embed {t['embed_ms_per_face'] or float('nan'):.0f} ms/face, end-to-end {t['ms_per_photo']:.0f} ms/photo, "
              f"batch {t['photos_per_s_1_worker']:.2f} → {t['photos_per_s_2_workers']:.2f} photos/s "
              f"(2 vs 1 workers: {t['scaling_2_vs_1']:.2f}x)")
    d = results["dlib"]
    print(json.dumps({"ms_per_photo": round(d["ms_per_photo"], 1), "scaling_2_vs_1": round(d["scaling_2_vs_1"], 3)}))


if __name__ == "__main__":
    main()
