"""Face boxes (explicit / layout photo / automatic) and reference preparation, without any generator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from withanyone.errors import FaceCountError
from withanyone.faces import Face
from withanyone.pipeline.layout import auto_boxes, boxes_from_layout, resolve_boxes, validate_boxes
from withanyone.pipeline.references import (
    Reference,
    ReferenceError,
    check_analyzer,
    face_arcface,
    prepare_reference,
    prepare_references,
    square_crop,
)


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


# ---------------------------------------------------------------- automatic placements
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("hw", [(1024, 1024), (768, 1344), (1344, 768), (64, 64)])
def test_auto_boxes_inside_disjoint_and_big_enough(n, hw):
    h, w = hw
    boxes = auto_boxes(n, h, w)
    assert len(boxes) == n
    for b in boxes:
        assert 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h, b
        assert b[2] - b[0] >= 16 - 1e-9 and abs((b[2] - b[0]) - (b[3] - b[1])) < 1e-9  # square, ≥ one patch
    for i in range(n):
        for j in range(i + 1, n):
            assert _overlap(boxes[i], boxes[j]) == 0, (boxes[i], boxes[j])


def test_auto_boxes_rows_follow_aspect_ratio():
    landscape = auto_boxes(4, 768, 1344)
    assert len({round(b[1], 3) for b in landscape}) == 1  # one row
    assert [b[0] for b in landscape] == sorted(b[0] for b in landscape)  # left to right
    portrait = auto_boxes(4, 1344, 768)
    assert len({round(b[1], 3) for b in portrait}) == 2  # two rows of two
    assert auto_boxes(2, 1344, 768)[0][1] == auto_boxes(2, 1344, 768)[1][1]  # two people: one row
    single = auto_boxes(1, 1024, 1024)[0]
    assert single[2] - single[0] == pytest.approx(0.30 * 1024)
    assert (single[0] + single[2]) / 2 == pytest.approx(512) and (single[1] + single[3]) / 2 == pytest.approx(358.4)
    with pytest.raises(ValueError, match="at least one person"):
        auto_boxes(0, 512, 512)


# ---------------------------------------------------------------- explicit boxes
def test_validate_boxes_accepts_and_refuses_with_named_errors():
    ok = validate_boxes([(10, 20, 60, 80), [-30, -30, 20, 20]], 2, 128, 128)  # partly outside is kept (clipped later)
    assert ok == [(10.0, 20.0, 60.0, 80.0), (-30.0, -30.0, 20.0, 20.0)]
    with pytest.raises(ValueError, match=r"holds 1 box\(es\) but there are 2"):
        validate_boxes([(0, 0, 10, 10)], 2, 64, 64)
    with pytest.raises(ValueError, match=r"`boxes`\[0\].*empty: need x2 > x1"):
        validate_boxes([(10, 10, 10, 20)], 1, 64, 64)
    with pytest.raises(ValueError, match=r"y2 > y1"):
        validate_boxes([(10, 30, 20, 20)], 1, 64, 64)
    with pytest.raises(ValueError, match="NaN"):
        validate_boxes([(0, 0, float("nan"), 10)], 1, 64, 64)
    with pytest.raises(ValueError, match="entirely outside the 64x64"):
        validate_boxes([(70, 0, 90, 10)], 1, 64, 64)
    with pytest.raises(ValueError, match=r"\(x1, y1, x2, y2\)"):
        validate_boxes([(1, 2, 3)], 1, 64, 64)
    assert resolve_boxes("auto", 3, 512, 512) == auto_boxes(3, 512, 512)
    assert resolve_boxes(None, 2, 512, 768) == auto_boxes(2, 512, 768)
    assert resolve_boxes(np.array([[1.0, 2.0, 30.0, 40.0]]), 1, 64, 64) == [(1.0, 2.0, 30.0, 40.0)]


# ---------------------------------------------------------------- layout photo
def test_boxes_from_group_photo_match_the_labels(samples_dir, dlib_analyzer):
    labels = json.loads((samples_dir / "labels.json").read_text())
    people = labels["group/1.jpg"]["people"]  # obama left, biden right
    boxes = boxes_from_layout(samples_dir / "group" / "1.jpg", 2, 512, 768, dlib_analyzer)
    assert len(boxes) == 2 and boxes[0][0] < boxes[1][0]
    for box, person in zip(boxes, sorted(people, key=lambda p: p["cx"]), strict=False):
        cx, cy = (box[0] + box[2]) / 2 / 768, (box[1] + box[3]) / 2 / 512
        assert abs(cx - person["cx"]) < 0.05 and abs(cy - person["cy"]) < 0.08, (box, person)
    # resolve_boxes routes a path to the layout-photo mode and validates the result
    assert resolve_boxes(str(samples_dir / "group" / "1.jpg"), 2, 512, 768, dlib_analyzer) == boxes
    with pytest.raises(FaceCountError, match=r"1\.jpg shows 2 face\(s\) but 3 reference"):
        boxes_from_layout(samples_dir / "group" / "1.jpg", 3, 512, 512, dlib_analyzer)


# ---------------------------------------------------------------- references
def test_square_crop_is_square_around_the_box_and_clipped():
    img = np.zeros((100, 200, 3), np.uint8)
    img[20:60, 50:70] = 255  # a 20 wide × 40 tall white box
    crop = square_crop(img, (50, 20, 70, 60), size=64)
    assert crop.shape == (64, 64, 3)
    # the square is 40×40 centred on the box: the white part is the middle half of the columns
    col = crop[32, :, 0]
    assert col[:12].max() < 30 and col[52:].max() < 30 and col[20:44].min() > 225
    edge = square_crop(img, (-10, -10, 30, 30), size=32)  # clipped to the image, still resized
    assert edge.shape == (32, 32, 3)


def test_dlib_embeddings_are_refused_with_the_reason(samples_dir, dlib_analyzer):
    photo = samples_dir / "obama" / "1.jpg"
    with pytest.raises(ReferenceError, match="128-d.*dlib.*512-d ArcFace.*antelopev2"):
        check_analyzer(dlib_analyzer)
    with pytest.raises(ReferenceError, match="128-d.*dlib"):
        prepare_references([photo], dlib_analyzer)
    face = dlib_analyzer.detect(photo)[0]
    with pytest.raises(ReferenceError, match="reference 1.*128-d.*unrelated"):
        prepare_reference(face)
    with pytest.raises(ReferenceError, match="reference 2 is a 128-d embedding"):
        prepare_references([np.ones(512, np.float32), face.embedding])


def test_precomputed_embeddings_and_files(tmp_path):
    vec = np.random.RandomState(0).randn(512).astype(np.float32) * 20
    np.save(tmp_path / "a.npy", vec)
    import torch

    refs = prepare_references([vec, torch.from_numpy(vec), tmp_path / "a.npy", str(tmp_path / "a.npy")])
    for r in refs:
        np.testing.assert_array_equal(r.arcface, vec)  # raw scale kept, not renormalised
        assert r.crop is None
    with pytest.raises(ReferenceError, match="300-d vector; the adapter needs a 512-d"):
        prepare_reference(np.ones(300))
    with pytest.raises(ReferenceError, match="NaN"):
        prepare_reference(np.full(512, np.nan))
    with pytest.raises(ReferenceError, match="SigLIP branch needs the face photo"):
        prepare_reference(vec, need_crop=True)
    with pytest.raises(ReferenceError, match="missing.npy does not exist"):
        prepare_reference(tmp_path / "missing.npy")
    with pytest.raises(ReferenceError, match="no face analyzer"):
        prepare_reference(np.zeros((32, 32, 3), np.uint8))
    ready = Reference(vec, np.zeros((512, 512, 3), np.uint8), source="mine")
    assert prepare_reference(ready, need_crop=True) is ready


def test_face_with_recorded_norm_is_rescaled():
    unit = np.zeros(512, np.float32)
    unit[0] = 1.0
    face = Face(bbox=[0, 0, 10, 10], score=1.0, landmarks=np.zeros((5, 2)), embedding=unit, backend="insightface",
                extra={"embedding_norm": 23.5})
    np.testing.assert_allclose(face_arcface(face), unit * 23.5)
    assert prepare_reference(face).arcface[0] == pytest.approx(23.5)
