"""Training memory plan at FLUX-dev size: per-GPU bytes per strategy and GPU count, and the largest batch.

Parameter counts come from the real model classes built on the meta device (no weights, nothing
allocated): FLUX.1-dev transformer (frozen), the release's adapter (both branches trainable, as the release
trains them), T5-XXL + CLIP-L text encoders, the FLUX VAE and the ID loss's ArcFace r100 (frozen).

Per-GPU static memory, mixed precision as DeepSpeed counts it (bf16 weights 2 B and gradients 2 B, fp32
master weights + Adam m and v 12 B per trainable parameter), for N = 1, 8, 64 GPUs:

- ``ddp``: everything replicated; T5 + CLIP resident on every GPU.
- ``zero2``: optimiser state and gradients sharded over N, bf16 trainable weights and the frozen FLUX
  replicated; the text encoders under ZeRO-3 with CPU offload (the release's setup): none on the GPU.
- ``zero3`` (ZeRO-3 or FSDP full shard): trainable and frozen weights, gradients, state and the text
  encoders sharded over N, plus the largest block gathered for compute.

Activations are measured, not estimated: one double + one single FLUX block at full width (3072, 24 heads)
with the adapter's two cross-attentions, bf16 on the CPU, input hidden states requiring grad (as every block
does in training, gradients flow back to earlier adapter layers); the bytes of every tensor autograd saves
for backward are summed (``saved_tensors_hooks``, storages counted once, parameters excluded) at two token
counts, and the difference gives bytes per token (fixed costs cancel). CPU attention is PyTorch's flash
kernel, which saves O(L) like the GPU kernels. The same is done for the VAE decoder (bytes per output
pixel; the ID loss decodes x̂₀) and ArcFace r100 (bytes per face). With gradient checkpointing (of the
frozen transformer's blocks and the VAE decoder's mid/up blocks, as the loop does), each block keeps only
its inputs and one block at a time is recomputed.

    python benchmarks/train_memory.py [--covered 0.125] [--reserve-gb 4]

Last line: ``{"fits_80gb_zero2_8gpu": …, "fits_48gb_best": …, …}`` (fits = batch ≥ 1 per GPU at 512² with
checkpointing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GB = 1e9
STRATEGIES = ("ddp", "zero2", "zero3")
GPUS = (1, 8, 64)
TEXT_TOKENS = 512  # T5 tokens per prompt, as in FLUX-dev training and inference
PEOPLE = 4  # worst case of the 1–4 people per sample


def param_counts() -> dict[str, int]:
    """Parameters of every component at release size, from the real classes on the meta device."""
    import _flux_dev as fd

    from withanyone.train.arcface import iresnet

    def n(m) -> int:
        return sum(p.numel() for p in m.parameters())

    tr, ad, t5, clip, vae = fd.transformer(), fd.adapter(), fd.t5(), fd.clip(), fd.vae()
    with torch.device("meta"):
        arc = iresnet("r100")
    blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
    arc_branch = n(ad.arcface_in_arc) + n(ad.ipa_arc)
    return {"flux": n(tr), "largest_block": max(n(b) for b in blocks), "adapter": n(ad), "adapter_arcface_branch":
            arc_branch, "t5": n(t5), "clip": n(clip), "vae": n(vae), "arcface_r100": n(arc)}


class SavedBytes:
    """Bytes of the tensors autograd saves for backward, per phase, each storage counted once."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.phase = "other"
        self.seen: dict[int, tuple[str, int]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.exclude and key not in self.seen:
            self.seen[key] = (self.phase, storage.nbytes())
        return t

    def by_phase(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for phase, nbytes in self.seen.values():
            out[phase] = out.get(phase, 0) + nbytes
        return out


def _storages(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def flux_slice_bytes(side: int, covered: float, dtype: torch.dtype) -> tuple[dict[str, int], int]:
    """Saved bytes per phase (double / single block incl. its adapter residual) at a ``side``² token grid."""
    from diffusers import FluxTransformer2DModel

    from withanyone.model import WithAnyoneAdapter

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        ad = WithAnyoneAdapter(num_double_blocks=1, num_single_blocks=1)
    finally:
        torch.set_default_dtype(previous)
    tr.requires_grad_(False).train()
    ad.requires_grad_(True).train().attach(tr)
    img, txt = side * side, max(1, round(TEXT_TOKENS * side * side / 4096))
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    g = torch.Generator().manual_seed(0)
    # two people whose boxes cover ``covered`` of the image tokens together
    box = side * 16 * (covered / 2) ** 0.5
    boxes = [[(0.0, 0.0, box, box), (side * 16 - box, side * 16 - box, side * 16.0, side * 16.0)]]
    saved = SavedBytes(_storages(tr) | _storages(ad))

    def tag(name: str):
        def hook(*_):
            saved.phase = name
        return hook

    tr.transformer_blocks[0].register_forward_pre_hook(tag("double"))
    tr.single_transformer_blocks[0].register_forward_pre_hook(tag("single"))
    tr.norm_out.register_forward_pre_hook(tag("other"))
    hidden = torch.randn(1, img, 64, generator=g).to(dtype).requires_grad_(True)
    with ad.identities(arcface=torch.randn(1, 2, 512, generator=g).to(dtype),
                       siglip=torch.randn(1, 2, 256, 768, generator=g).to(dtype), boxes=boxes,
                       height=side * 16, width=side * 16, id_weight=1.0, siglip_weight=1.0):
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            out = tr(hidden_states=hidden, encoder_hidden_states=torch.randn(1, txt, 4096, generator=g).to(dtype),
                     pooled_projections=torch.randn(1, 768, generator=g).to(dtype),
                     timestep=torch.tensor([0.5], dtype=dtype), guidance=torch.tensor([4.0], dtype=dtype),
                     img_ids=ids.reshape(-1, 3).to(dtype), txt_ids=torch.zeros(txt, 3, dtype=dtype),
                     return_dict=False)[0]
    del out
    ad.detach()
    return saved.by_phase(), img + txt


def decoder_bytes(side: int, dtype: torch.dtype) -> tuple[int, int]:
    """Saved bytes of the FLUX VAE decoder producing a ``side``² image from a latent that requires grad:
    (without checkpointing, with the mid and up blocks checkpointed as diffusers does: their inputs kept, the
    largest one recomputed at a time)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    finally:
        torch.set_default_dtype(previous)
    vae.requires_grad_(False)
    saved = SavedBytes(_storages(vae))
    inputs: dict[str, int] = {}
    blocks = {"mid": vae.decoder.mid_block, **{f"up{i}": b for i, b in enumerate(vae.decoder.up_blocks)}}
    for name, block in blocks.items():
        def pre(_module, args, name=name):
            saved.phase = name
            inputs[name] = args[0].untyped_storage().nbytes()

        block.register_forward_pre_hook(pre)
        block.register_forward_hook(lambda *_: setattr(saved, "phase", "other"))
    z = torch.randn(1, 16, side // 8, side // 8, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        vae.decode(z).sample.sum()
    phases = saved.by_phase()
    plain = sum(phases.values())
    in_blocks = {k: v for k, v in phases.items() if k in blocks}
    ckpt = plain - sum(in_blocks.values()) + sum(inputs.values()) + max(in_blocks.values())
    return plain, ckpt


def arcface_bytes(faces: int) -> int:
    """Saved bytes of ArcFace r100 (fp32, frozen) on ``faces`` crops requiring grad (the ID loss's backward)."""
    from withanyone.train.arcface import iresnet

    net = iresnet("r100").eval().requires_grad_(False)
    saved = SavedBytes(_storages(net))
    x = (torch.rand(faces, 3, 112, 112) * 255).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        net(x).sum()
    return sum(saved.by_phase().values())


def static_gb(p: dict[str, int], strategy: str, n: int) -> dict[str, float]:
    """Per-GPU GB of weights, grads, optimiser state, frozen base, text encoders and frozen extras."""
    t = p["adapter"]
    shard = n if strategy == "zero3" else 1
    rows = {
        "trainable_weights": 2 * t / shard,
        "gradients": 2 * t / (1 if strategy == "ddp" else n),
        "optimizer_state": 12 * t / (1 if strategy == "ddp" else n),
        "frozen_base": 2 * p["flux"] / shard + (2 * p["largest_block"] if strategy == "zero3" and n > 1 else 0),
        "text_encoders": {"ddp": 2 * (p["t5"] + p["clip"]), "zero2": 0.0, "zero3": 2 * (p["t5"] + p["clip"]) / n}[strategy],
        "vae_arcface": 2 * p["vae"] + 4 * p["arcface_r100"],
    }
    return {k: v / GB for k, v in rows.items()}


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--covered", type=float, default=0.125, help="fraction of image tokens inside face boxes")
    ap.add_argument("--reserve-gb", type=float, default=4.0, help="CUDA context, allocator fragmentation, buffers")
    ap.add_argument("--sides", default="8,16", help="two token-grid sides for the activation slope")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    p = param_counts()
    print("parameters (M): " + ", ".join(f"{k} {v / 1e6:,.1f}" for k, v in p.items()), flush=True)

    s1, s2 = (int(x) for x in args.sides.split(","))
    a, n1 = flux_slice_bytes(s1, args.covered, torch.bfloat16)
    b, n2 = flux_slice_bytes(s2, args.covered, torch.bfloat16)
    phases = ("double", "single", "other")
    per_token = {k: (b.get(k, 0) - a.get(k, 0)) / (n2 - n1) for k in phases}
    fixed = {k: max(0.0, a.get(k, 0) - per_token[k] * n1) for k in phases}  # ID-token work: per block, per sample
    print(f"activations saved per token (bf16, width 3072, adapter on {args.covered:.3f} of image tokens, slope "
          f"between {n1} and {n2} tokens): double block + adapter {per_token['double'] / 1e3:.1f} kB, single block "
          f"+ adapter {per_token['single'] / 1e3:.1f} kB, outside blocks {per_token['other'] / 1e3:.1f} kB; fixed per "
          f"sample (ID tokens of 2 people, K/V per block, token encoders): double {fixed['double'] / 1e6:.1f} MB, "
          f"single {fixed['single'] / 1e6:.1f} MB, outside {fixed['other'] / 1e6:.1f} MB", flush=True)
    (d1, c1), (d2, c2) = decoder_bytes(64, torch.bfloat16), decoder_bytes(128, torch.bfloat16)
    vae_per_px = (d2 - d1) / (128 * 128 - 64 * 64)
    vae_per_px_ckpt = (c2 - c1) / (128 * 128 - 64 * 64)
    arc_face = arcface_bytes(2) - arcface_bytes(1)
    print(f"VAE decoder (bf16): {vae_per_px:.0f} B per output pixel, {vae_per_px_ckpt:.0f} B with its blocks "
          f"checkpointed; ArcFace r100 (fp32): "
          f"{arc_face / 1e6:.1f} MB per face", flush=True)

    def per_sample_gb(res: int, ckpt: bool) -> float:
        tokens = (res // 16) ** 2 + TEXT_TOKENS
        people = PEOPLE / 2  # the slice measured 2 people; ID-token costs scale with people
        if ckpt:  # block inputs (hidden + text stream, bf16) kept per block, one block recomputed at a time
            blocks = 57 * tokens * 3072 * 2 + max(tokens * per_token[k] + people * fixed[k] for k in ("double", "single"))
        else:
            blocks = (tokens * (19 * per_token["double"] + 38 * per_token["single"])
                      + people * (19 * fixed["double"] + 38 * fixed["single"]))
        outside = tokens * per_token["other"] + people * fixed["other"]
        vae = res * res * (vae_per_px_ckpt if ckpt else vae_per_px)
        return (blocks + outside + vae + PEOPLE * arc_face) / GB

    table = {s: {n: static_gb(p, s, n) for n in GPUS} for s in STRATEGIES}
    print(f"\nper-GPU static memory, GB (trainable: the whole adapter, {p['adapter'] / 1e9:.2f} B parameters)")
    print(f"{'':18s}" + "".join(f"{s + ' ×' + str(n):>12s}" for s in STRATEGIES for n in GPUS))
    for row in next(iter(next(iter(table.values())).values())):
        print(f"{row:18s}" + "".join(f"{table[s][n][row]:12.2f}" for s in STRATEGIES for n in GPUS))
    print(f"{'total':18s}" + "".join(f"{sum(table[s][n].values()):12.2f}" for s in STRATEGIES for n in GPUS))

    batches: dict[str, dict] = {}
    print(f"\nactivations per sample, GB ({PEOPLE} faces, ID loss on): "
          + ", ".join(f"{r}² {per_sample_gb(r, True):.2f} with checkpointing / {per_sample_gb(r, False):.2f} without"
                      for r in (512, 1024)))
    print(f"largest batch per GPU (reserve {args.reserve_gb:g} GB), with checkpointing (without):")
    for budget in (80, 48):
        for s in STRATEGIES:
            for n in GPUS:
                free = budget - args.reserve_gb - sum(table[s][n].values())
                key = f"{budget}gb_{s}_{n}gpu"
                batches[key] = {r: [max(0, int(free // per_sample_gb(r, c))) if free > 0 else 0 for c in (True, False)]
                                for r in (512, 1024)}
            line = "  ".join(f"×{n}: 512² {batches[f'{budget}gb_{s}_{n}gpu'][512][0]} ({batches[f'{budget}gb_{s}_{n}gpu'][512][1]}),"
                             f" 1024² {batches[f'{budget}gb_{s}_{n}gpu'][1024][0]} ({batches[f'{budget}gb_{s}_{n}gpu'][1024][1]})"
                             for n in GPUS)
            print(f"  {budget} GB {s:6s} {line}")
    fits = {k: v[512][0] >= 1 for k, v in batches.items()}
    result = {
        "fits_80gb_zero2_8gpu": fits["80gb_zero2_8gpu"],
        "fits_48gb_best": any(v for k, v in fits.items() if k.startswith("48gb_") and k.endswith("_8gpu")),
        "fits_48gb_zero2_8gpu": fits["48gb_zero2_8gpu"],
        "fits_80gb_ddp_1gpu": fits["80gb_ddp_1gpu"],
        "max_batch_512_80gb_zero2_8gpu": batches["80gb_zero2_8gpu"][512][0],
        "max_batch_1024_80gb_zero2_8gpu": batches["80gb_zero2_8gpu"][1024][0],
        "max_batch_512_48gb_zero3_8gpu": batches["48gb_zero3_8gpu"][512][0],
        "static_gb_zero2_8gpu": round(sum(table["zero2"][8].values()), 2),
        "act_kb_per_token_double": round(per_token["double"] / 1e3, 1),
        "act_kb_per_token_single": round(per_token["single"] / 1e3, 1),
        "act_gb_per_sample_512_ckpt": round(per_sample_gb(512, True), 2),
        "act_gb_per_sample_1024_ckpt": round(per_sample_gb(1024, True), 2),
        "vae_decoder_bytes_per_pixel": round(vae_per_px, 1),
        "vae_decoder_bytes_per_pixel_ckpt": round(vae_per_px_ckpt, 1),
        "arcface_mb_per_face": round(arc_face / 1e6, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
