"""The mini base generator: a small ``FluxTransformer2DModel`` over an linear patch "VAE", trained from scratch.

:class:`PatchifyVAE` stands in for FLUX's VAE with the same interface (``encode(x).latent_dist`` with a
mean and a std, ``decode(z, return_dict=False)``, ``config.scaling_factor`` / ``shift_factor`` /
``block_out_channels``) and the same geometry: an 8× downsampling, so 2×2 packing gives FLUX's 16-pixel
image tokens and the adapter's box masks see the layout they see at full scale. Its latent is each 8×8
patch's top principal components (fitted once on the training canvases): encode and decode are linear maps,
differentiable, with a small, fixed reconstruction loss (fine detail beyond 16 components per patch).

The transformer learns rectified flow on the mini world's group canvases with one constant prompt
embedding (the role of "n people" prompts; it carries no information), then is frozen — the role FLUX plays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from withanyone.train.losses import flow_matching_loss, noisy_latents

from .world import CANVAS, random_layout, render_canvas

__all__ = ["PatchifyVAE", "mini_transformer", "mini_pipeline", "train_base", "PROMPT", "prompt_table",
           "canvas_batch", "to_pixels", "MINI_WIDTH", "MINI_HEADS", "TEXT_DIM", "POOLED_DIM"]

#: The constant prompt every mini image is trained and sampled with.
PROMPT = "mini"
MINI_WIDTH = 96
MINI_HEADS = 2
TEXT_DIM = 32
POOLED_DIM = 32
TEXT_TOKENS = 4
#: Principal components kept per 8×8 patch: 4 × 16 = 64 numbers per 16-px image token (width 96).
LATENT_CHANNELS = 16


class PatchifyVAE(ModelMixin, ConfigMixin):
    """A linear 8× "VAE": each 8×8×3 pixel patch ↔ its top ``latent_channels`` principal components.

    Fitted (PCA, :meth:`fit`) on the training canvases, not trained by gradient. Encoding is a projection,
    decoding its least-squares inverse; both are exact linear maps (differentiable, deterministic).
    """

    @register_to_config
    def __init__(self, patch: int = 8, in_channels: int = 3, latent_channels: int = LATENT_CHANNELS,
                 scaling_factor: float = 1.0, shift_factor: float = 0.0,
                 block_out_channels: tuple[int, ...] = (1, 1, 1, 1)):
        super().__init__()
        if 2 ** (len(block_out_channels) - 1) != patch:
            raise ValueError(f"block_out_channels must have log2(patch)+1 = {int(np.log2(patch)) + 1} entries "
                             "(FluxPipeline reads the scale factor from it)")
        d = in_channels * patch * patch
        self.mean = nn.Parameter(torch.zeros(d), requires_grad=False)
        self.basis = nn.Parameter(torch.eye(d)[:, :latent_channels].clone(), requires_grad=False)  # [d, k]
        self.scale = nn.Parameter(torch.ones(latent_channels), requires_grad=False)

    @torch.no_grad()
    def fit(self, pixels: torch.Tensor) -> PatchifyVAE:
        """Principal components of the patches of ``pixels`` [N, 3, H, W] in [−1, 1]; returns self."""
        p = F.pixel_unshuffle(pixels.float(), self.config.patch).permute(0, 2, 3, 1).reshape(-1, self.mean.numel())
        mean = p.mean(0)
        cov = (p - mean).T @ (p - mean) / len(p)
        ev, vec = torch.linalg.eigh(cov.double())
        k = self.config.latent_channels
        ev, vec = ev.flip(0)[:k].float(), vec.flip(1)[:, :k].float()
        self.mean.copy_(mean)
        self.basis.copy_(vec)
        # one global scale (latents of unit variance on average), not whitening: the leading components —
        # layout, colours, shapes — dominate the flow loss, as in a VAE's latent space
        self.scale.copy_(torch.full_like(ev, float(ev.clamp_min(0).mean().sqrt())))
        return self

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Pixels [B, 3, H, W] in [−1, 1] → a (degenerate, std ≈ 0) Gaussian over the patch latents."""
        p = F.pixel_unshuffle(x, self.config.patch).permute(0, 2, 3, 1)
        z = ((p - self.mean.to(p)) @ self.basis.to(p)) / self.scale.to(p)
        mean = z.permute(0, 3, 1, 2)
        dist = DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, -30.0)], dim=1))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None):
        """Latents → pixels: each patch is the mean plus its components (linear, differentiable)."""
        q = z.permute(0, 2, 3, 1)
        p = (q * self.scale.to(q)) @ self.basis.to(q).T + self.mean.to(q)
        x = F.pixel_shuffle(p.permute(0, 3, 1, 2), self.config.patch)
        return DecoderOutput(sample=x) if return_dict else (x,)


def mini_transformer(seed: int = 0):
    """A 2 double + 2 single block FLUX transformer of width 96 over the patch latents (4·16 = 64 per token)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2, attention_head_dim=MINI_WIDTH // MINI_HEADS,
        num_attention_heads=MINI_HEADS, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
        guidance_embeds=False, axes_dims_rope=(8, 20, 20),
    )


def prompt_table(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The constant prompt's (sequence [1, 4, 32], pooled [1, 32]) embedding, fixed random numbers."""
    g = torch.Generator().manual_seed(seed + 17)
    return {PROMPT: (torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g), torch.randn(1, POOLED_DIM, generator=g))}


def mini_pipeline(transformer: Any, vae: Any, adapter: Any = None, face_analyzer: Any = None):
    """A ``WithAnyonePipeline`` of the mini components (no text encoders: pass ``prompt_embeds``)."""
    from withanyone.pipeline.pipeline import WithAnyonePipeline
    from withanyone.pipeline.tiny import tiny_scheduler

    pipe = WithAnyonePipeline(scheduler=tiny_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                              text_encoder_2=None, tokenizer_2=None, transformer=transformer, adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    if face_analyzer is not None:
        pipe.set_face_analyzer(face_analyzer)
    pipe.model_sources = {"mini": {"note": "the mini model (synthetic sprites), not FLUX"}}
    return pipe


def canvas_batch(rng: np.random.Generator, people: list, batch: int) -> list:
    """``batch`` group canvases with 1–3 random people from ``people``."""
    out = []
    for _ in range(batch):
        n = int(rng.integers(1, 4))
        who = [people[i] for i in rng.choice(len(people), n, replace=False)]
        out.append(render_canvas(who, random_layout(n, rng, CANVAS), int(rng.integers(1 << 30))))
    return out


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images → [B, 3, H, W] in [−1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_base(canvases: list, vae: PatchifyVAE, steps: int, seed: int = 0, batch: int = 16, lr: float = 1e-3, log: Any = print,
               log_every: int = 100):
    """Train :func:`mini_transformer` from scratch with rectified flow on ``canvases`` (random batches, with
    horizontal flips); returns it frozen."""
    from diffusers import FluxPipeline

    transformer = mini_transformer(seed)
    embeds, pooled = prompt_table(seed)[PROMPT]
    rng = np.random.default_rng(seed + 1000)
    g = torch.Generator().manual_seed(seed + 2000)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.1, 1 - s / max(steps, 1)))
    transformer.train()
    h = w = CANVAS // 8
    txt_ids = torch.zeros(TEXT_TOKENS, 3)
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, "cpu", torch.float32)
    running = None
    for step in range(steps):
        idx = rng.choice(len(canvases), batch, replace=False)
        x = to_pixels([canvases[int(i)].image for i in idx])
        flip = torch.from_numpy(rng.random(batch) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        with torch.no_grad():
            x0 = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        t = torch.rand(batch, generator=g)  # uniform noise levels: the last sampling steps (t → 0) need training too
        noise = torch.randn(x0.shape, generator=g)
        c = x0.shape[1]
        packed = FluxPipeline._pack_latents(noisy_latents(x0, noise, t), batch, c, h, w)
        v = transformer(hidden_states=packed, timestep=t, guidance=None, pooled_projections=pooled.expand(batch, -1),
                        encoder_hidden_states=embeds.expand(batch, -1, -1), txt_ids=txt_ids, img_ids=img_ids,
                        return_dict=False)[0]
        loss = flow_matching_loss(v, FluxPipeline._pack_latents(x0, batch, c, h, w),
                                  FluxPipeline._pack_latents(noise, batch, c, h, w))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        lv = float(loss.detach())
        running = lv if running is None else 0.98 * running + 0.02 * lv
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(f"base generator step {step + 1}/{steps}: flow loss {running:.4f}")
    return transformer.eval().requires_grad_(False)


def save_transformer(transformer: Any, folder: str | Path) -> Path:
    """``save_pretrained`` (safetensors) of the base transformer."""
    transformer.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def load_transformer(folder: str | Path):
    """The frozen base transformer saved by :func:`save_transformer`."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(str(folder)).eval().requires_grad_(False)
