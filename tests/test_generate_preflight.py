"""``withanyone generate`` checks everything cheap before FLUX loads (about 35 GB with real weights): bad
--box / --device / --out / --dtype values, reference photos without a face and layout photos with too few faces
give one ``error:`` line and exit 1, and the loaders are never reached (they are replaced by ones that fail)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from withanyone.cli import app
from withanyone.pipeline import tiny as tiny_module
from withanyone.pipeline.pipeline import WithAnyonePipeline

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "faces"
OBAMA = str(SAMPLES / "obama" / "1.jpg")


@pytest.fixture
def no_loading(monkeypatch):
    """FLUX loaders that fail the test if reached."""
    def boom(*a, **k):
        raise AssertionError("a model started to load before the arguments were checked")

    monkeypatch.setattr(WithAnyonePipeline, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(tiny_module, "tiny_pipeline", boom)


@pytest.fixture(scope="module")
def faceless(tmp_path_factory):
    """A smooth gradient photo: no face for dlib or the tiny insightface pack."""
    path = tmp_path_factory.mktemp("faceless") / "wall.jpg"
    y, x = np.mgrid[0:240, 0:320]
    Image.fromarray(np.stack([x * 0.7, y, (x + y) * 0.4], -1).astype(np.uint8)).save(path)
    return path


def _run(*args: str):
    return CliRunner().invoke(app, ["generate", "-p", "two people", "--no-progress", *args])


def _one_error_line(res, *needles: str) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("args, needles", [
    (["--box", "100,100,50,200"], ["--box 100,100,50,200", "x2 > x1"]),
    (["--box", "10,10,60"], ["--box", "x1,y1,x2,y2"]),
    (["--box", "2000,10,2100,80"], ["--box 2000,10,2100,80", "outside the 1024x1024"]),
    (["--device", "tpu"], ["--device 'tpu'", "cpu"]),
    (["--dtype", "int8"], ["--dtype 'int8'", "bfloat16"]),
    (["--steps", "0"], ["--steps 0"]),
    (["--height", "1000"], ["--height 1000", "multiple of 16"]),
])
def test_bad_values_fail_in_one_line_before_the_base_is_touched(args, needles, no_loading, tmp_path):
    res = _run("-r", OBAMA, "--base", str(tmp_path / "no-flux"), "-o", str(tmp_path / "o.png"), *args)
    line = _one_error_line(res, *needles)
    assert "no-flux" not in line  # the bad value is named, not the (also missing) base
    assert not (tmp_path / "o.png").exists()


def test_an_output_path_that_is_a_folder_or_not_an_image_is_refused(no_loading, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    _one_error_line(_run("-r", OBAMA, "--base", str(tmp_path / "no-flux"), "-o", str(folder)),
                    f"--out {folder}", "is a folder")
    _one_error_line(_run("-r", OBAMA, "--tiny", "-o", str(tmp_path / "x.txt")), "--out", ".txt")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _one_error_line(_run("-r", OBAMA, "--tiny", "-o", str(blocker / "x.png")), f"{blocker} is a file")
    assert list(folder.iterdir()) == []


def test_a_cuda_device_on_a_machine_without_one_is_named(no_loading, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _one_error_line(_run("-r", OBAMA, "--tiny", "--device", "cuda", "-o", str(tmp_path / "o.png")),
                    "--device cuda", "no CUDA")


def test_a_reference_without_a_face_fails_before_the_tiny_model_builds(no_loading, faceless, tmp_path):
    _one_error_line(_run("--tiny", "-r", OBAMA, "-r", str(faceless), "-o", str(tmp_path / "o.png")),
                    "reference 2", "no face found", str(faceless))
    _one_error_line(_run("--tiny", "-r", OBAMA, "-r", OBAMA, "--layout", OBAMA, "-o", str(tmp_path / "o.png")),
                    "layout photo", "1 face(s)", "2 reference(s)")


def test_a_reference_without_a_face_fails_before_flux_loads(no_loading, faceless, tmp_path):
    """Real mode: a FLUX folder that passes the file check, an insightface pack (tiny) that finds no face."""
    from diffusers import FluxPipeline
    from tiny_models.insightface_pack import build_tiny_pack
    from tiny_models.pipeline import get_dummy_components

    FluxPipeline(**get_dummy_components()).save_pretrained(tmp_path / "flux")
    pack = build_tiny_pack(tmp_path / "pack" / "antelopev2", extras=False)
    res = _run("-r", str(faceless), "--base", str(tmp_path / "flux"), "--face-pack", str(pack.folder),
               "-o", str(tmp_path / "o.png"), "--height", "64", "--width", "64")
    _one_error_line(res, "reference 1", "no face found", str(faceless))
    missing = _run("-r", str(faceless), "--base", str(tmp_path / "no-flux"), "-o", str(tmp_path / "o.png"))
    _one_error_line(missing, "no-flux")  # a missing base is found by its files, still before any load
