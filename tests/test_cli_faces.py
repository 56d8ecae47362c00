"""`withanyone faces` and `withanyone demo` from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from withanyone.cli import app


def test_faces_cli_names_people_and_draws(shared_faces: Path, samples_dir: Path, tmp_path: Path):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for name in ("obama", "biden"):
        (gallery / name).symlink_to(samples_dir / name, target_is_directory=True)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    out_png = tmp_path / "drawn"
    res = CliRunner().invoke(app, ["faces", str(samples_dir / "group" / "1.jpg"), str(bad), "--gallery",
                                   str(gallery), "--json", "--draw", str(out_png)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("["):])
    assert report[1]["error"] == "file is empty (0 bytes)" and report[1]["image"] == str(bad)
    names = sorted(f["name"] for f in report[0]["faces"])
    assert names == ["biden", "obama"]
    assert all(len(f["landmarks"]) == 5 and "embedding" not in f for f in report[0]["faces"])
    drawn = Image.open(out_png / "1.png")
    assert drawn.size == Image.open(samples_dir / "group" / "1.jpg").size


def test_faces_cli_table_output(samples_dir: Path):
    res = CliRunner().invoke(app, ["faces", str(samples_dir / "obama" / "1.jpg")])
    assert res.exit_code == 0, res.output
    assert "obama" in res.stdout and "dlib" in res.stdout


def test_demo_names_everyone_in_the_bundled_photos(tmp_path: Path):
    from withanyone.demo import run_faces_demo

    summary = run_faces_demo(tmp_path)
    assert summary["all_correct"], [c for c in summary["checks"] if not c["ok"]]
    assert sum(c["expected"] is not None for c in summary["checks"]) == 6
    assert (tmp_path / "faces.json").is_file() and (tmp_path / "4.png").is_file()


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "withanyone", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "faces" in out.stdout


def test_demo_names_everyone_in_the_full_size_shared_photos(shared_faces: Path, tmp_path: Path):
    from withanyone.demo import run_faces_demo

    summary = run_faces_demo(tmp_path, samples=shared_faces)
    assert summary["all_correct"], [c for c in summary["checks"] if not c["ok"]]
    assert sum(c["expected"] is not None for c in summary["checks"]) == 6
    assert set(summary["gallery"]) >= {"obama", "biden", "kit_harington", "rose_leslie"}


def test_demo_command_refuses_a_folder_without_labels(tmp_path: Path):
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "o"), "--samples", str(tmp_path)])
    assert res.exit_code != 0 and "labels.json" in res.output
