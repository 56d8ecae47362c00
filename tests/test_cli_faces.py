"""`withanyone faces` and `withanyone demo` from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from withanyone.cli import app


def test_faces_cli_names_people_and_draws(samples_dir: Path, tmp_path: Path):
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
    from withanyone.faces.cli import relative_names

    drawn = Image.open(out_png / Path(relative_names([samples_dir / "group" / "1.jpg", bad])[0]).with_suffix(".png"))
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


def test_demo_names_everyone_in_every_real_photo(real_faces: Path, tmp_path: Path):
    """The full-size ../shared photos where present, else the bundled copies."""
    from withanyone.demo import run_faces_demo

    summary = run_faces_demo(tmp_path, samples=real_faces)
    assert summary["all_correct"], [c for c in summary["checks"] if not c["ok"]]
    assert sum(c["expected"] is not None for c in summary["checks"]) == 6
    assert set(summary["gallery"]) >= {"obama", "biden", "kit_harington", "rose_leslie"}


def test_demo_command_refuses_a_missing_or_empty_folder_in_one_line(tmp_path: Path):
    for folder, why in ((tmp_path / "nope", "folder not found"), (tmp_path, "no <person>/<photo> image files")):
        res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "o"), "--samples", str(folder)])
        assert _one_line_error(res) == f"error: --samples {folder}: {why}" + (
            " (want <person>/<n>.jpg photos, optionally group/<n>.jpg with labels.json at the top or in group/)"
            if why == "folder not found" else " (the gallery the demo names faces against)")


# ---------------------------------------------------------------- bad input: one line, exit 1, no traceback
def _one_line_error(res) -> str:
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), res.exception  # not an uncaught exception (traceback)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


def test_faces_cli_bad_gallery_backend_or_pack_is_one_line(samples_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "if-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    photo = str(samples_dir / "obama" / "1.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "people" / "nobody").mkdir(parents=True)
    run = CliRunner().invoke
    assert str(tmp_path / "absent") in _one_line_error(run(app, ["faces", photo, "--gallery", str(tmp_path / "absent")]))
    assert "no <person>/<photo> image files" in _one_line_error(run(app, ["faces", photo, "--gallery",
                                                                          str(tmp_path / "empty")]))
    assert "no <person>/<photo> image files" in _one_line_error(run(app, ["faces", photo, "--gallery",
                                                                          str(tmp_path / "people")]))
    assert "unknown face backend 'nope'" in _one_line_error(run(app, ["faces", photo, "--backend", "nope"]))
    msg = _one_line_error(run(app, ["faces", photo, "--backend", "insightface", "--pack", str(tmp_path / "nopack")]))
    assert str(tmp_path / "nopack") in msg and "not found" in msg
    assert "antelopev2" in _one_line_error(run(app, ["faces", photo, "--backend", "insightface"]))


# ---------------------------------------------------------------- outputs
def test_draw_keeps_relative_paths_so_same_stems_do_not_collide(samples_dir: Path, tmp_path: Path):
    images = [samples_dir / p / "1.jpg" for p in ("obama", "biden", "group")]
    res = CliRunner().invoke(app, ["faces", *map(str, images), "--draw", str(tmp_path / "drawn")])
    assert res.exit_code == 0, res.output
    for img in images:
        out = tmp_path / "drawn" / img.parent.name / "1.png"
        assert Image.open(out).size == Image.open(img).size
    assert not (tmp_path / "drawn" / "1.png").exists()


def test_results_are_written_before_drawing(samples_dir: Path, tmp_path: Path):
    photo = samples_dir / "obama" / "1.jpg"
    # a folder without an extension, for one image: the PNG goes inside it
    res = CliRunner().invoke(app, ["faces", str(photo), "--draw", str(tmp_path / "folder"),
                                   "--out-json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "folder" / "1.png").is_file() and json.loads((tmp_path / "r.json").read_text())[0]["faces"]
    # drawing cannot happen (the target's parent is a file): the results are still there, then exit 1
    (tmp_path / "blocker").write_text("a file")
    res = CliRunner().invoke(app, ["faces", str(photo), "--json", "--draw", str(tmp_path / "blocker" / "x.png"),
                                   "--out-json", str(tmp_path / "r2.json")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert json.loads(res.stdout)[0]["image"] == str(photo)
    assert json.loads((tmp_path / "r2.json").read_text())[0]["faces"]
    assert "cannot draw" in res.stderr
    # --out-json that cannot be written: one line, exit 1
    res = CliRunner().invoke(app, ["faces", str(photo), "--out-json", str(tmp_path / "blocker" / "r.json")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: --out-json {tmp_path / 'blocker' / 'r.json'}")


def test_exit_1_when_every_input_failed(tmp_path: Path):
    bad = [tmp_path / "a.jpg", tmp_path / "b.png"]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(b"not an image")
    res = CliRunner().invoke(app, ["faces", *map(str, bad), "--json", "--out-json", str(tmp_path / "r.json")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [e["image"] for e in report] == list(map(str, bad)) and all(e["error"] for e in report)
    assert "2 of 2 image(s) could not be read" in res.stderr


def test_table_at_80_columns_tells_rows_apart(samples_dir: Path, tmp_path: Path):
    deep = tmp_path / "a-rather-long-folder-name" / "another-long-folder-name-for-the-photos"
    deep.mkdir(parents=True)
    for person in ("obama", "biden", "group"):
        (deep / person).symlink_to(samples_dir / person, target_is_directory=True)
    images = [str(deep / p / "1.jpg") for p in ("obama", "biden", "group")]
    res = CliRunner().invoke(app, ["faces", *images], env={"COLUMNS": "80"}, terminal_width=80)
    assert res.exit_code == 0, res.output
    assert max(len(line) for line in res.stdout.splitlines()) <= 80
    for name in ("obama/1.jpg", "biden/1.jpg", "group/1.jpg"):
        assert name in res.stdout, res.stdout
    assert "…" not in res.stdout


def test_progress_bars_are_labelled_gallery_faces_and_drawing(samples_dir: Path, tmp_path: Path, monkeypatch):
    import withanyone.progress as progress

    seen: list[tuple[str, bool]] = []
    real = progress.track

    def spy(items, total=None, description="working", enabled=True):
        seen.append((description, enabled))
        return real(items, total=total, description=description, enabled=False)

    monkeypatch.setattr(progress, "track", spy)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for name in ("obama", "biden"):
        (gallery / name).symlink_to(samples_dir / name, target_is_directory=True)
    images = [str(samples_dir / p / "1.jpg") for p in ("obama", "group")]
    res = CliRunner().invoke(app, ["faces", *images, "--gallery", str(gallery), "--draw", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert seen == [("gallery", True), ("faces", True), ("drawing", True)]


# ---------------------------------------------------------------- galleries
def test_gallery_skips_multi_face_no_face_and_unreadable_photos(samples_dir: Path, tmp_path: Path,
                                                                 dlib_analyzer):
    from withanyone.faces import Gallery

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for name in ("obama", "biden", "group"):
        (gallery / name).symlink_to(samples_dir / name, target_is_directory=True)
    (gallery / "nobody").mkdir()
    Image.new("RGB", (200, 200), (128, 128, 128)).save(gallery / "nobody" / "blank.png")
    (gallery / "nobody" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    gal = Gallery.from_folder(gallery, dlib_analyzer)
    assert sorted(gal.names) == ["biden", "obama"]  # group/ is not a person
    assert gal.dropped == ["group", "nobody"]
    reasons = {str(Path(s).relative_to(gallery)): r for s, r in gal.skipped}
    n_group = len(list((samples_dir / "group").glob("*.jpg")))
    assert sum(k.startswith("group/") and "faces: cannot tell which one is 'group'" in r
               for k, r in reasons.items()) == n_group
    assert reasons["nobody/blank.png"] == "no face found"
    assert "corrupt" in reasons["nobody/broken.jpg"]
    res = CliRunner().invoke(app, ["faces", str(samples_dir / "group" / "1.jpg"), "--gallery", str(gallery)])
    assert res.exit_code == 0, res.output
    assert f"gallery: {len(reasons)} photo(s) not enrolled" in res.stderr
    assert "group/1.jpg: 2 faces" in res.stderr and "nobody/blank.png: no face found" in res.stderr
    assert "no enrolled photo for group, nobody" in res.stderr
    assert "│ group " not in res.stdout.replace("┃", "│")  # nobody is named "group"


def test_min_score_option_reaches_the_detector(shared_faces: Path):
    photo = str(shared_faces / "scarlett" / "1.jpg")  # a real face (2.18) and an ear (0.21)
    default = CliRunner().invoke(app, ["faces", photo, "--json"])
    loose = CliRunner().invoke(app, ["faces", photo, "--json", "--min-score", "-0.2"])
    assert default.exit_code == 0 and loose.exit_code == 0, default.output + loose.output
    assert len(json.loads(default.stdout)[0]["faces"]) == 1 and len(json.loads(loose.stdout)[0]["faces"]) == 2
