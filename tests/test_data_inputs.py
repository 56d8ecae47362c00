"""build-dataset inputs: the README's multi-tar line, brace/glob patterns, and one-line errors before Ray."""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from withanyone.cli import app
from withanyone.data.ingest import ingest

REPO = Path(__file__).resolve().parents[1]


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def _readme_line() -> str:
    lines = [ln for ln in (REPO / "README.md").read_text().splitlines() if "crawl-{000..099}.tar" in ln]
    assert len(lines) == 1, lines
    return lines[0].split("#")[0].strip()


def test_readme_multi_tar_line_parses_and_ingests(tmp_path, samples_dir):
    line = _readme_line()
    assert line.startswith("withanyone build-dataset ")
    jpg = (samples_dir / "obama" / "1.jpg").read_bytes()
    for k in range(100):
        _tar(tmp_path / f"crawl-{k:03d}.tar", {f"p{k}.jpg": jpg, f"p{k}.json": b'{"search_name": "obama"}'})
    (tmp_path / "extra.csv").write_text("path,search_name\ncrawl-photo.jpg,obama\n")
    (tmp_path / "crawl-photo.jpg").write_bytes(jpg)
    # what bash hands the program for the README's exact line
    argv = subprocess.run(["bash", "-c", "printf '%s\\0' " + line.removeprefix("withanyone ")], cwd=tmp_path,
                          capture_output=True, check=True).stdout.decode().split("\0")[:-1]
    assert argv[:3] == ["build-dataset", "-i", "crawl-000.tar"] and "crawl-099.tar" in argv
    cmd = get_command(app).commands["build-dataset"]
    ctx = cmd.make_context("build-dataset", argv[1:])
    inputs = [*ctx.params["input"], *ctx.params["more"]]
    assert sorted(inputs) == sorted([f"crawl-{k:03d}.tar" for k in range(100)] + ["extra.csv"])
    assert ctx.params["address"] == "ray://head:10001" and ctx.params["out"] == Path("multiid/")
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        items = ingest(inputs)
        quoted = ingest(["crawl-{000..099}.tar", "extra.csv"])  # the same line with the pattern quoted
        globbed = ingest(["crawl-0[0-9][0-9].tar", "extra.csv"])
    finally:
        os.chdir(cwd)
    assert len(items) == 101 and {it.search_name for it in items} == {"obama"}
    assert [it.source for it in quoted] == [it.source for it in globbed]
    assert sorted(it.source for it in quoted) == sorted(it.source for it in items)
    assert quoted[0].source == "crawl-000.tar#p0.jpg" and quoted[-1].source.endswith("crawl-photo.jpg")


def _one_line_error(r, *needles: str) -> str:
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and len([ln for ln in r.output.splitlines() if ln.strip()]) == 1, r.output
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_truncated_tar_is_one_line_error(tmp_path, samples_dir):
    full = _tar(tmp_path / "full.tar", {f"{k}.jpg": (samples_dir / "obama" / f"{k}.jpg").read_bytes()
                                        for k in (1, 2, 3)})
    cut = tmp_path / "crawl-007.tar"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    r = CliRunner().invoke(app, ["build-dataset", "-i", str(cut), "-o", str(tmp_path / "out"), "--no-progress"])
    _one_line_error(r, str(cut), "truncated or damaged tar")


def test_missing_insightface_pack_fails_before_ray(tmp_path, samples_dir):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # an earlier test's session: end it, so "Ray never started" can be checked
        ray.shutdown()
    pack = tmp_path / "no-such-pack"
    r = CliRunner().invoke(app, ["build-dataset", "-i", str(samples_dir), "-o", str(tmp_path / "out"),
                                 "--backend", "insightface", "--pack", str(pack), "--no-progress"])
    err = _one_line_error(r, "--backend insightface", "model pack", str(pack), "not found")
    assert not ray.is_initialized()  # refused before Ray started
    assert re.search(r"no such folder", err)
    r = CliRunner().invoke(app, ["build-dataset", "-i", str(samples_dir), "-o", str(tmp_path / "out"),
                                 "--backend", "mediapipe"])
    _one_line_error(r, "unknown face backend")
    afile = tmp_path / "out.txt"
    afile.write_text("x")
    _one_line_error(CliRunner().invoke(app, ["build-dataset", "-i", str(samples_dir), "-o", str(afile)]),
                    "is a file, not a folder")
    assert json.loads("[]") == []
