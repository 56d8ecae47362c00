"""insightface-format ONNX backend: pack discovery, role routing, exact SCRFD decoding, ArcFace embeddings.

Real packs cannot be downloaded here, so every check runs on tiny ONNX models built by
``tiny_models.insightface_pack`` whose outputs are known exactly (see that module's docstring).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models.insightface_pack import KEY_COLOURS, TinyPack, build_tiny_pack, paint_key

from withanyone.errors import ModelNotFoundError
from withanyone.faces import FaceAnalyzer, align_face, create_backend, load_image
from withanyone.faces.backends.insightface_backend import (
    InsightFaceBackend,
    anchor_centres,
    arcface_normalisation,
    distance2bbox,
    distance2kps,
    letterbox,
    nms,
)
from withanyone.faces.packs import find_pack, load_pack, route_models

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "faces"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Never touch the network; an empty insightface home unless a test fills one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "ifhome"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyPack:
    return build_tiny_pack(tmp_path_factory.mktemp("pack") / "antelopev2")


@pytest.fixture(scope="module")
def backend(tiny) -> InsightFaceBackend:
    return InsightFaceBackend(pack=tiny.folder, det_size=(128, 128))


def _real_photo() -> np.ndarray:
    for root in (FACES, SAMPLES):
        path = root / "obama" / "1.jpg"
        if path.is_file():
            return load_image(path)
    pytest.skip("no real photo: ../shared/data/faces and samples/faces are both absent")


def _three_cells() -> np.ndarray:
    """128×128 black image with one pure key cell per stride: s8 at (5, 3), s16 at (2, 6), s32 at (3, 1)."""
    img = np.zeros((128, 128, 3), np.uint8)
    img[24:32, 40:48] = KEY_COLOURS[8]
    img[96:112, 32:48] = KEY_COLOURS[16]
    img[32:64, 96:128] = KEY_COLOURS[32]
    return img


CELLS = [(8, 5, 3), (16, 2, 6), (32, 3, 1)]


def _match(faces, box):
    """The face whose box centre is nearest the expected box's centre."""
    c = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    return min(faces, key=lambda f: np.hypot(*(np.array(f.center) - c)))


# ------------------------------------------------------------------------------------------ discovery


def test_find_pack_by_path_and_one_folder_deeper(tmp_path):
    build_tiny_pack(tmp_path / "wrap" / "mypack", extras=False)
    assert find_pack(tmp_path / "wrap" / "mypack") == tmp_path / "wrap" / "mypack"
    assert find_pack(str(tmp_path / "wrap")) == tmp_path / "wrap" / "mypack"


def test_find_pack_by_name_under_insightface_home_flat_and_nested(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("INSIGHTFACE_HOME", str(home))
    build_tiny_pack(home / "models" / "antelopev2", extras=False)
    build_tiny_pack(home / "models" / "buffalo_l" / "buffalo_l", extras=False)
    assert find_pack("antelopev2") == home / "models" / "antelopev2"
    assert find_pack("buffalo_l") == home / "models" / "buffalo_l" / "buffalo_l"
    # create_backend's pack-name aliases resolve through the same search.
    be = create_backend("buffalo_l", det_size=(128, 128))
    assert be.pack.folder == home / "models" / "buffalo_l" / "buffalo_l" and be.pack.source == "insightface_home"


def test_missing_pack_error_names_every_place_and_how_to_get_it(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("INSIGHTFACE_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as err:
        find_pack("antelopev2")
    msg = str(err.value)
    for place in (tmp_path / "antelopev2", home / "models" / "antelopev2", home / "models" / "antelopev2" / "antelopev2"):
        assert str(place) in msg
    assert "hub repo DIAMONIK7777/antelopev2" in msg and "HF_HUB_OFFLINE" in msg
    assert "antelopev2.zip" in msg and "hf download" in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError, match=r"hub repo someone/nothing \(local hub cache only"):
        find_pack("someone/nothing", cache_dir=tmp_path / "hubcache")
    with pytest.raises(ModelNotFoundError, match="holds no .onnx"):
        (tmp_path / "empty").mkdir()
        find_pack(tmp_path / "empty")


def test_find_pack_from_hub_cache_while_offline(tmp_path):
    repo = tmp_path / "hubcache" / "models--someone--tinypack"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    build_tiny_pack(repo / "snapshots" / rev / "models" / "tinypack", extras=False)
    folder = find_pack("someone/tinypack", cache_dir=tmp_path / "hubcache")
    assert folder == repo / "snapshots" / rev / "models" / "tinypack"
    with pytest.raises(ModelNotFoundError, match="skipped: hub=False"):
        find_pack("someone/tinypack", hub=False, cache_dir=tmp_path / "hubcache")


# -------------------------------------------------------------------------------------------- routing


def test_route_models_by_inputs_and_outputs(tmp_path):
    pack = build_tiny_pack(tmp_path / "p")
    (tmp_path / "p" / "broken.onnx").write_bytes(b"\x08\x07garbage, not a protobuf \xff\xfe")
    roles = {m.path.name: m.role for m in route_models(tmp_path / "p")}
    assert roles == {"2d106det.onnx": "landmark", "genderage.onnx": "attribute", "det_10g.onnx": "detection",
                     "glintr100.onnx": "recognition", "broken.onnx": None}
    info = {m.path.name: m for m in route_models(tmp_path / "p")}
    assert "unreadable ONNX file" in info["broken.onnx"].describe()
    assert len(info["det_10g.onnx"].outputs) == 9 and info["det_10g.onnx"].inputs[0][0] == "input.1"
    loaded = load_pack(tmp_path / "p")
    assert (loaded.detector, loaded.recognizer) == (pack.detector, pack.recognizer)


def test_route_errors_name_the_files(tmp_path):
    build_tiny_pack(tmp_path / "a", extras=False)
    (tmp_path / "a" / "det_10g.onnx").unlink()
    with pytest.raises(ModelNotFoundError, match=r"has no detection model.*glintr100.onnx \[recognition\]"):
        load_pack(tmp_path / "a")
    build_tiny_pack(tmp_path / "b", with_kps=False, extras=False)
    with pytest.raises(ModelNotFoundError, match="6 outputs and no keypoint branch"):
        load_pack(tmp_path / "b")
    build_tiny_pack(tmp_path / "c")
    with pytest.raises(ModelNotFoundError, match="2d106det.onnx is not a recognition model"):
        load_pack(tmp_path / "c", recognizer="2d106det.onnx")
    with pytest.raises(ValueError, match="det_size"):
        InsightFaceBackend(pack=tmp_path / "c", det_size=(100, 128))


# ------------------------------------------------------------------------------------------- decoding


def test_decoding_building_blocks_by_hand():
    c = anchor_centres(2, 3, 8, 2)
    assert c.tolist() == [[0, 0], [0, 0], [8, 0], [8, 0], [16, 0], [16, 0], [0, 8], [0, 8], [8, 8], [8, 8],
                          [16, 8], [16, 8]]
    assert anchor_centres(2, 2, 32, 1).tolist() == [[0, 0], [32, 0], [0, 32], [32, 32]]
    box = distance2bbox(np.array([[40.0, 24.0]]), np.array([[8.0, 12.0, 16.0, 20.0]]))
    assert box.tolist() == [[32.0, 12.0, 56.0, 44.0]]
    kps = distance2kps(np.array([[40.0, 24.0]]), np.array([[1.0, 2.0, -3.0, 4.0]]))
    assert kps.tolist() == [[41.0, 26.0, 37.0, 28.0]]


def test_exact_boxes_keypoints_and_scores_at_each_stride(tiny, backend):
    faces = backend.detect(_three_cells(), embed=False)
    assert len(faces) == 3  # anchor 1 of each cell lies inside anchor 0's box (IoU 0.58 > 0.4): suppressed
    for stride, cx, cy in CELLS:
        box, kps = tiny.expected(stride, cx, cy)
        face = _match(faces, box)
        np.testing.assert_allclose(face.bbox, np.clip(box, 0, 128), atol=1e-4)
        np.testing.assert_allclose(face.landmarks, kps, atol=1e-4)
        assert face.score == pytest.approx(tiny.score(0), abs=1e-6)
        assert face.backend == "insightface"
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)


def test_nms_threshold_decides_whether_the_inner_anchor_survives(tiny):
    loose = InsightFaceBackend(pack=tiny.folder, det_size=(128, 128), nms_thresh=0.6)
    faces = loose.detect(_three_cells(), embed=False)
    assert len(faces) == 6
    for stride, cx, cy in CELLS:
        box, kps = tiny.expected(stride, cx, cy, anchor=1)
        inner = [f for f in faces if np.allclose(f.bbox, np.clip(box, 0, 128), atol=1e-4)]
        assert len(inner) == 1 and inner[0].score == pytest.approx(tiny.score(1), abs=1e-6)
        np.testing.assert_allclose(inner[0].landmarks, kps, atol=1e-4)
    strict = InsightFaceBackend(pack=tiny.folder, det_size=(128, 128), det_thresh=0.9995)
    assert len(strict.detect(_three_cells(), embed=False)) == 0  # pure cells score 0.99946 < 0.9995


def test_nms_by_hand():
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [0, 0, 9, 4]], dtype=np.float64)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # Pixel-inclusive areas, as insightface: IoU(3, 0) = 50/100 = 0.5, IoU(0, 1) = 81/119 = 0.68,
    # IoU(3, 1) = 36/114 = 0.32. Order by score: 3, 0, 1, 2.
    assert nms(boxes, scores, 0.4).tolist() == [3, 1, 2]  # 3 removes 0; 1 survives 3
    assert nms(boxes, scores, 0.55).tolist() == [3, 0, 2]  # 0 survives 3 and removes 1
    assert nms(boxes, scores, 0.7).tolist() == [3, 0, 1, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.4).tolist() == []


@pytest.mark.parametrize("variant", ["one_anchor", "batched", "fixed_size"])
def test_detector_variants(tmp_path, variant):
    opts = {"one_anchor": {"num_anchors": 1}, "batched": {"batched": True}, "fixed_size": {"input_size": (96, 64)}}
    pack = build_tiny_pack(tmp_path / variant, extras=False, **opts[variant])
    be = InsightFaceBackend(pack=pack.folder, det_size=(128, 128), nms_thresh=0.99)
    img = np.zeros((64, 96, 3) if variant == "fixed_size" else (128, 128, 3), np.uint8)
    img[16:24, 40:48] = KEY_COLOURS[8]  # stride-8 cell (5, 2)
    faces = be.detect(img, embed=False)
    assert len(faces) == (1 if variant == "one_anchor" else 2)
    box, kps = pack.expected(8, 5, 2)
    np.testing.assert_allclose(faces[0].bbox, box, atol=1e-4)
    np.testing.assert_allclose(faces[0].landmarks, kps, atol=1e-4)
    if variant == "fixed_size":
        assert be.detector.det_size == (96, 64)  # the model's fixed input wins over det_size


def test_letterbox_function():
    img = np.full((100, 200, 3), 200, np.uint8)
    canvas, scale = letterbox(img, (128, 128))
    assert canvas.shape == (128, 128, 3) and scale == 0.64
    assert (canvas[:64, :128] == 200).all() and (canvas[64:] == 0).all()
    tall, s2 = letterbox(np.full((300, 100, 3), 9, np.uint8), (64, 128))
    assert s2 == pytest.approx(128 / 300) and (tall[:, :42] == 9).all() and (tall[:, 42:] == 0).all()


def test_letterbox_scales_boxes_back_to_image_pixels(tiny, backend):
    # 256×128 image → canvas scale 0.5; this block covers det cell (5, 3) of stride 8 fully, with a blur margin.
    img = np.zeros((128, 256, 3), np.uint8)
    img[46:66, 78:98] = KEY_COLOURS[8]
    faces = backend.detect(img, embed=False)
    best = max(faces, key=lambda f: f.score)
    assert best.score == pytest.approx(tiny.score(0), abs=1e-6)
    box, kps = tiny.expected(8, 5, 3)
    np.testing.assert_allclose(best.bbox, box / 0.5, atol=1e-4)
    np.testing.assert_allclose(best.landmarks, kps / 0.5, atol=1e-4)


# ---------------------------------------------------------------------------------------- recognition


def test_normalisation_rule():
    assert arcface_normalisation(["_minusscalar0", "_mulscalar0", "conv0"]) == (0.0, 1.0)
    assert arcface_normalisation(["Sub_0", "Mul_1"]) == (0.0, 1.0)
    assert arcface_normalisation(["Sub_0", "Conv_1"]) == (127.5, 127.5)
    assert arcface_normalisation(["Conv_0", "MatMul_2"]) == (127.5, 127.5)


@pytest.mark.parametrize("style", ["torch", "mxnet"])
def test_embeddings_equal_numpy_expectation_in_one_batched_run(tmp_path, style):
    pack = build_tiny_pack(tmp_path / style, rec_style=style, extras=False)
    be = InsightFaceBackend(pack=pack.folder, det_size=(128, 128))
    assert (be.recognizer.input_mean, be.recognizer.input_std) == ((0.0, 1.0) if style == "mxnet" else (127.5, 127.5))
    assert be.embedding_dim == 512
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    img[24:32, 40:48] = KEY_COLOURS[8]
    img[96:112, 32:48] = KEY_COLOURS[16]
    img[32:64, 96:128] = KEY_COLOURS[32]
    runs = []
    real_run = be.recognizer.session.run
    be.recognizer.session = type("Counting", (), {
        "run": lambda self, *a, **k: runs.append(1) or real_run(*a, **k)})()
    faces = be.detect(img)
    assert len(faces) == 3 and len(runs) == 1
    crops = np.stack([align_face(img, f.landmarks, 112) for f in faces])
    want = pack.expected_embedding(crops)
    got = np.stack([f.embedding for f in faces])
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got, want, atol=2e-5)
    # The raw norm is kept (the release feeds the unnormalised vector to the adapter), and equals the graph's.
    raw = real_run(None, {be.recognizer.input_name: ((crops.astype(np.float32) - be.recognizer.input_mean)
                                                      / be.recognizer.input_std).transpose(0, 3, 1, 2)})[0]
    np.testing.assert_allclose([f.extra["embedding_norm"] for f in faces], np.linalg.norm(raw, axis=1), rtol=1e-5)
    assert np.ptp([f.extra["embedding_norm"] for f in faces]) > 0  # a real per-face value, not a constant
    # Feeding the graph the other normalisation gives clearly different vectors: detecting it is what matters.
    wrong = (127.5, 127.5) if style == "mxnet" else (0.0, 1.0)
    assert np.abs(pack.expected_embedding(crops, *wrong) - want).max() > 0.05


# ---------------------------------------------------------------------------------------- end to end


def test_face_analyzer_end_to_end_on_a_real_photo(tiny, tmp_path, monkeypatch):
    photo = _real_photo()
    fa = FaceAnalyzer("insightface", pack=tiny.folder)  # default det_size 640×640
    assert (fa.backend_name, fa.embedding_dim, fa.threshold) == ("insightface", 512, 0.4)
    assert fa.detect(photo) == []  # the tiny detector fires on pure key colours only: no false positives
    h, w = photo.shape[:2]
    scale = min(640 / w, 640 / h)
    side = int(np.ceil(3 * 32 / scale))  # ≥ 3 stride-32 cells on the canvas → at least one pure cell
    x0, y0 = w // 3, h // 4
    planted = paint_key(photo, x0, y0, x0 + side, y0 + side, stride=32)
    path = tmp_path / "planted.png"
    Image.fromarray(planted).save(path)
    faces = fa.detect(path)
    assert 1 <= len(faces) <= 4 and fa.calls == {"detect": 2, "embed": len(faces)}
    best = max(faces, key=lambda f: f.score)
    assert best.score == pytest.approx(tiny.score(0), abs=1e-6)
    cx, cy = best.landmarks[:2].mean(0)  # eyes lie inside the painted square
    assert x0 <= cx <= x0 + side + 32 / scale and y0 - 32 / scale <= cy <= y0 + side
    crops = np.stack([align_face(planted, f.landmarks, 112) for f in faces])
    np.testing.assert_allclose(np.stack([f.embedding for f in faces]), tiny.expected_embedding(crops), atol=2e-5)
    # A second photo of someone else through the same pack: same decoding, different embedding.
    sims = [float(f.embedding @ best.embedding) for f in faces]
    assert max(sims) == pytest.approx(1.0, abs=1e-6)


def test_spec_rebuilds_in_worker_processes(tiny, tmp_path):
    imgs = []
    for i, (x, y) in enumerate([(10, 20), (60, 30), (30, 70)]):
        img = np.random.default_rng(i).integers(0, 120, (128, 160, 3), dtype=np.uint8)
        path = tmp_path / f"{i}.png"
        Image.fromarray(paint_key(img, x, y, x + 40, y + 40, stride=16)).save(path)
        imgs.append(path)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    imgs.append(tmp_path / "bad.png")
    fa = FaceAnalyzer("insightface", pack=tiny.folder, det_size=(160, 128), intra_op_threads=1)
    spec = fa.backend.spec()
    assert spec["pack"] == str(tiny.folder) and spec["det_size"] == [160, 128] and spec["intra_op_threads"] == 1
    assert InsightFaceBackend(pack=tiny.folder, intra_op_threads=2).spec()["intra_op_threads"] == 2
    assert InsightFaceBackend(pack=tiny.folder).spec()["intra_op_threads"] == 1  # one thread per worker
    one = fa.analyze_many(imgs, workers=1, progress=False)
    two = fa.analyze_many(imgs, workers=2, progress=False)
    assert [r.source for r in two] == [str(p) for p in imgs]
    assert two[-1].error is not None and one[-1].error is not None
    for a, b in zip(one[:-1], two[:-1], strict=True):
        assert len(a.faces) == len(b.faces) >= 1
        for fa_, fb in zip(a.faces, b.faces, strict=True):
            np.testing.assert_allclose(fa_.bbox, fb.bbox, atol=1e-4)
            np.testing.assert_allclose(fa_.embedding, fb.embedding, atol=1e-6)
            assert fb.backend == "insightface"


def test_degenerate_images_and_many_faces(tiny, backend):
    for shape in [(1, 1, 3), (3, 900, 3), (900, 3, 3)]:
        assert backend.detect(np.full(shape, 255, np.uint8)) == []
    with pytest.raises(ValueError, match="RGB uint8"):
        backend.detect(np.zeros((32, 32), np.uint8))
    crowd = np.zeros((128, 128, 3), np.uint8)
    crowd[:] = KEY_COLOURS[8]  # every stride-8 cell is hot: 16×16 cells × 2 anchors before NMS
    faces = backend.detect(crowd)
    # NMS keeps a lattice: a box 3 cells wide and 4 tall suppresses neighbours with IoU > 0.4.
    assert 16 <= len(faces) <= 128
    assert all(f.embedding is not None and f.embedding.shape == (512,) for f in faces)
    assert all(f.score == pytest.approx(tiny.score(0), abs=1e-6) for f in faces)
