"""Small real inputs for the app tests: a faceless photo and a one-sample bench results folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def faceless_photo(path: Path, size: tuple[int, int] = (320, 240)) -> Path:
    """A smooth colour gradient (a 'landscape' with no face) saved as JPEG."""
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.broadcast_to(1 - x * y, (h, w, 1))], axis=2)
    Image.fromarray((arr * 255).astype(np.uint8)).save(path, quality=90)
    return path


def bench_results(faces: Path, out: Path) -> Path:
    """``withanyone bench run`` on one two-person sample (GT = group/1.jpg: obama left, biden right) with two
    methods: ``gt-copy`` (the GT itself: CP −1) and ``mirrored`` (the GT flipped left-right)."""
    from withanyone.bench.runner import run_benchmark
    from withanyone.bench.samples import Benchmark, MethodOutputs, Sample

    out.mkdir(parents=True, exist_ok=True)
    mirrored = out.parent / "mirrored.jpg"
    Image.open(faces / "group" / "1.jpg").transpose(Image.FLIP_LEFT_RIGHT).save(mirrored, quality=95)
    sample = Sample("duo", "two men in suits", [faces / "obama" / "1.jpg", faces / "biden" / "1.jpg"],
                    gt=faces / "group" / "1.jpg", num_persons=2, subset="p2")
    bench = Benchmark("mini", [sample])
    methods = [MethodOutputs("gt-copy", {"duo": faces / "group" / "1.jpg"}), MethodOutputs("mirrored", {"duo": mirrored})]
    # exact unit vectors: the GT copy's CP is exactly −1 (the release's default normalisation gives −0.993 with dlib)
    run_benchmark(bench, methods, out, face_models=["dlib"], progress=False, cp_normalisation="exact")
    return out
