"""Issue 22 item 12, build-dataset: a run whose every photo failed exits 1 with one line saying so, and a
SIGKILLed run leaves no Ray process behind."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_bench_stale import _env, _kill_run_and_wait

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "faces"


@pytest.mark.slow  # > 20 s; CI runs it (make test SLOW=1)
def test_build_dataset_every_photo_unreadable_exits_1(tmp_path):
    for person in ("alice", "bob"):
        (tmp_path / "in" / person).mkdir(parents=True)
        for k in (1, 2):
            (tmp_path / "in" / person / f"{k}.jpg").write_bytes(b"not a jpeg")
    res = subprocess.run([sys.executable, "-m", "withanyone", "build-dataset", "-i", str(tmp_path / "in"),
                          "--out", str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True,
                         env=_env(), timeout=600)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and err[-1].startswith("error: no training sample written from 4 photos")
    assert "unreadable 4" in err[-1] and (tmp_path / "out" / "report.json").is_file()


@pytest.mark.slow  # > 20 s; CI runs it (make test SLOW=1)
def test_killed_build_dataset_leaves_no_ray_process(tmp_path):
    src = tmp_path / "in"
    for person in ("obama", "newton", "biden", "kit_harington", "alex_lacamoire"):
        shutil.copytree(SAMPLES / person, src / person)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "withanyone", "build-dataset", "-i", str(src), "--out", str(out), "--workers", "2",
           "--unit-size", "1", "--no-progress"]
    left = _kill_run_and_wait(cmd, lambda: any((out / "_work").glob("**/*.npz")) or
                              (out / "_work" / "faces.manifest.jsonl").is_file(), tmp_path)
    assert left == [], left
