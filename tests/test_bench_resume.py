"""Resume is keyed by the content of every input of a row; bench CLI errors are one line, exit 1, at once."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from withanyone.bench.readers import read_folder_layout
from withanyone.bench.report import write_reports
from withanyone.bench.runner import load_results, run_benchmark
from withanyone.cli import app


def _layout(root: Path, s: Path) -> Path:
    """Two one-person samples whose output is a copy of the reference (CP +1 on a faithful metric)."""
    for sid, person in (("s_obama", "obama"), ("s_biden", "biden")):
        d = root / sid
        d.mkdir(parents=True)
        shutil.copyfile(s / person / "1.jpg", d / "ori.jpg")
        shutil.copyfile(s / person / "2.jpg", d / "ref_1.jpg")
        shutil.copyfile(s / person / "2.jpg", d / "out.jpg")
        (d / "meta.json").write_text(json.dumps({"prompt": f"a photo of {person}"}))
    return root


def _cp(out: Path, sample: str) -> float:
    return next(r for r in load_results(out) if r["sample"] == sample)["cp"]


def test_changed_inputs_are_rescored_and_unchanged_reused(tmp_path, samples_dir):
    root = _layout(tmp_path / "bench", samples_dir)
    out = tmp_path / "run"
    bench, m = read_folder_layout(root, method="m")
    first = run_benchmark(bench, [m], out, progress=False)
    assert first.rows_written == 2 and first.rows_rescored == 0
    assert _cp(out, "s_obama") > 0.8  # ref-copy output (the reference is padded before detection: not exactly 1)

    # the method regenerated one output: now a copy of the GT, under the same name
    shutil.copyfile(root / "s_obama" / "ori.jpg", root / "s_obama" / "out.jpg")
    second = run_benchmark(*_reread(root), out, progress=False)
    assert second.rows_rescored == 1 and second.rows_skipped == 1
    assert second.rescore_reasons == {"output image changed": 1}
    assert _cp(out, "s_obama") == pytest.approx(-1.0, abs=0.01)  # not the stale +1
    assert write_reports(out)["rows"] == 2

    # touched but identical bytes: the stat fast path misses, the hash confirms, nothing is rescored
    later = time.time() + 5
    for f in (root / "s_biden").iterdir():
        os.utime(f, (later, later))
    third = run_benchmark(*_reread(root), out, progress=False)
    assert third.rows_written == 0 and third.rows_skipped == 2

    # a new GT and a new prompt are inputs too
    shutil.copyfile(samples_dir / "biden" / "2.jpg", root / "s_biden" / "ori.jpg")
    (root / "s_obama" / "meta.json").write_text(json.dumps({"prompt": "another prompt"}))
    fourth = run_benchmark(*_reread(root), out, progress=False)
    assert fourth.rows_rescored == 2
    assert fourth.rescore_reasons == {"GT changed": 1, "sample metadata changed": 1}

    # another face-model setting (the CP gate) rescored; a row from an older version (no fingerprint) too
    fifth = run_benchmark(*_reread(root), out, face_models=["dlib:gate=0.5/0.5"], progress=False)
    assert fifth.rescore_reasons == {"metric settings changed": 2}
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    rows[-1].pop("inputs")
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sixth = run_benchmark(*_reread(root), out, face_models=["dlib:gate=0.5/0.5"], progress=False)
    assert sixth.rows_rescored == 1
    assert list(sixth.rescore_reasons) == ["no input fingerprint (row written by an older version)"]

    # the CP normalisation is a metric setting: switching it rescores, and the rows record the new mode
    seventh = run_benchmark(*_reread(root), out, face_models=["dlib:gate=0.5/0.5"], progress=False,
                            cp_normalisation="exact")
    assert seventh.rescore_reasons == {"metric settings changed": 2}
    assert {r["cp_normalisation"] for r in load_results(out)} == {"exact"}


def _reread(root: Path):
    bench, m = read_folder_layout(root, method="m")
    return bench, [m]


def test_cli_says_how_many_rows_were_rescored_and_why(tmp_path, samples_dir):
    root = _layout(tmp_path / "bench", samples_dir)
    out = tmp_path / "run"
    args = ["bench", "run", str(root), "--own-method", "m", "--out", str(out), "--clip", "", "--no-progress"]
    assert CliRunner().invoke(app, args).exit_code == 0
    shutil.copyfile(root / "s_biden" / "ori.jpg", root / "s_biden" / "out.jpg")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "1 rows rescored because their inputs changed (output image changed: 1)" in r.output
    # the paper's ArcFace-scale points are never drawn on dlib axes
    _one_line_error(CliRunner().invoke(app, ["bench", "report", str(out), "--paper-points"]),
                    "--paper-points", "dlib only")
    from withanyone.bench.report import paper_point_models, summarize

    assert paper_point_models(summarize(out)) == []
    assert paper_point_models({"face_models": [{"name": "dlib", "backend": "dlib"},
                                               {"name": "arc", "backend": "insightface"}]}) == ["arc"]


def _one_line_error(r, *needles: str) -> str:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith("error: ")]
    assert len(err) == 1, r.output
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_bench_cli_errors_are_one_line(tmp_path, samples_dir):
    root = _layout(tmp_path / "bench", samples_dir)
    runner = CliRunner()
    base = ["bench", "run", str(root), "--clip", "", "--no-progress"]
    missing = tmp_path / "no-such-outputs"
    _one_line_error(runner.invoke(app, [*base, "-m", f"x={missing}", "--out", str(tmp_path / "o1")]),
                    str(missing), "method output folder not found")
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder")
    _one_line_error(runner.invoke(app, [*base, "--out", str(afile)]), str(afile), "is a file, not a folder")
    _one_line_error(runner.invoke(app, [*base, "-m", f"bench={root}", "--out", str(tmp_path / "o2")]),
                    "method name bench given more than once")
    _one_line_error(runner.invoke(app, [*base, "-m", f"a={root}", "-m", f"a={root}", "--out", str(tmp_path / "o3")]),
                    "method name a given more than once")
    _one_line_error(runner.invoke(app, [*base, "--paper-points", "--out", str(tmp_path / "o4")]),
                    "--paper-points", "dlib")
    assert not (tmp_path / "o4").exists()  # refused before any scoring
    _one_line_error(runner.invoke(app, [*base, "-f", "mediapipe", "--out", str(tmp_path / "o5")]),
                    "-f mediapipe: unknown face backend")
    _one_line_error(runner.invoke(app, [*base, "-f", "dlib:gate", "--out", str(tmp_path / "o5")]),
                    "-f dlib:gate", "not key=value")
    pack = tmp_path / "no-pack"
    _one_line_error(runner.invoke(app, [*base, "-f", f"insightface:pack={pack}", "--out", str(tmp_path / "o6")]),
                    f"insightface model pack '{pack}' not found", "(no such folder)")
    _one_line_error(runner.invoke(app, ["bench", "convert", str(root / "s_obama" / "meta.json"), "--out",
                                        str(afile)]), "is a file, not a folder")


@pytest.mark.parametrize("cmd", ["run", "convert"])
def test_mistyped_benchmark_path_fails_at_once(tmp_path, cmd, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    runner = CliRunner()
    out = ["--out", str(tmp_path / "o")]
    t0 = time.perf_counter()
    _one_line_error(runner.invoke(app, ["bench", cmd, str(tmp_path / "multiid-bnech"), *out]),
                    "multiid-bnech", "no such file or folder")
    _one_line_error(runner.invoke(app, ["bench", cmd, "multiid-bnech", *out]), "no such file or folder")
    # reads like a hub id: with --offline it is not looked up either
    err = _one_line_error(runner.invoke(app, ["bench", cmd, "WithAnyone/MultiID-Bnech", "--offline", *out]),
                          "WithAnyone/MultiID-Bnech: no such file or folder", "offline mode is on (--offline)")
    assert err.endswith("not looked up as a hub dataset")
    assert time.perf_counter() - t0 < 3.0  # three commands, each well under a second (27–29 s before)


def test_malformed_meta_json_is_named(tmp_path, samples_dir):
    root = _layout(tmp_path / "bench", samples_dir)
    (root / "s_biden" / "meta.json").write_text('{"prompt": "biden",')
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["bench", "run", str(root), "--own-method", "m", "--out", str(out), "--clip", "",
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert f"warning: {root / 's_biden' / 'meta.json'}: unreadable meta.json" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problem_counts"] == {"malformed meta.json": 1}
    assert "s_biden/meta.json: unreadable meta.json" in (out / "report.md").read_text()


def test_offline_clip_is_skipped_fast_with_the_whole_reason(tmp_path, samples_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = _layout(tmp_path / "bench", samples_dir)
    out = tmp_path / "run"
    import subprocess
    import sys

    # decided before torch/transformers are imported: a fresh interpreter says why in well under a second
    code = ("import time, sys; t = time.perf_counter(); from withanyone.bench.clip_metrics import ClipScorer; "
            "c = ClipScorer('openai/clip-vit-base-patch16'); print(time.perf_counter() - t); "
            "print('transformers' in sys.modules, c.available)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    seconds, flags = res.stdout.split("\n")[:2]
    assert float(seconds) < 1.0 and flags == "False False", res.stdout + res.stderr
    from withanyone.bench.clip_metrics import ClipScorer

    clip = ClipScorer("openai/clip-vit-base-patch16")
    assert not clip.available
    assert clip.reason == ("CLIP weights 'openai/clip-vit-base-patch16' are not in the local Hugging Face cache "
                           "and offline mode is on (HF_HUB_OFFLINE), so no download was tried; pass a local "
                           "folder, or '' to skip this metric")
    r = CliRunner().invoke(app, ["bench", "run", str(root), "--own-method", "m", "--out", str(out),
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    assert clip.reason in (out / "report.md").read_text()
