"""`withanyone demo --samples` on any labelled folder: both labels.json layouts, any photo names, and every
check it cannot run listed with the reason (it used to refuse group/labels.json and to skip p2 silently)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from withanyone.bench.calibration import calibration_plan
from withanyone.cli import app
from withanyone.faces.labels import find_labels, load_folder_labels


@pytest.fixture
def own_folder(samples_dir: Path, tmp_path: Path) -> Path:
    """A user's folder: two people with photos named a/b (one a PNG), a labelled duo in group/labels.json
    (keys without group/) and an unlabelled group photo."""
    from PIL import Image

    root = tmp_path / "my photos"
    for person in ("obama", "biden"):
        (root / person).mkdir(parents=True)
        shutil.copyfile(samples_dir / person / "1.jpg", root / person / "a.jpg")
        Image.open(samples_dir / person / "2.jpg").save(root / person / "b.png")
    (root / "group").mkdir()
    shutil.copyfile(samples_dir / "group" / "1.jpg", root / "group" / "duo.jpg")
    shutil.copyfile(samples_dir / "group" / "3.jpg", root / "group" / "strangers.jpg")
    top = json.loads((samples_dir / "labels.json").read_text())
    (root / "group" / "labels.json").write_text(json.dumps({"duo.jpg": top["group/1.jpg"]}))
    return root


def test_both_label_layouts_and_the_plan(samples_dir: Path, own_folder: Path):
    assert find_labels(samples_dir) == samples_dir / "labels.json"
    assert find_labels(own_folder) == own_folder / "group" / "labels.json"
    assert list(load_folder_labels(own_folder)) == ["group/duo.jpg"]
    bundled = calibration_plan(samples_dir)
    assert bundled["groups"] == {"group/1.jpg": ("obama", "biden"), "group/3.jpg": ("rose_leslie", "kit_harington")}
    assert {w for w, _ in bundled["skipped"]} == {"group/2.jpg", "group/4.jpg"}  # 3 faces (a child), 6 strangers
    own = calibration_plan(own_folder)
    assert own["groups"] == {"group/duo.jpg": ("obama", "biden")}  # left to right by the labelled centres
    assert own["people"]["biden"] == [own_folder / "biden" / "a.jpg", own_folder / "biden" / "b.png"]
    assert own["skipped"] == []
    shutil.rmtree(own_folder / "biden")
    plan = calibration_plan(own_folder)
    assert plan["groups"] == {} and ("group/duo.jpg", "no folder of ≥ 2 photos for biden") in plan["skipped"]
    assert any(w == "one-person samples" for w, _ in plan["skipped"])


@pytest.mark.slow  # > 20 s; CI runs it (make test SLOW=1)
def test_demo_on_own_folder_runs_the_two_person_checks_and_says_what_it_skipped(own_folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--samples", str(own_folder)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "ok  group/duo.jpg: expected obama, got obama" in lines and "ok  group/duo.jpg: expected biden, got biden" in lines
    assert ("skipped  naming: 1 group photo(s) not in labels.json, named but not checked: group/strangers.jpg"
            in lines)
    for sub in ("p1", "p2"):
        assert f"ok  {sub} ref-copy CP = +1.00: +1.000" in lines and f"ok  {sub} gt-copy CP = -1.00: -1.000" in lines
    assert "(subsets checked: p1, p2)" in res.stdout
    faces = json.loads((out / "faces.json").read_text())
    assert [i["image"] for i in faces["images"]] == ["group/duo.jpg", "group/strangers.jpg"]
    assert faces["all_correct"] is True and len(faces["checks"]) == 2


def test_folder_without_labels_names_faces_and_says_the_checks_were_skipped(own_folder: Path, tmp_path: Path):
    from withanyone.demo import run_faces_demo

    (own_folder / "group" / "labels.json").unlink()
    summary = run_faces_demo(tmp_path / "o", samples=own_folder)
    assert summary["checks"] == [] and summary["all_correct"] is None
    assert summary["checks_skipped"][0]["check"] == "naming" and "no labels.json" in summary["checks_skipped"][0]["reason"]
    duo = next(i for i in summary["images"] if i["image"] == "group/duo.jpg")
    assert sorted(f["name"] for f in duo["faces"]) == ["biden", "obama"]  # still named
    plan = calibration_plan(own_folder)
    assert plan["groups"] == {} and plan["skipped"][0][0] == "two-person samples"
