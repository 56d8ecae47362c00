"""``withanyone app`` refuses a busy or impossible port and an unknown device in one line before any model
loads; the app's sidecar lists, per person, only the photos that gave the identity (ignored uploads apart, with
the reason shown in the app); layout photos of another aspect than the output keep their face boxes' aspect."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from app_helpers import faceless_photo
from typer.testing import CliRunner

from withanyone.cli import app

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "faces"


@pytest.fixture
def no_models(monkeypatch):
    """Model loading that fails the test if reached."""
    import withanyone.app as app_pkg

    def boom(*a, **k):
        raise AssertionError("models started to load before the arguments were checked")

    monkeypatch.setattr(app_pkg, "load_models", boom)


def _one_error_line(res, *needles: str) -> str:
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_app_refuses_a_busy_port_in_one_line(no_models):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = CliRunner().invoke(app, ["app", "--tiny", "--port", str(port)])
    _one_error_line(res, f"--port {port}", "already in use")


@pytest.mark.parametrize("args, needles", [
    (["--port", "99999"], ["--port 99999", "1–65535"]),
    (["--port", "0"], ["--port 0"]),
    (["--device", "tpu"], ["--device 'tpu'", "cpu"]),
    (["--low-vram", "tiny-gpu"], ["--low-vram 'tiny-gpu'", "model-offload"]),
    (["--host", "no-such-host.invalid"], ["--host no-such-host.invalid"]),
])
def test_app_refuses_bad_values_in_one_line(args, needles, no_models):
    _one_error_line(CliRunner().invoke(app, ["app", "--tiny", *args]), *needles)


def test_app_sidecar_lists_the_photos_used_per_person_not_the_ignored_ones(tmp_path):
    from withanyone.app import LoadOptions, Person, Placement, Studio, load_models

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    wall = faceless_photo(tmp_path / "wall.jpg")
    obama = [str(SAMPLES / "obama" / "1.jpg"), str(empty), str(SAMPLES / "obama" / "2.jpg"), str(wall)]
    biden = [str(corrupt), str(SAMPLES / "biden" / "1.jpg")]
    studio = Studio(load_models(LoadOptions(tiny=True, device="cpu")), tmp_path / "out")
    events = list(studio.generate("a photo of two people", [Person("obama", obama), Person("biden", biden)],
                                  Placement("auto"), height=64, width=64, steps=1, guidance=4.0, seed=2,
                                  siglip_weight=0.0))
    side = json.loads(Path(events[-1]["sidecar_path"]).read_text())
    assert side["references"] == [[obama[0], obama[2]], [biden[1]]]
    ignored = side["ignored_photos"]
    assert [[i["photo"] for i in person] for person in ignored] == [[str(empty), str(wall)], [str(corrupt)]]
    assert "empty" in ignored[0][0]["why"] and "no face found" in ignored[0][1]["why"]
    assert "ignored" in ignored[1][0]["why"]
    assert side["reference_sources"] == ["1.jpg + 2.jpg", "1.jpg"]  # what the merged identities were built from


def _aspect(b) -> float:
    return (b[2] - b[0]) / (b[3] - b[1])


@pytest.mark.parametrize("height, width", [(128, 256), (256, 96), (160, 160)])
def test_layout_boxes_keep_their_aspect_when_the_photo_aspect_differs(height, width, dlib_analyzer):
    """group/1.jpg (landscape) into wide, tall and square outputs: each face box keeps its shape, and the
    letterboxed photo keeps every face inside the output (the pipeline's and the app's mapping alike)."""
    from withanyone.app.people import assign_layout
    from withanyone.faces.image import load_image
    from withanyone.pipeline.layout import boxes_from_layout

    photo = SAMPLES / "group" / "1.jpg"
    h0, w0 = load_image(photo).shape[:2]
    assert abs(w0 / h0 - width / height) > 0.2 or width == height
    faces = sorted(dlib_analyzer.detect(photo, embed=False), key=lambda f: f.center[0])[:2]
    for boxes in (boxes_from_layout(photo, 2, height, width, dlib_analyzer),
                  assign_layout(photo, [None, None], height, width, dlib_analyzer).boxes):
        assert len(boxes) == 2
        for face, box in zip(faces, boxes, strict=True):
            assert _aspect(box) == pytest.approx(_aspect(face.bbox), rel=1e-6)
            assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
        s = min(width / w0, height / h0)
        assert boxes[0][2] - boxes[0][0] == pytest.approx((faces[0].bbox[2] - faces[0].bbox[0]) * s, rel=1e-6)


def test_layout_fit_cover_centre_crops():
    from withanyone.pipeline.layout import layout_box

    # a 1600×1200 photo into 1344×768: contain → scale 0.64, offset (160, 0); cover → scale 0.84, offset (0, -120)
    assert layout_box((0, 0, 200, 200), (1600, 1200), 768, 1344) == pytest.approx((160, 0, 288, 128))
    assert np.allclose(layout_box((800, 600, 1000, 800), (1600, 1200), 768, 1344, fit="cover"),
                       (672, 384, 840, 552))
    with pytest.raises(ValueError, match="fit"):
        layout_box((0, 0, 1, 1), (2, 2), 16, 16, fit="stretch")
