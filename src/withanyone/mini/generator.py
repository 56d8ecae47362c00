"""The mini base generator: a small ``FluxTransformer2DModel`` over an exact patchify "VAE", trained from scratch.

:class:`PatchifyVAE` stands in for FLUX's VAE with the same interface (``encode(x).latent_dist`` with a
mean and a std, ``decode(z, return_dict=False)``, ``config.scaling_factor`` / ``shift_factor`` /
``block_out_channels``) and the same geometry: an 8× downsampling, so 2×2 packing gives FLUX's 16-pixel
image tokens and the adapter's box masks see the layout they see at full scale. Its "latent" is the
pixels themselves, rearranged: encode and decode are exact inverses (no training, no blur, differentiable).

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
           "canvas_batch", "MINI_WIDTH", "MINI_HEADS", "TEXT_DIM", "POOLED_DIM"]

#: The constant prompt every mini image is trained and sampled with.
PROMPT = "mini"
MINI_WIDTH = 96
MINI_HEADS = 2
TEXT_DIM = 32
POOLED_DIM = 32
TEXT_TOKENS = 4


class PatchifyVAE(ModelMixin, ConfigMixin):
    """An exact, parameter-free 8× "VAE": latents are 8×8 pixel patches stacked into 192 channels."""

    @register_to_config
    def __init__(self, patch: int = 8, in_channels: int = 3, scaling_factor: float = 2.0, shift_factor: float = 0.0,
                 block_out_channels: tuple[int, ...] = (1, 1, 1, 1)):
        super().__init__()
        if 2 ** (len(block_out_channels) - 1) != patch:
            raise ValueError(f"block_out_channels must have log2(patch)+1 = {int(np.log2(patch)) + 1} entries "
                             "(FluxPipeline reads the scale factor from it)")
        # one (unused) parameter so that `next(vae.parameters())` gives the dtype/device as for a real VAE
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    @property
    def latent_channels(self) -> int:
        """Channels of a latent: 3·patch²."""
        return self.config.in_channels * self.config.patch ** 2

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Pixels [B, 3, H, W] in [−1, 1] → a (degenerate, std ≈ 0) Gaussian over the patch latents."""
        mean = F.pixel_unshuffle(x, self.config.patch)
        dist = DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, -30.0)], dim=1))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None):
        """Patch latents → pixels (the exact inverse of :meth:`encode`)."""
        x = F.pixel_shuffle(z, self.config.patch)
        return DecoderOutput(sample=x) if return_dict else (x,)


def mini_transformer(seed: int = 0):
    """A 2 double + 2 single block FLUX transformer of width 96 over the patchify latents (768 → 96)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 192, num_layers=2, num_single_layers=2, attention_head_dim=MINI_WIDTH // MINI_HEADS,
        num_attention_heads=MINI_HEADS, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
        guidance_embeds=False, axes_dims_rope=(8, 20, 20),
    )


def prompt_table(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The constant prompt's (sequence [1, 4, 32], pooled [1, 32]) embedding, fixed random numbers."""
    g = torch.Generator().manual_seed(seed + 17)
    return {PROMPT: (torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g), torch.randn(1, POOLED_DIM, generator=g))}


def mini_pipeline(transformer: Any, adapter: Any = None, face_analyzer: Any = None):
    """A ``WithAnyonePipeline`` of the mini components (no text encoders: pass ``prompt_embeds``)."""
    from withanyone.pipeline.pipeline import WithAnyonePipeline
    from withanyone.pipeline.tiny import tiny_scheduler

    pipe = WithAnyonePipeline(scheduler=tiny_scheduler(), vae=PatchifyVAE(), text_encoder=None, tokenizer=None,
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


def train_base(canvases: list, steps: int, seed: int = 0, batch: int = 16, lr: float = 1e-3, log: Any = print,
               log_every: int = 100):
    """Train :func:`mini_transformer` from scratch with rectified flow on ``canvases`` (random batches, with
    horizontal flips); returns it frozen."""
    from diffusers import FluxPipeline

    transformer = mini_transformer(seed)
    vae = PatchifyVAE()
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
        t = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal noise levels
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
