"""Several face models at once, their average, and per-model CP gates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from withanyone.bench.metrics import PAPER_CP_GATE
from withanyone.bench.report import write_reports
from withanyone.bench.runner import FaceModelSpec, load_results, run_benchmark
from withanyone.bench.samples import Benchmark, MethodOutputs, Sample


def test_face_model_spec_parsing():
    s = FaceModelSpec.parse("insightface:pack=antelopev2,gate=0.4/0.35,label=arc")
    assert s.backend == "insightface" and s.options == {"pack": "antelopev2"} and s.gate == (0.4, 0.35)
    assert s.label == "arc"
    s = FaceModelSpec.parse("dlib:num_jitters=1,gate=0.9")
    assert s.options == {"num_jitters": 1} and s.gate == (0.9, 0.9)
    with pytest.raises(ValueError, match="key=value"):
        FaceModelSpec.parse("dlib:oops")


def test_two_face_models_and_their_average(samples_dir, tmp_path):
    s = samples_dir
    people = ("obama", "biden", "scarlett")
    bench = Benchmark("two-models", [Sample(p, p, [s / p / "2.jpg"], gt=s / p / "1.jpg") for p in people])
    meth = MethodOutputs("gt", {p: s / p / "1.jpg" for p in people})
    other = MethodOutputs("ref", {p: s / p / "2.jpg" for p in people})
    specs = ["dlib", FaceModelSpec("dlib", {"max_side": 320}, gate=PAPER_CP_GATE, label="dlib-small")]
    stats = run_benchmark(bench, [meth, other], tmp_path, face_models=specs, progress=False)
    # each model detects each distinct image once: 3 GT (= gt outputs), 3 padded refs, 3 raw refs
    assert stats.calls == {"dlib": {"detect": 9, "embed": 9}, "dlib-small": {"detect": 9, "embed": 9}}
    summary = write_reports(tmp_path)
    board = summary["leaderboard"]["p1"]
    assert set(board) == {"dlib", "dlib-small", "average"}
    rows = load_results(tmp_path)
    a = {r["sample"]: r["sim_ref"] for r in rows if r["face_model"] == "dlib" and r["method"] == "gt"}
    b = {r["sample"]: r["sim_ref"] for r in rows if r["face_model"] == "dlib-small" and r["method"] == "gt"}
    assert a != b  # detection on a smaller copy moves landmarks: really two models
    expected = np.mean([(a[p] + b[p]) / 2 for p in people])
    assert board["average"]["gt"]["sim_ref"]["mean"] == pytest.approx(expected)
    from withanyone.faces.backends.dlib_backend import SAME_PERSON_THRESHOLD as T

    assert summary["gates"] == {"dlib": [T, T], "dlib-small": [0.4, 0.35]}
    md = (tmp_path / "report.md").read_text()
    assert "## p1 · face model average" in md and "Sim(GT) > 0.400 (one person)" in md


def test_cli_run_with_method_folders_and_report(samples_dir, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from withanyone.bench.cli import app

    s = samples_dir
    root, outs = tmp_path / "bench", tmp_path / "mine"
    outs.mkdir()
    for p in ("obama", "biden"):
        (root / p).mkdir(parents=True)
        shutil.copyfile(s / p / "1.jpg", root / p / "ori.jpg")
        shutil.copyfile(s / p / "2.jpg", root / p / "ref_1.jpg")
        (root / p / "meta.json").write_text(json.dumps({"prompt": f"photo of {p}"}))
        shutil.copyfile(s / p / "1.jpg", outs / f"{p}.jpg")
    res = CliRunner().invoke(app, ["run", str(root), "-m", f"mine={outs}", "--out", str(tmp_path / "res"),
                                   "--clip", "", "--no-progress", "--cp-normalisation", "exact"])
    assert res.exit_code == 0, res.output
    rows = load_results(tmp_path / "res")
    assert [(r["sample"], r["method"], r["status"]) for r in rows] == [("biden", "mine", "ok"), ("obama", "mine", "ok")]
    assert all(r["cp"] == pytest.approx(-1.0) and r["cp_normalisation"] == "exact" for r in rows)
    (tmp_path / "res" / "report.html").unlink()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "res"), "--paper-points"])  # dlib only: refused
    assert res.exit_code == 1 and "another scale" in res.output and not (tmp_path / "res" / "report.html").exists()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "res")])
    assert res.exit_code == 0 and (tmp_path / "res" / "report.html").is_file()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert res.exit_code != 0


def test_insightface_pack_beside_dlib(samples_dir, tmp_path):
    """The ONNX insightface backend (a tiny pack: key-coloured squares are its "faces") runs beside dlib:
    own rows, own 512-d embeddings, the paper's gate by default, and an average over both."""
    pytest.importorskip("onnxruntime")
    from PIL import Image
    from tiny_models.insightface_pack import build_tiny_pack, paint_key

    pack = build_tiny_pack(tmp_path / "pack" / "antelopev2", extras=False)
    people = ("obama", "biden")
    samples, outs = [], {}
    for k, p in enumerate(people):
        d = tmp_path / p
        d.mkdir()
        # a key-coloured square is a tiny-pack "face" (it fires on several overlapping cells: several faces)
        gt = paint_key(np.asarray(Image.open(samples_dir / p / "1.jpg").convert("RGB")), 0, 0, 96, 96)
        ref = paint_key(np.asarray(Image.open(samples_dir / p / "2.jpg").convert("RGB")), 0, 0, 96 + 32 * k, 96)
        Image.fromarray(gt).save(d / "ori.png")
        Image.fromarray(ref).save(d / "ref_1.png")
        samples.append(Sample(p, p, [d / "ref_1.png"], gt=d / "ori.png"))
        outs[p] = d / "ori.png"
    bench = Benchmark("mixed", samples)
    specs = ["dlib", FaceModelSpec("insightface", {"pack": str(pack.folder)}, label="arc-tiny")]
    stats = run_benchmark(bench, [MethodOutputs("gt-copy", outs)], tmp_path / "res", face_models=specs,
                          progress=False)
    assert stats.calls["arc-tiny"]["detect"] == 4 and stats.calls["dlib"]["detect"] == 4
    rows = load_results(tmp_path / "res")
    arc = [r for r in rows if r["face_model"] == "arc-tiny"]
    assert len(arc) == 2 and all(r["status"] == "ok" and r["sim_gt"] == pytest.approx(1.0) for r in arc)
    assert all(r["sim_ref"] is not None and r["sim_ref"] < 0.999 for r in arc)
    # the square fires as several faces: recorded as a face-count mismatch, kept out of CP, Sim still fed
    assert all(r["count_mismatch"] and r["cp"] is None for r in arc)
    assert all(any("face-count mismatch" in i for i in r["issues"]) for r in arc)
    dl = [r for r in rows if r["face_model"] == "dlib"]
    # default: the release's normalisation (‖x‖ + 1e-6), a GT copy lands just above −1
    assert all(r["cp"] == pytest.approx(-1.0, abs=0.01) and not r["count_mismatch"] for r in dl)
    summary = write_reports(tmp_path / "res", gallery=False)
    assert summary["gates"]["arc-tiny"] == list(PAPER_CP_GATE)
    assert summary["leaderboard"]["p1"]["average"]["gt-copy"]["sim_gt"]["mean"] == pytest.approx(1.0)
    assert summary["problem_counts"] == {"face-count mismatch": 2}


def test_worker_processes_give_identical_rows_and_calls(samples_dir, tmp_path):
    s = samples_dir
    people = ("obama", "newton", "scarlett")
    bench = Benchmark("w", [Sample(p, p, [s / p / "2.jpg"], gt=s / p / "1.jpg") for p in people])
    methods = [MethodOutputs("gt", {p: s / p / "1.jpg" for p in people}),
               MethodOutputs("other", {p: s / p / "3.jpg" for p in people})]
    one = run_benchmark(bench, methods, tmp_path / "one", progress=False)
    two = run_benchmark(bench, methods, tmp_path / "two", progress=False, workers=2)
    assert one.calls == two.calls == {"dlib": {"detect": 9, "embed": 9}}
    assert load_results(tmp_path / "one") == load_results(tmp_path / "two")
