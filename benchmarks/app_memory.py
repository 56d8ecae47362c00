"""Expected peak GPU memory of each ``withanyone app --low-vram`` preset at FLUX.1-dev size, *computed* from
parameter counts (models built on the meta device: no weights, no GPU). Weights only, bf16 (2 bytes/param;
nf4: 0.5 byte per quantized Linear weight plus bf16 for the rest); activations come on top (about 1–3 GB at
1024×1024 with 4096 image tokens — not computed here). Last line: one JSON object."""

from __future__ import annotations

import json
import time

import torch

GB = 1e9


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linear_weights(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def build() -> dict[str, torch.nn.Module]:
    """FLUX-dev transformer, T5-XXL encoder, CLIP-L text, FLUX VAE, SigLIP-base vision, WithAnyone adapter."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
    )

    from withanyone.model import WithAnyoneAdapter

    with torch.device("meta"):
        return {
            "transformer": FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56)),
            "adapter": WithAnyoneAdapter(),
            "t5": T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                          num_heads=64, feed_forward_proj="gated-gelu")),
            "clip": CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                 num_hidden_layers=12, num_attention_heads=12,
                                                 max_position_embeddings=77, projection_dim=768)),
            "vae": AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                                 layers_per_block=2, latent_channels=16, use_quant_conv=False,
                                 use_post_quant_conv=False),
            "siglip": SiglipVisionModel(SiglipVisionConfig(hidden_size=768, intermediate_size=3072,
                                                           num_hidden_layers=12, num_attention_heads=12,
                                                           image_size=256, patch_size=16)),
        }


def main() -> None:
    t0 = time.perf_counter()
    m = build()
    n = {k: _count(v) for k, v in m.items()}
    b = {k: 2 * v for k, v in n.items()}  # bf16 bytes
    tr = m["transformer"]
    blocks = [*tr.transformer_blocks, *tr.single_transformer_blocks]
    max_block = max(_count(x) for x in blocks)
    non_block = n["transformer"] - sum(_count(x) for x in blocks)
    t5_blocks = list(m["t5"].encoder.block)
    t5_max_block = max(_count(x) for x in t5_blocks)
    t5_non_block = n["t5"] - sum(_count(x) for x in t5_blocks)
    small = b["clip"] + b["vae"] + b["siglip"]
    q_lin = _linear_weights(tr)
    nf4_transformer = 0.5 * q_lin + 2 * (n["transformer"] - q_lin)
    presets = {
        # everything resident
        "none": sum(b.values()),
        # one model at a time; the adapter rides with the transformer (largest stage: transformer + adapter)
        "model-offload": max(b["transformer"] + b["adapter"], b["t5"], b["clip"], b["vae"], b["siglip"]),
        # adapter/CLIP/VAE/SigLIP resident; transformer and T5 stream one block per group with one prefetched
        "group-offload": b["adapter"] + small + 2 * max(non_block + 2 * max_block, t5_non_block + 2 * t5_max_block),
        # 4-bit transformer + model offload
        "nf4": max(nf4_transformer + b["adapter"], b["t5"]),
    }
    print("| component | parameters | bf16 weights |")
    print("|---|---:|---:|")
    for k in n:
        print(f"| {k} | {n[k] / 1e9:.3f} B | {b[k] / GB:.2f} GB |")
    print()
    print("| preset | expected peak (weights, computed) |")
    print("|---|---:|")
    for k, v in presets.items():
        print(f"| {k} | {v / GB:.1f} GB |")
    print(json.dumps({"params": n, "preset_peak_gb": {k: round(v / GB, 2) for k, v in presets.items()},
                      "largest_transformer_block": max_block, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
