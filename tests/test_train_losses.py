"""Loss terms against hand computations, the ID schedule, differentiable alignment and the IResNet ArcFace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models.numerics import fp32_atol

pytest.importorskip("kornia")

from test_train_fixtures import tiny_arcface  # noqa: E402

from withanyone.train.arcface import ARCHS, ArcFaceWeightsError, IResNet, iresnet, load_arcface  # noqa: E402
from withanyone.train.losses import (  # noqa: E402
    align_faces,
    flow_matching_loss,
    id_loss,
    id_weight_schedule,
    info_nce,
    noisy_latents,
    predicted_x0,
)

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "faces"


def test_flow_matching_terms_equal_hand_computation():
    g = torch.Generator().manual_seed(0)
    x0, eps, pred = (torch.randn(3, 16, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = noisy_latents(x0, eps, t)
    a, b, e = x0.numpy(), eps.numpy(), xt.numpy()
    np.testing.assert_allclose(e[0], a[0], atol=0)
    np.testing.assert_allclose(e[1], 0.75 * a[1] + 0.25 * b[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(e[2], b[2], atol=0)
    expected = np.mean((pred.numpy() - (b - a)) ** 2)
    assert float(flow_matching_loss(pred, x0, eps)) == pytest.approx(expected, rel=1e-6)
    # the exact velocity gives zero loss and x̂₀ = x_t − t·v recovers x₀
    assert float(flow_matching_loss(eps - x0, x0, eps)) == 0.0
    torch.testing.assert_close(predicted_x0(xt, t, eps - x0), x0, atol=fp32_atol(x0, ulps=64), rtol=0)


def test_id_weight_schedule_is_one_then_linear_then_zero_above_06():
    t = torch.tensor([0.0, 0.2, 0.4, 0.5, 0.55, 0.6, 0.61, 0.9, 1.0])
    w = id_weight_schedule(t)
    np.testing.assert_allclose(w.numpy(), [1, 1, 1, 0.5, 0.25, 0, 0, 0, 0], atol=1e-6)
    assert float(id_weight_schedule(0.7, full=0.5, zero=0.8)) == pytest.approx(1 / 3, rel=1e-5)


def _nce_by_hand(q, p, negs, tau, mask=None):
    out = []
    for i in range(len(q)):
        qi = q[i] / np.linalg.norm(q[i])
        pi = p[i] / np.linalg.norm(p[i])
        n = negs if negs.ndim == 2 else negs[i]
        n = n / np.linalg.norm(n, axis=1, keepdims=True)
        logits = [qi @ pi / tau] + [qi @ n[k] / tau for k in range(len(n)) if mask is None or mask[i, k]]
        logits = np.array(logits, np.float64)
        out.append(-(logits[0] - np.log(np.exp(logits).sum())))
    return np.array(out)


def test_info_nce_equals_hand_computation_shared_masked_and_per_query():
    rng = np.random.default_rng(0)
    q, p = rng.standard_normal((3, 8)), rng.standard_normal((3, 8))
    negs = rng.standard_normal((5, 8))
    tq, tp, tn = (torch.tensor(x, dtype=torch.float32) for x in (q, p, negs))
    assert float(info_nce(tq, tp, tn, 0.1)) == pytest.approx(_nce_by_hand(q, p, negs, 0.1).mean(), rel=1e-5)
    mask = rng.random((3, 5)) > 0.4
    got = float(info_nce(tq, tp, tn, 0.1, negative_mask=torch.tensor(mask)))
    assert got == pytest.approx(_nce_by_hand(q, p, negs, 0.1, mask).mean(), rel=1e-5)
    per = rng.standard_normal((3, 4, 8))
    w = np.array([1.0, 0.5, 0.0])
    got = float(info_nce(tq, tp, torch.tensor(per, dtype=torch.float32), 0.5, weights=torch.tensor(w)))
    assert got == pytest.approx((w * _nce_by_hand(q, p, per, 0.5)).mean(), rel=1e-5)
    # a query equal to its positive and orthogonal to the negatives: loss = log(1 + K·e^{-1/τ})
    e = torch.eye(4)
    assert float(info_nce(e[:1], e[:1], e[1:], 0.1)) == pytest.approx(np.log(1 + 3 * np.exp(-10)), rel=2e-3)  # fp32


@pytest.fixture(scope="module")
def face_image():
    from withanyone.faces import FaceAnalyzer, load_image

    img = load_image(SAMPLES / "obama" / "1.jpg")
    face = FaceAnalyzer("dlib").detect(img, embed=False)[0]
    return img, np.asarray(face.landmarks, np.float32)


def test_differentiable_alignment_matches_the_face_stack_alignment(face_image):
    from withanyone.faces.align import align_face

    img, lm = face_image
    ref = align_face(img, lm).astype(np.float32)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
    ours = align_faces(t, torch.tensor([0]), lm[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).mean() < 4.0  # same crop; PIL vs kornia interpolation differ by ~2 levels
    shifted = align_faces(t, torch.tensor([0]), (lm + 12)[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(shifted - ref).mean() > 3 * np.abs(ours - ref).mean()


def test_id_loss_is_gt_aligned_weighted_and_differentiable(face_image):
    img, lm = face_image
    arc = tiny_arcface()
    gt = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
    g = torch.Generator().manual_seed(0)
    pred = (gt + 40 * torch.randn(gt.shape, generator=g)).clamp(0, 255).requires_grad_(True)
    images_pred, images_gt = torch.cat([pred, pred]), torch.cat([gt, gt])
    idx, lms = torch.tensor([0, 1]), np.stack([lm, lm])
    w = torch.tensor([1.0, 0.5])
    loss = id_loss(images_pred, images_gt, idx, lms, arc, weights=w)
    with torch.no_grad():
        ep = torch.nn.functional.normalize(arc(align_faces(pred, torch.tensor([0]), lm[None])), dim=-1)
        eg = torch.nn.functional.normalize(arc(align_faces(gt, torch.tensor([0]), lm[None])), dim=-1)
    one = 1 - float((ep * eg).sum())
    assert one > 1e-4
    assert float(loss.detach()) == pytest.approx((1.0 * one + 0.5 * one) / 2, rel=1e-4)
    loss.backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0
    # only the GT-aligned face region receives gradient: far corners stay at zero
    assert float(pred.grad[..., :5, :5].abs().sum()) == 0.0
    assert float(id_loss(gt, gt, torch.tensor([0]), lm[None], arc).detach()) == pytest.approx(0.0, abs=1e-6)
    zero = pred.detach().clone().requires_grad_(True)
    lz = id_loss(zero, gt, torch.tensor([0]), lm[None], arc, weights=torch.tensor([0.0]))
    lz.backward()
    assert float(lz.detach()) == 0.0 and float(zero.grad.abs().sum()) == 0.0


def test_iresnet_architectures_and_arcface_torch_key_names():
    with torch.device("meta"):
        r100, r50 = iresnet("r100"), iresnet("r50")
    assert sum(p.numel() for p in r100.parameters()) == 65_156_160  # arcface_torch r100: 65.2 M
    assert ARCHS["r100"] == (3, 13, 30, 3) and ARCHS["r50"] == (3, 4, 14, 3)
    keys = set(r50.state_dict())
    for k in ("conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.downsample.0.weight",
              "layer1.0.downsample.1.running_mean", "layer3.13.prelu.weight", "layer4.2.bn3.bias",
              "bn2.weight", "fc.weight", "fc.bias", "features.weight", "features.running_mean"):
        assert k in keys, k
    assert "layer3.14.conv1.weight" not in keys and r100.fc.in_features == 512 * 7 * 7
    assert not r100.features.weight.requires_grad


def test_tiny_arcface_safetensors_round_trip_and_refusals(tmp_path):
    from safetensors.torch import save_file

    arc = tiny_arcface(3)
    x = torch.rand(2, 3, 112, 112) * 255
    f = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in arc.state_dict().items()}, str(f))
    loaded = load_arcface(f)
    assert loaded.embedding_dim == 512 and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded(x), arc(x), rtol=0, atol=0)
    # the input is normalised as (x/255 − 0.5)/0.5 inside: a constant image of 127.5 equals a zero input
    with torch.no_grad():
        zero_in = arc.prelu(arc.bn1(arc.conv1(torch.zeros(1, 3, 112, 112))))
        stem = {}
        arc.prelu.register_forward_hook(lambda m, a, o: stem.setdefault("out", o))
        arc(torch.full((1, 3, 112, 112), 127.5))
    assert float((stem["out"] - zero_in).abs().max()) < 1e-6
    with pytest.raises(ArcFaceWeightsError, match="not 'r50'"):
        load_arcface(f, arch="r50")
    pth = tmp_path / "backbone.pth"
    pth.write_bytes(b"\x80\x04pickle")
    with pytest.raises(ArcFaceWeightsError, match="pickled weights are not loaded"):
        load_arcface(pth)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"garbage")
    with pytest.raises(ArcFaceWeightsError, match="broken.safetensors"):
        load_arcface(broken)
    with pytest.raises(ValueError, match="112"):
        arc(torch.zeros(1, 3, 64, 64))
    assert isinstance(IResNet((1, 1, 1, 1), (8, 8, 16, 16)), torch.nn.Module)
