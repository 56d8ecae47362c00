"""WithAnyone's training losses: rectified-flow matching, GT-aligned ID loss, InfoNCE, the ID-term schedule.

``L = L_flow + λ_id·L_ID + λ_cl·L_CL`` (facts sheet §4). Every function is functional (tensors in, tensor
out) so each term can be checked against a hand computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from withanyone.faces.align import arcface_matrix

__all__ = ["flow_matching_loss", "flow_target", "noisy_latents", "predicted_x0", "id_weight_schedule",
           "id_gate", "flux_mu", "shifted_schedule", "sample_t", "align_faces", "id_loss", "info_nce"]

#: ID terms get full weight for t ≤ ID_T_FULL and zero weight for t ≥ ID_T_ZERO (linear in between).
ID_T_FULL = 0.4
ID_T_ZERO = 0.6


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow interpolation x_t = (1 − t)·x₀ + t·ε (``t`` [B], broadcast over the other dims)."""
    tb = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - tb) * x0 + tb * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the transformer learns: ε − x₀."""
    return noise - x0


def flow_matching_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted velocity and ε − x₀, computed in fp32."""
    return F.mse_loss(pred.float(), flow_target(x0, noise).float())


def predicted_x0(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """One-step estimate of the clean latent: x̂₀ = x_t − t·v."""
    tb = t.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
    return x_t - tb * velocity.to(x_t.dtype)


def id_weight_schedule(t: torch.Tensor | float, full: float = ID_T_FULL, zero: float = ID_T_ZERO) -> torch.Tensor:
    """Weight of both ID terms at noise level t: 1 for t ≤ ``full``, 0 for t ≥ ``zero``, linear between."""
    t = torch.as_tensor(t, dtype=torch.float32)
    if zero <= full:
        return (t < zero).float()
    return ((zero - t) / (zero - full)).clamp(0.0, 1.0)


def id_gate(t: torch.Tensor | float, mode: str = "release", full: float = ID_T_FULL,
            zero: float = ID_T_ZERO) -> torch.Tensor:
    """Per-image weight of the ID terms: ``"release"`` 1 for t ≤ ``zero`` and 0 above (a hard cut);
    ``"ramp"`` :func:`id_weight_schedule` (1 up to ``full``, linear to 0 at ``zero``)."""
    if mode == "release":
        return (torch.as_tensor(t, dtype=torch.float32) <= zero).float()
    if mode == "ramp":
        return id_weight_schedule(t, full, zero)
    raise ValueError(f"id_gate must be 'release' or 'ramp', got {mode!r}")


def flux_mu(image_tokens: int, base_shift: float = 0.5, max_shift: float = 1.15, base_len: int = 256,
            max_len: int = 4096) -> float:
    """FLUX's resolution-dependent shift μ, linear in the image-token count (0.5 at 256 → 1.15 at 4096)."""
    return base_shift + (max_shift - base_shift) * (image_tokens - base_len) / (max_len - base_len)


def shifted_schedule(image_tokens: int, num_points: int = 1000) -> torch.Tensor:
    """The release's training schedule: ``linspace(1, 0, num_points + 1)[:num_points]`` shifted by
    ``t' = e^μ / (e^μ + 1/t − 1)`` with μ from the true image-token count (BFL ``get_schedule``)."""
    base = torch.linspace(1, 0, num_points + 1, dtype=torch.float64)[:num_points]
    mu = math.exp(flux_mu(image_tokens))
    return (mu / (mu + (1 / base - 1))).float()


def sample_t(mode: str, batch: int, image_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Noise levels [batch]: ``"release"`` uniform over :func:`shifted_schedule`; ``"logit_normal"``
    sigmoid(N(0, 1)); ``"uniform"`` U(0, 1)."""
    if mode == "release":
        sched = shifted_schedule(image_tokens)
        return sched[torch.randint(0, len(sched), (batch,), generator=generator)]
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=generator))
    if mode == "uniform":
        return torch.rand(batch, generator=generator)
    raise ValueError(f"t_sampling must be release, logit_normal or uniform, got {mode!r}")


def _matrices(landmarks: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    lm = np.asarray(landmarks.detach().cpu() if isinstance(landmarks, torch.Tensor) else landmarks, np.float64)
    return torch.from_numpy(np.stack([arcface_matrix(p, size) for p in lm.reshape(-1, 5, 2)])).float()


def align_faces(images: torch.Tensor, image_index: torch.Tensor, landmarks: torch.Tensor | np.ndarray,
                size: int = 112) -> torch.Tensor:
    """Differentiable ArcFace alignment: faces [F, 3, size, size] from ``images`` [B, 3, H, W].

    Face f is cut from ``images[image_index[f]]`` with the similarity matrix that takes its 5 landmarks
    (ArcFace order, pixels of ``images``) to the ArcFace template (kornia's bilinear ``warp_affine``).
    """
    from kornia.geometry.transform import warp_affine

    mats = _matrices(landmarks, size).to(images.device, images.dtype)
    src = images[image_index.to(images.device)]
    return warp_affine(src, mats, dsize=(size, size), mode="bilinear", padding_mode="zeros", align_corners=True)


def id_loss(pred_images: torch.Tensor, gt_images: torch.Tensor, image_index: torch.Tensor,
            landmarks: torch.Tensor | np.ndarray, embed: Callable[[torch.Tensor], torch.Tensor],
            weights: torch.Tensor | None = None, return_embeddings: bool = False):
    """GT-aligned ID loss: mean over faces of w_f·(1 − cos(embed(align(pred)), embed(align(gt)))).

    ``pred_images``/``gt_images`` [B, 3, H, W] in the pixel range ``embed`` expects; the *ground-truth*
    landmarks align both images, so the loss compares the same face region. GT embeddings carry no
    gradient. With ``return_embeddings`` also returns (pred_emb, gt_emb), unit-norm [F, D].
    """
    pred_faces = align_faces(pred_images, image_index, landmarks)
    with torch.no_grad():
        gt_emb = F.normalize(embed(align_faces(gt_images, image_index, landmarks)).float(), dim=-1)
    pred_emb = F.normalize(embed(pred_faces).float(), dim=-1)
    per_face = 1.0 - (pred_emb * gt_emb).sum(-1)
    if weights is not None:
        per_face = per_face * weights.to(per_face)
    loss = per_face.mean() if per_face.numel() else pred_images.sum() * 0.0
    return (loss, pred_emb, gt_emb) if return_embeddings else loss


def info_nce(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float = 0.1,
             negative_mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE: mean_f w_f·(−log softmax([q·p, q·n₁, …] / τ)[0]) on unit-normalised vectors.

    ``query``/``positive`` [F, D]; ``negatives`` [K, D] shared by every query or [F, K, D];
    ``negative_mask`` [F, K] bool, False drops that negative for that query (e.g. the query's own face
    or another photo of the same identity).
    """
    q = F.normalize(query.float(), dim=-1)
    p = F.normalize(positive.float(), dim=-1)
    n = F.normalize(negatives.float(), dim=-1)
    pos = (q * p).sum(-1, keepdim=True)
    neg = q @ n.T if n.ndim == 2 else torch.einsum("fd,fkd->fk", q, n)
    if negative_mask is not None:
        neg = neg.masked_fill(~negative_mask.to(neg.device, torch.bool), float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / temperature
    per = -torch.log_softmax(logits, dim=1)[:, 0]
    if weights is not None:
        per = per * weights.to(per)
    return per.mean() if per.numel() else query.sum() * 0.0
