"""The ID-loss ArcFace loaded straight from an insightface ONNX recognizer equals onnxruntime on the same crops."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tiny_models.arcface_onnx import export_tiny_iresnet, tiny_iresnet  # noqa: E402

from withanyone.train.arcface import ArcFaceWeightsError, load_arcface, load_arcface_onnx  # noqa: E402

FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"


def _crops(n: int = 4) -> np.ndarray:
    """112×112 RGB uint8 crops: centre squares of real photos when present, else seeded noise."""
    from PIL import Image

    photos = sorted(p for p in FACES.glob("*/1.jpg") if p.parent.name != "group")[:n] if FACES.is_dir() else []
    out = []
    for p in photos:
        img = Image.open(p).convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        out.append(np.asarray(img.crop((left, top, left + side, top + side)).resize((112, 112), Image.BILINEAR)))
    rng = np.random.default_rng(0)
    while len(out) < n:
        out.append(rng.integers(0, 256, (112, 112, 3), np.uint8))
    return np.stack(out)


def _onnxruntime(path: Path, crops: np.ndarray) -> np.ndarray:
    """Raw embeddings as insightface computes them for glintr100/w600k_r50: (crop − 127.5) / 127.5, NCHW."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    blob = ((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(blob)})[0]


@pytest.mark.parametrize("keep_identity", [False, True])
def test_onnx_recognizer_loads_into_iresnet_and_equals_onnxruntime(tmp_path, keep_identity):
    path = tmp_path / "glintr100.onnx"
    net = export_tiny_iresnet(path, keep_identity=keep_identity)
    crops = _crops()
    ref = _onnxruntime(path, crops)

    model = load_arcface_onnx(path)
    assert [len(getattr(model, f"layer{s}")) for s in range(1, 5)] == [1, 2, 1, 1]
    assert model.embedding_dim == 512 and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        ours = model(torch.from_numpy(crops).permute(0, 3, 1, 2).float()).numpy()
        original = net(torch.from_numpy(crops).permute(0, 3, 1, 2).float()).numpy()
    scale = np.abs(ref).max()
    assert scale > 1.0  # random BatchNorm statistics: the folded numbers matter
    assert np.abs(ours - ref).max() <= 1e-4 * scale
    unit = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(unit(ours), unit(ref), atol=1e-4)
    assert np.abs(ours - original).max() <= 1e-4 * scale  # and equals the network that was exported

    # the loaded network stays differentiable to the pixels (what the ID loss needs)
    pixels = torch.from_numpy(crops[:1]).permute(0, 3, 1, 2).float().requires_grad_(True)
    model(pixels).pow(2).sum().backward()
    assert pixels.grad is not None and float(pixels.grad.abs().sum()) > 0


def test_pack_folder_and_load_arcface_dispatch(tmp_path):
    from tiny_models.insightface_pack import build_tiny_pack

    pack = tmp_path / "antelopev2" / "antelopev2"  # the doubly nested layout packs often unzip to
    build_tiny_pack(pack, extras=False)
    export_tiny_iresnet(pack / "glintr100.onnx", tiny_iresnet(seed=3))
    crops = _crops(2)
    ref = _onnxruntime(pack / "glintr100.onnx", crops)
    for source in (tmp_path / "antelopev2", pack / "glintr100.onnx"):
        model = load_arcface(source)  # the training config's arcface_weights may name the pack or the file
        with torch.no_grad():
            ours = model(torch.from_numpy(crops).permute(0, 3, 1, 2).float()).numpy()
        assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_arch_mismatch_and_foreign_graphs_fail_with_the_file_named(tmp_path):
    from tiny_models.insightface_pack import build_tiny_pack

    path = tmp_path / "w600k_r50.onnx"
    export_tiny_iresnet(path)
    with pytest.raises(ArcFaceWeightsError, match=r"w600k_r50\.onnx: holds an IResNet with blocks \[1, 2, 1, 1\]"):
        load_arcface_onnx(path, "r50")
    linear = build_tiny_pack(tmp_path / "linear", extras=False).recognizer  # pooled-linear recognizer
    with pytest.raises(ArcFaceWeightsError, match=r"glintr100\.onnx: not an IResNet export"):
        load_arcface_onnx(linear)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    with pytest.raises(ArcFaceWeightsError, match="broken.onnx"):
        load_arcface_onnx(broken)
    empty = tmp_path / "empty"
    shutil.copytree(tmp_path / "linear", empty)
    (empty / "glintr100.onnx").unlink()
    with pytest.raises(ArcFaceWeightsError, match="empty"):
        load_arcface(empty)
