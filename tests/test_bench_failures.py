"""A corrupted benchmark completes and lists each problem; a killed run resumes to identical numbers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from withanyone.bench.readers import read_folder_layout
from withanyone.bench.report import summarize, write_reports
from withanyone.bench.runner import load_results, run_benchmark

REPO = Path(__file__).resolve().parents[1]
NASTY_PROMPT = 'Obama <b>"bold"</b> & co <script>alert(1)</script>'
NASTY_ID = "odd & <name>"


def _sample(root: Path, sid: str, gt: Path | None, refs: list[Path], out: Path | bytes | None, meta: dict) -> None:
    d = root / sid
    d.mkdir(parents=True)
    if gt is not None:
        shutil.copyfile(gt, d / "ori.jpg")
    for k, r in enumerate(refs, 1):
        shutil.copyfile(r, d / f"ref_{k}.jpg")
    if isinstance(out, bytes):
        (d / "out.jpg").write_bytes(out)
    elif out is not None:
        shutil.copyfile(out, d / "out.jpg")
    (d / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory, samples_dir) -> Path:
    """Authors' layout with one clean sample and one of each problem (the method's outputs are out.jpg)."""
    root = tmp_path_factory.mktemp("corrupted") / "bench"
    s = samples_dir
    gray = root.parent / "gray.jpg"
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(gray)
    _sample(root, "ok_obama", s / "obama/1.jpg", [s / "obama/2.jpg"], s / "obama/3.jpg",
            {"caption_en": NASTY_PROMPT})
    _sample(root, NASTY_ID, s / "yangmi/1.jpg", [s / "yangmi/2.jpg"], s / "yangmi/3.jpg", {"caption_en": "yang mi"})
    # two people promised, only ref_1 on disk
    _sample(root, "missing_ref", s / "group/1.jpg", [s / "obama/2.jpg"], s / "group/1.jpg",
            {"caption_en": "two", "num_persons": 2})
    _sample(root, "bad_output", s / "biden/1.jpg", [s / "biden/2.jpg"], b"\xff\xd8\xff this is not a jpeg",
            {"caption_en": "biden"})
    _sample(root, "no_face_output", s / "kit_harington/1.jpg", [s / "kit_harington/2.jpg"], gray,
            {"caption_en": "kit"})
    _sample(root, "extra_faces", s / "scarlett/1.jpg", [s / "scarlett/2.jpg"], s / "group/4.jpg",
            {"caption_en": "scarlett"})
    _sample(root, "no_output", s / "newton/1.jpg", [s / "newton/2.jpg"], None, {"caption_en": "newton"})
    return root


@pytest.fixture(scope="module")
def corrupted_run(corrupted, tmp_path_factory):
    bench, method = read_folder_layout(corrupted, caption_key="caption_en", method="m")
    out = tmp_path_factory.mktemp("corrupted_run")
    stats = run_benchmark(bench, [method], out, progress=False)
    return bench, method, out, stats, write_reports(out)


def test_corrupted_bench_completes_and_lists_each_problem(corrupted_run):
    bench, method, out, stats, summary = corrupted_run
    assert len(bench) == 7 and "no_output" not in method.outputs
    rows = {r["sample"]: r for r in load_results(out)}
    assert set(rows) == {s.id for s in bench}  # every sample has a row: the run never aborted
    assert rows["ok_obama"]["status"] == "ok" and rows["ok_obama"]["issues"] == []
    assert rows["ok_obama"]["sim_gt"] > 0.93 and rows["ok_obama"]["cp"] is not None
    assert rows["bad_output"]["status"] == "failed" and "output unreadable" in rows["bad_output"]["reason"]
    assert "out.jpg" in rows["bad_output"]["reason"]  # names the file
    assert rows["no_face_output"]["status"] == "failed" and rows["no_face_output"]["reason"] == "no face in output"
    assert rows["no_output"]["status"] == "failed" and "no output" in rows["no_output"]["reason"]
    ex = rows["extra_faces"]
    assert ex["status"] == "ok" and ex["count_mismatch"] and ex["out_faces"] >= 4
    assert any("face-count mismatch" in i for i in ex["issues"])
    assert ex["sim_gt"] is not None and ex["cp"] is None  # fed Sim, kept out of CP
    mr = rows["missing_ref"]
    assert any("reference 2" in i and "no such file" in i and "ref_2.jpg" in i for i in mr["issues"])
    assert mr["sim_gt"] == pytest.approx(1.0) and mr["cp"] is None  # output = GT; CP needs both refs
    kinds = summary["problem_counts"]
    for k in ("unreadable image", "no face in output", "missing output", "face-count mismatch", "missing file"):
        assert kinds.get(k, 0) >= 1, (k, kinds)
    p1 = summary["leaderboard"]["p1"]["dlib"]["m"]
    assert p1["samples"] == 6 and p1["failed"] == 3
    assert p1["sim_gt"]["n"] == 3  # ok_obama, the odd id, extra_faces
    md = (out / "report.md").read_text()
    for sid in ("bad_output", "no_face_output", "extra_faces", "missing_ref", "no_output"):
        assert sid in md


def test_report_escapes_prompts_and_names(corrupted_run):
    out = corrupted_run[2]
    html = (out / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html and "<b>\"bold\"</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "odd &amp; &lt;name&gt;" in html and "odd & <name>" not in html
    assert html.count("<script>") == 1  # only the report's own sorting script


def _cli(out: Path, bench: Path) -> list[str]:
    return [sys.executable, "-m", "withanyone", "bench", "run", str(bench), "--out", str(out),
            "--caption-key", "caption_en", "--own-method", "m", "--no-progress", "--offline"]


def _strip(summary: dict) -> dict:
    return json.loads(json.dumps(summary))


def test_kill_and_resume_gives_identical_summary(corrupted, corrupted_run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(out, corrupted), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    results = out / "results.jsonl"
    deadline = time.time() + 240
    n = 0
    while time.time() < deadline and proc.poll() is None:
        n = results.read_bytes().count(b"\n") if results.is_file() else 0
        if n >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    n = results.read_bytes().count(b"\n")
    assert 2 <= n < 7, n  # killed mid-run
    with open(results, "ab") as f:  # and a torn half-written line, as a crash mid-write leaves
        f.write(b'{"sample": "torn", "method": "m", "face_mo')
    res = subprocess.run(_cli(out, corrupted), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "reused" in res.stderr
    resumed = json.loads((out / "summary.json").read_text())
    uninterrupted = _strip(summarize(corrupted_run[2]))
    assert resumed["leaderboard"] == uninterrupted["leaderboard"]
    assert resumed["failures"] == uninterrupted["failures"]
    assert resumed["problem_counts"] == uninterrupted["problem_counts"]
    assert len(load_results(out)) == 7


def test_partial_run_then_resume_in_process(corrupted, corrupted_run, tmp_path):
    bench, method = read_folder_layout(corrupted, caption_key="caption_en", method="m")
    out = tmp_path / "partial"
    first = run_benchmark(bench, [method], out, progress=False, max_rows=3)
    assert first.rows_written == 3
    second = run_benchmark(bench, [method], out, progress=False)
    assert second.rows_written == 4 and second.rows_skipped == 3
    assert _strip(summarize(out))["leaderboard"] == _strip(summarize(corrupted_run[2]))["leaderboard"]
