"""FLUX.1-dev-size configs of every pipeline component (transformer, T5-XXL, CLIP-L, VAE, SigLIP-base, adapter)
and builders for them on any device (``meta`` for counting), shared by the benchmarks."""

from __future__ import annotations

from typing import Any

import torch

#: FLUX.1-dev transformer (19 double + 38 single blocks, width 3072 = 24 heads × 128).
FLUX_DEV = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
#: google/t5-v1_1-xxl encoder (FLUX's text_encoder_2).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
#: openai/clip-vit-large-patch14 text tower (FLUX's text_encoder).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768)
#: FLUX's VAE (16 latent channels, no quant convs).
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
#: google/siglip-base-patch16-256 vision tower (the adapter's SigLIP branch).
SIGLIP_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=256, patch_size=16)


def _on(device: Any, dtype: torch.dtype | None, seed: int, build):
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            return build().eval()
    finally:
        torch.set_default_dtype(previous)


def transformer(device: Any = "meta", dtype: torch.dtype | None = None, **overrides: Any):
    """A random FLUX.1-dev ``FluxTransformer2DModel`` (``overrides``: e.g. ``num_layers=1`` for a slice)."""
    from diffusers import FluxTransformer2DModel

    cfg = {**FLUX_DEV, **overrides}
    return _on(device, dtype, 0, lambda: FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True,
                                                                **cfg))


def adapter(device: Any = "meta", dtype: torch.dtype | None = None, **overrides: Any):
    """The release-size WithAnyone adapter (both branches; ``overrides``: e.g. block counts for a slice)."""
    from withanyone.model import WithAnyoneAdapter

    return _on(device, dtype, 1, lambda: WithAnyoneAdapter(**overrides))


def t5(device: Any = "meta", dtype: torch.dtype | None = None, **overrides: Any):
    """A random T5-XXL encoder (``overrides``: e.g. ``num_layers=1``)."""
    from transformers import T5Config, T5EncoderModel

    return _on(device, dtype, 2, lambda: T5EncoderModel(T5Config(**{**T5_XXL, **overrides})))


def clip(device: Any = "meta", dtype: torch.dtype | None = None):
    """A random CLIP-L text tower."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return _on(device, dtype, 3, lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)))


def vae(device: Any = "meta", dtype: torch.dtype | None = None):
    """A random FLUX VAE."""
    from diffusers import AutoencoderKL

    return _on(device, dtype, 4, lambda: AutoencoderKL(**FLUX_VAE))


def siglip(device: Any = "meta", dtype: torch.dtype | None = None):
    """A random SigLIP-base vision tower (256² input, 256 tokens)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return _on(device, dtype, 5, lambda: SiglipVisionModel(SiglipVisionConfig(num_channels=3, **SIGLIP_BASE)))


def count(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())
