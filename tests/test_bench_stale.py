"""Issue 22: no stale generations or scores, one-line errors, oracles that score what the docs say,
failed runs that say so (exit 1), and no Ray process outliving a killed run.

The benchmark is built from the photos bundled in ``samples/faces`` (no ``../shared`` needed): two one-person
samples and one two-person sample whose references are shrunk so their padded squares side by side fit
dlib's detector unscaled (as the demo's calibration benchmark does).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "faces"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO / "src"), MPLBACKEND="Agg", RAY_DEDUP_LOGS="0")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "withanyone", *args], capture_output=True, text=True,
                          env=_env(), timeout=600)


def _one_line_error(res: subprocess.CompletedProcess, *words: str) -> None:
    err = res.stderr.strip()
    assert res.returncode == 1, (res.returncode, res.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err and err.startswith("error:") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def _last_line_error(res: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 1, no traceback, the last line of stderr one ``error:`` line (after the run's own output)."""
    err = res.stderr.strip()
    assert res.returncode == 1, (res.returncode, res.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error:"), err
    for w in words:
        assert w in err.splitlines()[-1], err


def build_bench(root: Path) -> Path:
    """Authors' layout: p1_obama, p1_newton (GT photo 1, reference photo 2) and p2_group1 (obama, biden)."""
    for person in ("obama", "newton"):
        d = root / f"p1_{person}"
        d.mkdir(parents=True)
        (d / "ori.jpg").write_bytes((SAMPLES / person / "1.jpg").read_bytes())
        (d / "ref_1.jpg").write_bytes((SAMPLES / person / "2.jpg").read_bytes())
        (d / "meta.json").write_text(json.dumps({"prompt": f"a photo of {person}", "num_persons": 1}))
    d = root / "p2_group1"
    d.mkdir(parents=True)
    (d / "ori.jpg").write_bytes((SAMPLES / "group" / "1.jpg").read_bytes())
    for k, person in enumerate(("obama", "biden"), 1):
        im = Image.open(SAMPLES / person / "2.jpg").convert("RGB")
        im.thumbnail((333, 333), Image.LANCZOS)  # padded squares side by side: 1000 px, dlib sees them unscaled
        im.save(d / f"ref_{k}.jpg", quality=95)
    (d / "meta.json").write_text(json.dumps({"prompt": "obama and biden", "num_persons": 2}))
    return root


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    return build_bench(tmp_path_factory.mktemp("stale") / "bench")


@pytest.fixture(scope="module")
def bench(bench_dir):
    from withanyone.bench.readers import read_folder_layout

    return read_folder_layout(bench_dir, output_name=None)[0]


# ----------------------------------------------------------------------------- 1: stale generations


def test_generate_rerun_with_other_settings_regenerates(bench, tmp_path):
    """A rerun into the same --out with another seed (or size) regenerates, says why; same settings = done."""
    from withanyone.bench.generate import MethodSpec, generate, read_sidecar, sample_seed

    spec = MethodSpec(pipeline="tests_stale_methods:SeedNoise")
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        s0 = generate(bench, tmp_path, "noise", spec, seed=0, long_side=32, progress=False)
        assert (s0.generated, s0.skipped, s0.regenerated) == (3, 0, 0)
        first = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
        same = generate(bench, tmp_path, "noise", spec, seed=0, long_side=32, progress=False)
        assert (same.generated, same.skipped, same.regenerated) == (0, 3, 0)

        s1 = generate(bench, tmp_path, "noise", spec, seed=1, long_side=32, progress=False)
        assert (s1.generated, s1.skipped, s1.regenerated) == (3, 0, 3)
        assert s1.regenerate_reasons == {"seed": 3}
        for p in tmp_path.glob("*.png"):
            assert p.read_bytes() != first[p.name], p.name
            assert read_sidecar(tmp_path, p.stem)["seed"] == sample_seed(1, p.stem)

        s2 = generate(bench, tmp_path, "noise", spec, seed=1, long_side=48, progress=False)
        assert (s2.regenerated, s2.regenerate_reasons) == (3, {"size": 3})
        assert {Image.open(p).size[0] <= 48 and max(Image.open(p).size) == 48 for p in tmp_path.glob("*.png")} \
            == {True}

        s3 = generate(bench, tmp_path, "noise", spec, seed=1, long_side=48, limit=1, progress=False)
        assert (s3.generated, s3.skipped, s3.other_settings_kept) == (0, 1, 0)
    finally:
        sys.path.remove(str(Path(__file__).parent))


def test_generate_cli_says_how_many_were_regenerated(bench_dir, tmp_path):
    out = tmp_path / "gt"
    args = ["bench", "generate", str(bench_dir), "-m", "gt", "--pipeline", "withanyone.bench.oracles:gt_copy",
            "--out", str(out), "--no-progress", "--size", "64"]
    assert _cli(*args).returncode == 0
    res = _cli(*args[:-1], "96")
    assert res.returncode == 0, res.stderr
    assert "0 already done" in res.stdout and "3 generated" in res.stdout, res.stdout
    assert "3 output(s) made with other settings were generated again (size: 3)" in res.stderr, res.stderr
    assert json.loads((out / "p1_obama.json").read_text())["width"] <= 96


# ------------------------------------------------------------------------------- 3: one-line errors


def test_generate_and_reproduce_out_is_a_file(bench_dir, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    gen = ["--pipeline", "withanyone.bench.oracles:gt_copy", "--no-progress"]
    _one_line_error(_cli("bench", "generate", str(bench_dir), "-m", "gt", "--out", str(f), *gen), str(f), "file")
    _one_line_error(_cli("bench", "reproduce", str(bench_dir), "-m", "gt", "--out", str(f), *gen), str(f), "file")
    assert f.read_text() == "x"


def test_reproduce_bad_face_model_fails_before_generating(bench_dir, tmp_path):
    res = _cli("bench", "reproduce", str(bench_dir), "-m", "gt", "--out", str(tmp_path / "r"), "-f", "foo",
               "--pipeline", "withanyone.bench.oracles:gt_copy", "--no-progress")
    _one_line_error(res, "-f foo", "unknown face backend")
    assert not (tmp_path / "r" / "outputs").exists()


# --------------------------------------------------------------------------- 5: reference_copy oracle


def test_reference_copy_oracle_scores_cp_plus_one_on_one_and_two_people(bench, tmp_path):
    from withanyone.bench.generate import MethodSpec
    from withanyone.bench.reproduce import reproduce

    _, summary, _ = reproduce(bench, "ref", tmp_path, MethodSpec(pipeline="withanyone.bench.oracles:reference_copy"),
                              cp_normalisation="exact", progress=False, long_side=64)
    board = summary["leaderboard"]
    p1, p2 = board["p1"]["dlib"]["ref"]["cp_all"], board["p2"]["dlib"]["ref"]["cp_all"]
    assert p1["n"] == 2 and abs(p1["mean"] - 1.0) < 1e-6, p1
    assert p2["n"] == 1 and abs(p2["mean"] - 1.0) < 1e-6, p2


# ---------------------------------------------------------------------------------- 2: stale scores


def test_report_leaves_out_rows_whose_outputs_changed(bench, bench_dir, tmp_path):
    """Method B scored, then its output replaced by another person's photo, then a run of A only: the report
    must not show B's old Sim(GT) for that sample; it lists the row as stale; rescoring B clears it."""
    from withanyone.bench.readers import read_method_outputs
    from withanyone.bench.report import write_reports
    from withanyone.bench.runner import run_benchmark

    ids = [s.id for s in bench]
    for m in ("A", "B"):
        (tmp_path / m).mkdir()
        for sid in ids:
            (tmp_path / m / f"{sid}.jpg").write_bytes((bench_dir / sid / "ori.jpg").read_bytes())
    res = tmp_path / "res"
    methods = [read_method_outputs(tmp_path / m, m, sample_ids=ids) for m in ("A", "B")]
    run_benchmark(bench, methods, res, progress=False)
    board = write_reports(res, gallery=False)["leaderboard"]["p1"]["dlib"]
    assert board["B"]["sim_gt"]["n"] == 2 and board["B"]["sim_gt"]["mean"] > 0.999

    (tmp_path / "B" / "p1_obama.jpg").write_bytes((bench_dir / "p1_newton" / "ori.jpg").read_bytes())
    run_benchmark(bench, methods[:1], res, progress=False)
    summary = write_reports(res)
    assert summary["stale"] == [{"sample": "p1_obama", "method": "B", "face_model": "dlib",
                                 "why": ["output image changed"]}]
    b = summary["leaderboard"]["p1"]["dlib"]["B"]["sim_gt"]
    assert b["n"] == 1 and b["mean"] > 0.999  # only p1_newton, still current
    md, page = (res / "report.md").read_text(), (res / "report.html").read_text()
    assert "Stale rows (not in the tables)" in md and "stale p1_obama · B · dlib: output image changed" in md
    assert "<div class='stale' id='stale'>" in page and "p1_obama · B · dlib: output image changed" in page
    assert json.loads((res / "summary.json").read_text())["stale_methods"] == {"B": {"output image changed": 1}}
    if importlib.util.find_spec("gradio") is not None:  # the app's Bench explorer reads the same rows
        from withanyone.app.bench_explorer import BenchResults

        explorer = BenchResults(res)
        assert [(r["sample"], r["method"]) for r in explorer.stale] == [("p1_obama", "B")]
        assert ("p1_obama", "B") not in {(r["sample"], r["method"]) for r in explorer.rows}
        assert [v.method for v in explorer.sample("p1_obama", "dlib")[1]] == ["A"]

    run_benchmark(bench, methods[1:], res, progress=False)
    summary = write_reports(res, gallery=False)
    b = summary["leaderboard"]["p1"]["dlib"]["B"]["sim_gt"]
    assert summary["stale"] == [] and b["n"] == 2 and b["mean"] < 0.97
    assert "Stale rows" not in (res / "report.md").read_text()


def test_bench_run_cli_warns_about_stale_rows_and_fails_when_every_row_failed(bench_dir, tmp_path):
    res = tmp_path / "res"
    good, empty = tmp_path / "good", tmp_path / "empty"
    good.mkdir()
    empty.mkdir()
    for sid in ("p1_obama", "p1_newton", "p2_group1"):
        (good / f"{sid}.jpg").write_bytes((bench_dir / sid / "ori.jpg").read_bytes())
    run = ["bench", "run", str(bench_dir), "--out", str(res), "--clip", "", "--no-progress"]
    assert _cli(*run, "-m", f"good={good}").returncode == 0
    (good / "p1_newton.jpg").write_bytes((bench_dir / "p1_obama" / "ori.jpg").read_bytes())
    r = _cli(*run, "-m", f"empty={empty}")
    _last_line_error(r, "every row of this run failed: none could be scored (3 of 3)", "no output")
    assert "warning: STALE: 1 scored rows" in r.stderr and "good (1 rows: output image changed 1)" in r.stderr
    assert (res / "report.html").is_file()  # the reports are still written, for a look at what failed


# ------------------------------------------------------------------------------ 12: Ray dies with us


def _marked(mark: str) -> list[int]:
    """PIDs of processes whose environment carries ``WITHANYONE_TEST_MARK=mark`` (this test's run)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("WITHANYONE_TEST_MARK") == mark:
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


def _kill_run_and_wait(cmd: list[str], ready, tmp_path: Path) -> list[str]:
    """Start ``cmd`` (its own session, marked), SIGKILL only the driver once ``ready()``; returns what is left
    of the run's processes 8 s later (and kills those, so nothing outlives the test)."""
    import signal
    import time
    import uuid

    import psutil

    mark = uuid.uuid4().hex
    env = dict(_env(), WITHANYONE_TEST_MARK=mark,
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(Path(__file__).parent)]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr", "w"),
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        assert any(p != proc.pid for p in _marked(mark)), "no Ray process seen"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 8
        while time.time() < deadline and _marked(mark):
            time.sleep(0.5)
    finally:
        left = []
        for pid in _marked(mark):
            try:
                p = psutil.Process(pid)
                left.append(" ".join(p.cmdline())[:80])
                p.kill()
            except psutil.Error:
                pass
    return left


def test_killed_generate_leaves_no_ray_process(bench_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "withanyone", "bench", "generate", str(bench_dir), "-m", "slow", "--pipeline",
           "tests_stale_methods:SlowNoise", "--workers", "2", "--size", "32", "--no-progress", "--out", str(out)]
    left = _kill_run_and_wait(cmd, lambda: (out / "generate.log.jsonl").is_file(), tmp_path)
    assert left == [], left
