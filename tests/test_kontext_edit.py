"""Edit preprocessing (withanyone.pipeline.edit) against the release's arithmetic, written out here.

The ``release_*`` functions restate, in this test's own code, what the release's ``util.face_preserving_resize``
(two faces: it reads boxes 0 and 1), ``gradio_edit.resize_bbox`` and ``gradio_edit.blur_faces_in_image`` compute,
including their int truncations and the module-level ``random.randint`` crop draw. Ours must give the same crop,
boxes and pixels on photos with two faces.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from withanyone.pipeline.edit import (
    EditError,
    blur_faces,
    detect_faces,
    kontext_resolution,
    map_boxes,
    photo_sha256,
    prepare_edit,
    square_around_faces,
)


# ---------------------------------------------------------------- the release's arithmetic, restated
def release_square(img, two_boxes, target=512):
    """face_preserving_resize for exactly two faces; None when they cannot fit."""
    a = [int(v) for v in two_boxes[0]]
    b = [int(v) for v in two_boxes[1]]
    lo_x, lo_y = min(a[0], b[0]), min(a[1], b[1])
    hi_x, hi_y = max(a[2], b[2]), max(a[3], b[3])
    if min(lo_x, lo_y, hi_x, hi_y) < 0:
        return None, None
    if hi_x - lo_x > img.height or hi_y - lo_y > img.width:
        return None, None
    boxes = [[int(v) for v in bb] for bb in two_boxes]
    if img.width > img.height:
        side = img.height
        first, last = hi_x - side, lo_x
        start = random.randint(first, last) if first < last else first
        start = max(0, min(start, img.width - side))
        crop = img.crop((start, 0, start + side, side))
        for bb in boxes:
            bb[0] -= start
            bb[2] -= start
    else:
        side = img.width
        first, last = hi_y - side, lo_y
        start = random.randint(first, last) if first < last else first
        start = max(0, min(start, img.height - side))
        crop = img.crop((0, start, side, start + side))
        for bb in boxes:
            bb[1] -= start
            bb[3] -= start
    k = target / side
    boxes = [[int(v * k) for v in bb] for bb in boxes]
    return crop.resize((target, target), Image.Resampling.LANCZOS), boxes


def release_resize_bbox(bb, ow, oh, nw, nh):
    s = min(nw / ow, nh / oh)
    dx, dy = (nw - ow * s) / 2, (nh - oh * s) / 2
    return [int(bb[0] * s + dx), int(bb[1] * s + dy), int(bb[2] * s + dx), int(bb[3] * s + dy)]


def release_blur(img, boxes, threshold=100, radius=15):
    keep = [bb for bb in boxes if bb[2] - bb[0] >= threshold and bb[3] - bb[1] >= threshold]
    if not keep:
        return img
    out = img.copy()
    for bb in keep:
        x1, y1, x2, y2 = (int(v) for v in bb)
        x1, y1 = max(0, x1), max(0, y1)
        x2, y2 = min(img.width, x2), min(img.height, y2)
        out.paste(img.crop((x1, y1, x2, y2)).filter(ImageFilter.GaussianBlur(radius=radius)), (x1, y1))
    return out


def noise_photo(w, h, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)  # some structure for the blur to remove


TWO_FACE_CASES = [  # (w, h, two boxes): landscape, portrait, square; float boxes as a detector gives them
    (900, 600, [(120.7, 80.2, 260.9, 240.5), (420.3, 150.8, 580.1, 330.6)]),
    (480, 760, [(40.5, 300.2, 170.4, 430.9), (260.1, 420.7, 400.8, 560.3)]),
    (640, 640, [(60.2, 90.9, 210.6, 250.1), (380.4, 100.3, 540.7, 270.8)]),
]


@pytest.mark.parametrize("w,h,boxes", TWO_FACE_CASES)
@pytest.mark.parametrize("seed", [0, 7])
def test_square_crop_equals_release_on_two_faces(w, h, boxes, seed):
    photo = noise_photo(w, h, seed)
    random.seed(seed)
    want_img, want_boxes = release_square(photo, boxes)
    got_img, got_boxes, tf = square_around_faces(photo, boxes, 512, rng=random.Random(seed))
    assert got_boxes == want_boxes
    assert got_img.size == (512, 512)
    assert np.array_equal(np.asarray(got_img), np.asarray(want_img))
    assert tf.crop_w == tf.crop_h == min(w, h)


def test_square_crop_default_is_deterministic_and_holds_every_face():
    photo = noise_photo(900, 600, 1)
    boxes = [(120, 80, 260, 240), (420, 150, 580, 330), (300, 20, 380, 100)]  # three faces: the release reads two
    a = square_around_faces(photo, boxes, 256)
    b = square_around_faces(photo, boxes, 256)
    assert a[1] == b[1] and a[2] == b[2]
    tf = a[2]
    # the window [max_x2 - side, min_x1] = [0, 120] → the middle, 60
    assert (tf.left, tf.top, tf.crop_w) == (60, 0, 600)
    for x1, y1, x2, y2 in a[1]:
        assert 0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 256


def test_one_face_photo_works():
    photo = noise_photo(700, 500, 2)
    img, boxes, tf = square_around_faces(photo, [(600.4, 100.0, 690.0, 210.0)], 512)
    assert img.size == (512, 512) and len(boxes) == 1
    x1, _, x2, _ = boxes[0]
    assert 0 <= x1 < x2 <= 512  # the face lies in the crop (it sits at the right edge of the photo)
    assert tf.left == 195  # the middle of the windows holding it, [690 - 500, 600] ∩ [0, 700 - 500] = [190, 200]


def test_unsquarable_faces_give_one_line_error():
    photo = noise_photo(1000, 400, 3)
    with pytest.raises(EditError) as err:
        square_around_faces(photo, [(10, 50, 120, 160), (860, 60, 990, 170)], 512)
    msg = str(err.value)
    assert "\n" not in msg and "980 px" in msg and "400 px" in msg and "canvas='photo'" in msg
    random.seed(0)
    assert release_square(photo, [(10, 50, 120, 160), (860, 60, 990, 170)]) == (None, None)  # the release gives up


@pytest.mark.parametrize("frm,to", [((512, 512), (640, 640)), ((512, 512), (900, 600)), ((512, 512), (480, 760))])
def test_map_boxes_equals_release_resize_bbox(frm, to):
    boxes = [[37, 81, 190, 260], [300, 20, 511, 199], [0, 0, 1, 1]]
    assert map_boxes(boxes, frm, to) == [release_resize_bbox(b, *frm, *to) for b in boxes]


@pytest.mark.parametrize("w,h,boxes", TWO_FACE_CASES)
def test_blur_equals_release(w, h, boxes):
    photo = noise_photo(w, h, 4)
    boxes = [*boxes, (w - 95.0, 0.0, w - 5.0, 60.0)]  # smaller than 100 px: the release leaves it sharp
    want = release_blur(photo, boxes)
    got = blur_faces(photo, boxes)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    diff = np.abs(np.asarray(got, dtype=int) - np.asarray(photo, dtype=int)).sum(-1)
    x1, y1, x2, y2 = (int(v) for v in boxes[0])
    assert diff[y1:y2, x1:x2].mean() > 5  # the face region did change
    assert diff[: int(min(b[1] for b in boxes[:2]))].max() == 0  # above the faces (small box included): untouched


class _Faces:
    """A detector stand-in returning fixed boxes (the pixel arithmetic is under test here, not detection)."""

    def __init__(self, boxes):
        from withanyone.faces import Face

        self.faces = [Face(bbox=b, score=0.9, landmarks=np.zeros((5, 2))) for b in boxes]

    def detect(self, image, embed=True):
        return list(self.faces)


@pytest.mark.parametrize("side", [512, 640])
def test_prepare_edit_equals_release_pipeline_on_square_two_face_photo(side):
    """The release's gradio_edit flow on a square photo: square 512 crop → resize_bbox back to the photo → blur
    the photo there; its condition is that photo and its boxes those. Ours at size=side must be identical."""
    photo = noise_photo(side, side, 5)
    boxes = [(60.2, 90.9, 210.6, 250.1), (330.4, 100.3, 500.7, 290.8)]
    random.seed(0)
    _, sq = release_square(photo, boxes)
    photo_boxes = [release_resize_bbox(b, 512, 512, side, side) for b in sq]
    want = release_blur(photo, photo_boxes)
    plan = prepare_edit(photo, 2, _Faces(boxes), size=side if side % 16 == 0 else 512)
    assert plan.size == (side, side)
    assert np.array_equal(np.asarray(plan.condition), np.asarray(want))
    # at 512 the adapter boxes are the release's 512-space boxes (it passes them mapped to the photo size)
    plan512 = prepare_edit(photo, 2, _Faces(boxes))
    assert plan512.boxes == sq and plan512.replaced == [0, 1]
    expected_512 = want.resize((512, 512), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(plan512.condition), np.asarray(expected_512))


def test_prepare_edit_two_face_group_photo_matches_release(shared_faces, dlib_analyzer):
    """group/3.jpg (portrait, two faces): the square crop, boxes and blur equal the release's arithmetic."""
    path = shared_faces / "group" / "3.jpg"
    photo = Image.open(path).convert("RGB")
    faces = detect_faces(photo, dlib_analyzer)
    assert len(faces) == 2
    boxes = [f.bbox.tolist() for f in faces]
    random.seed(3)
    want_img, want_boxes = release_square(photo, boxes)
    plan = prepare_edit(str(path), 2, None, faces=faces, rng=random.Random(3))
    assert plan.boxes == want_boxes
    assert np.array_equal(np.asarray(plan.canvas), np.asarray(want_img))
    photo_boxes = plan.transform.to_photo(want_boxes)
    want_cond = plan.transform.apply(release_blur(photo, photo_boxes))
    assert np.array_equal(np.asarray(plan.condition), np.asarray(want_cond))
    assert plan.photo_sha256 == photo_sha256(path) and len(plan.photo_sha256) == 64


def test_keep_unreplaced_and_feather_options():
    photo = noise_photo(640, 640, 6)
    boxes = [(60, 90, 210, 250), (330, 100, 500, 290)]
    base = prepare_edit(photo, 1, _Faces(boxes), replace=[1])
    keep = prepare_edit(photo, 1, _Faces(boxes), replace=[1], keep_unreplaced=True)
    canvas = np.asarray(keep.canvas, dtype=int)
    x1, y1, x2, y2 = keep.face_boxes[0]
    assert base.blurred == [0, 1] and keep.blurred == [1] and keep.boxes == [keep.face_boxes[1]]
    assert np.abs(np.asarray(keep.condition, dtype=int) - canvas)[y1:y2, x1:x2].max() == 0  # face 0 untouched
    assert np.abs(np.asarray(base.condition, dtype=int) - canvas)[y1:y2, x1:x2].mean() > 3  # release: blurred
    soft = blur_faces(photo, [boxes[0]], feather=16)
    hard = blur_faces(photo, [boxes[0]])
    p, s, h = (np.asarray(i, dtype=int) for i in (photo, soft, hard))
    assert np.abs(s - p)[90, 60:210].sum() < np.abs(h - p)[90, 60:210].sum()  # the edge row blends towards the photo
    assert np.array_equal(s[170, 135], h[170, 135])  # the centre is fully blurred either way



def test_blurred_lists_only_faces_the_release_blur_reaches_and_min_blur_face_lowers_the_limit():
    photo = noise_photo(640, 640, 8)
    boxes = [(60, 90, 140, 170), (330, 100, 500, 290)]  # 80 px (under the release's 100) and 170 px faces
    plan = prepare_edit(photo, 2, _Faces(boxes))
    assert plan.blurred == [1]
    canvas, cond = (np.asarray(i, dtype=int) for i in (plan.canvas, plan.condition))
    x1, y1, x2, y2 = plan.face_boxes[0]
    assert np.abs(cond - canvas)[y1:y2, x1:x2].max() == 0  # small face left as it is, as the release does
    low = prepare_edit(photo, 2, _Faces(boxes), min_blur_face=50)
    assert low.blurred == [0, 1] and low.options["min_blur_face"] == 50
    assert np.abs(np.asarray(low.condition, dtype=int) - canvas)[y1:y2, x1:x2].mean() > 3

def test_prepare_edit_errors_are_one_line():
    photo = noise_photo(640, 640, 7)
    two = _Faces([(60, 90, 210, 250), (330, 100, 500, 290)])
    cases = [
        (dict(references=1), "2 face(s) detected but 1 reference(s)"),
        (dict(references=1, replace=[5]), "only faces 0..1"),
        (dict(references=2, replace=[0, 0]), "twice"),
        (dict(references=1, replace=[0], boxes=[(0, 0, 10, 10)]), "not both"),
        (dict(references=1, canvas="wide"), "canvas must be one of"),
        (dict(references=1, replace=[0], min_blur_face=-5), "min_blur_face must be a finite number"),
        (dict(references=1, replace=[0], feather=float("nan")), "feather must be a finite number"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(EditError) as err:
            prepare_edit(photo, analyzer=two, **kwargs)
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(EditError, match="no faces detected"):
        prepare_edit(photo, 1, _Faces([]))


def test_photo_canvas_keeps_the_whole_photo(shared_faces, dlib_analyzer):
    path = shared_faces / "group" / "1.jpg"  # two faces 720 px apart on a 661 px-high photo: no square holds them
    with pytest.raises(EditError, match="no square crop"):
        prepare_edit(path, 2, dlib_analyzer)
    plan = prepare_edit(path, 2, dlib_analyzer, canvas="photo")
    w, h = plan.size
    assert (w, h) == kontext_resolution(1126, 661) and w % 16 == 0 and h % 16 == 0
    assert abs(w / h - 1126 / 661) < 0.1 and abs(w * h - 512 * 512) < 0.15 * 512 * 512
    for (x1, _, _, y2), face in zip(plan.boxes, plan.faces, strict=True):
        assert abs(x1 - face.bbox[0] * w / 1126) <= 1 and abs(y2 - face.bbox[3] * h / 661) <= 1


def test_detect_faces_on_both_backends(tmp_path, dlib_analyzer, shared_faces):
    from tiny_models.insightface_pack import build_tiny_pack, paint_key

    from withanyone.faces import FaceAnalyzer

    faces = detect_faces(shared_faces / "group" / "2.jpg", dlib_analyzer)
    assert len(faces) == 3 and [f.bbox[0] for f in faces] == sorted(f.bbox[0] for f in faces)
    build_tiny_pack(tmp_path / "pack", num_anchors=1)
    fa = FaceAnalyzer("insightface", pack=str(tmp_path / "pack"), det_thresh=0.4)
    img = np.random.default_rng(8).integers(60, 200, size=(320, 320, 3), dtype=np.uint8)  # no key colours
    squares = [(224, 96, 256, 128), (64, 160, 96, 192)]
    img = paint_key(paint_key(img, *squares[0]), *squares[1])
    found = detect_faces(img, fa)  # the tiny detector fires on neighbouring cells too: ≥ 1 box per square

    def hits(box, sq):
        return box[0] < sq[2] and sq[0] < box[2] and box[1] < sq[3] and sq[1] < box[3]

    assert {f.backend for f in found} == {"insightface"} and len(found) >= 2
    assert [f.bbox[0] for f in found] == sorted(f.bbox[0] for f in found)
    assert all(any(hits(f.bbox, sq) for sq in squares) for f in found)
    assert all(any(hits(f.bbox, sq) for f in found) for sq in squares)
    plan = prepare_edit(img, 2, fa, replace=[0, len(found) - 1], size=256, min_blur_face=10)
    assert plan.size == (256, 256) and len(plan.boxes) == 2 and plan.boxes[0][0] < plan.boxes[1][0]
    assert hits(plan.transform.to_photo(plan.boxes)[0], squares[1])  # leftmost face = the square at x = 64


def test_user_boxes_override_the_faces():
    photo = noise_photo(640, 640, 9)
    two = _Faces([(60, 90, 210, 250), (330, 100, 500, 290)])
    plan = prepare_edit(photo, 1, two, boxes=[(200, 300, 360, 480)])
    assert plan.boxes == [[200, 300, 360, 480]] and plan.replaced == [] and plan.blurred == [0, 1]
    diff = np.abs(np.asarray(plan.condition, dtype=int) - np.asarray(plan.canvas, dtype=int))
    assert diff[300:480, 200:360].mean() > 3  # the user's box is blurred too (it will be redrawn)
    with pytest.raises(EditError) as err:
        prepare_edit(photo, 1, two, boxes=[(700, 300, 900, 480)])  # entirely outside the 512² canvas
    assert "entirely outside" in str(err.value) and "\n" not in str(err.value)
