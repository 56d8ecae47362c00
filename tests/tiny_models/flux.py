"""Tiny random-weight FLUX transformer (facts §5) and matching adapter/inputs, shared by model and pipeline tests."""

from __future__ import annotations

import torch

TINY_WIDTH = 192  # 3 heads × 64
TINY_HEADS = 3
TINY_TEXT_DIM = 64
TINY_POOLED_DIM = 32
TINY_IN_CHANNELS = 64


def tiny_flux_transformer(seed: int | None = None, num_layers: int = 2, num_single_layers: int = 2):
    """A width-192 ``FluxTransformer2DModel`` (2 double + 2 single blocks by default), fp32, eval mode.

    With ``seed=None`` the current torch RNG state is used (callers may seed it themselves).
    """
    from diffusers import FluxTransformer2DModel

    if seed is not None:
        torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=TINY_IN_CHANNELS,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=64,
        num_attention_heads=TINY_HEADS,
        joint_attention_dim=TINY_TEXT_DIM,
        pooled_projection_dim=TINY_POOLED_DIM,
        guidance_embeds=True,
        axes_dims_rope=(8, 28, 28),
    )
    return model.eval()


def tiny_adapter(
    seed: int | None = 0,
    num_double_blocks: int = 2,
    num_single_blocks: int = 2,
    use_siglip: bool = True,
    siglip_dim: int = 768,
    scale_out: float = 1.0,
):
    """A random ``WithAnyoneAdapter`` for :func:`tiny_flux_transformer` (ArcFace 512-d, 8 tokens).

    ``scale_out`` multiplies every ``to_out`` weight, to make residuals clearly visible in tests.
    """
    from withanyone.model import WithAnyoneAdapter

    if seed is not None:
        torch.manual_seed(seed)
    adapter = WithAnyoneAdapter(
        num_double_blocks=num_double_blocks,
        num_single_blocks=num_single_blocks,
        hidden_size=TINY_WIDTH,
        num_heads=TINY_HEADS,
        head_dim=64,
        arcface_dim=512,
        siglip_dim=siglip_dim,
        num_arc_tokens=8,
        use_siglip=use_siglip,
    )
    if scale_out != 1.0:
        with torch.no_grad():
            for name, p in adapter.named_parameters():
                if name.endswith("to_out.weight"):
                    p.mul_(scale_out)
    return adapter.eval()


def tiny_flux_inputs(
    batch: int = 1, height: int = 256, width: int = 256, text_len: int = 16, seed: int = 0, extra_tokens: int = 0
) -> dict:
    """Keyword arguments for one transformer call on an ``height``×``width`` image (+ ``extra_tokens`` Kontext tokens)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = height // 16, width // 16
    length = rows * cols
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    img_ids = ids.reshape(length, 3)
    if extra_tokens:
        ref = torch.zeros(extra_tokens, 3)
        ref[:, 0] = 1
        ref[:, 1] = torch.arange(extra_tokens) // cols
        ref[:, 2] = torch.arange(extra_tokens) % cols
        img_ids = torch.cat([img_ids, ref])
    return {
        "hidden_states": torch.randn(batch, length + extra_tokens, TINY_IN_CHANNELS, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_len, TINY_TEXT_DIM, generator=g),
        "pooled_projections": torch.randn(batch, TINY_POOLED_DIM, generator=g),
        "timestep": torch.full((batch,), 0.7),
        "guidance": torch.full((batch,), 3.5),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text_len, 3),
        "return_dict": False,
    }


def random_identities(batch: int = 1, people: int = 2, siglip_tokens: int = 256, siglip_dim: int = 768, seed: int = 0):
    """Unit-norm ArcFace embeddings [B, N, 512] and SigLIP features [B, N, T, 768] drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    arc = torch.nn.functional.normalize(torch.randn(batch, people, 512, generator=g), dim=-1)
    sig = torch.randn(batch, people, siglip_tokens, siglip_dim, generator=g)
    return arc, sig
