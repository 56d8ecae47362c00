"""Identity-adapter overhead at FLUX-dev width: blocks + adapter over blocks alone, side by side in one run.

One double + one single FLUX block (width 3072, 24 heads), two people. Two modes measure the same ratio:

- quick (default, ≈ 2–5 min on 2 cores): fp32, a 384×384 image (576 image tokens) + 72 text tokens and two
  96×96-pixel face boxes (72 covered tokens): every token count is the 1024² one scaled by (384/1024)², so
  the covered fraction of the image (1/8) and the text/image token ratio stay as at 1024²; fp32 because a
  CPU without native bf16 matmuls runs bf16 many times slower. Costs that do not scale with the image (the
  dense design's per-call K/V projection of the 544 ID tokens) weigh more at this size;
- full (``--full``): bf16, a 1024×1024 image (4096 image tokens) + 512 text tokens, two 256×256-pixel
  face boxes (2 × 256 = 512 covered tokens), 5 repeats (tens of minutes here);
- ``--both``: quick then full in one process, with the quick/full ratio of each figure.

Variants:

- ``authors_dense``: the release's design — both branches (ArcFace 8 + SigLIP 264 tokens per person)
  on every image token, K/V of the ID tokens projected again in every call;
- ``ours_arcface``: the sparse adapter (gather → attend → scatter over the covered tokens), ArcFace
  branch only (SigLIP branch skipped at weight 0);
- ``ours_siglip``: the sparse adapter with both branches.

Each variant is timed on its second call inside one ``identities()`` block (a denoising step: ID tokens
encoded and, for ours, ID keys/values projected on the first call), right after a bare forward.

Two ratios per variant, medians over repeats: **in-run** = T / (T − adapter time), the adapter's hook
work timed inside the same forward (robust to load from other processes, which shifts whole forwards
by tens of percent on a shared machine), and **end-to-end** = T(variant) / T(bare forward just before).
The JSON (last line) holds the in-run ratios; the end-to-end pairs are printed above it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(width: int, heads: int, head_dim: int, text_dim: int, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    from withanyone.model import WithAnyoneAdapter

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=text_dim,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16),
        ).eval()
        adapter = WithAnyoneAdapter(
            num_double_blocks=1, num_single_blocks=1, hidden_size=width, num_heads=24 if width >= 1536 else heads
        ).eval()
    finally:
        torch.set_default_dtype(previous)
    return transformer, adapter.attach(transformer)


def inputs_for(size: int, text_len: int, text_dim: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    side = size // 16
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": torch.randn(1, side * side, 64, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(1, text_len, text_dim, generator=g).to(dtype),
        "pooled_projections": torch.randn(1, 768, generator=g).to(dtype),
        "timestep": torch.tensor([0.5], dtype=dtype),
        "guidance": torch.tensor([4.0], dtype=dtype),
        "img_ids": ids.reshape(-1, 3).to(dtype),
        "txt_ids": torch.zeros(text_len, 3, dtype=dtype),
        "return_dict": False,
    }


MODES = {
    # size, text tokens, dtype, repeats
    "quick": (384, 72, torch.float32, 2),
    "full": (1024, 512, torch.bfloat16, 5),
}


def measure(mode: str, size: int, text_len: int, dtype: torch.dtype, repeats: int, small: bool) -> dict[str, float]:
    """In-run ratios (blocks + adapter over blocks alone) of the three variants, printing the details."""
    if small:
        width, heads, head_dim, text_dim = 384, 3, 128, 256
    else:
        width, heads, head_dim, text_dim = 3072, 24, 128, 4096
    t0 = time.perf_counter()
    transformer, adapter = build(width, heads, head_dim, text_dim, dtype)
    inputs = inputs_for(size, text_len, text_dim, dtype)
    k = size / 1024  # two 256×256-pixel faces at 1024², scaled with the image
    boxes = [[(128 * k, 192 * k, 384 * k, 448 * k), (640 * k, 192 * k, 896 * k, 448 * k)]]
    g = torch.Generator().manual_seed(1)
    arcface = torch.nn.functional.normalize(torch.randn(1, 2, 512, generator=g), dim=-1).to(dtype)
    siglip = torch.randn(1, 2, 256, 768, generator=g).to(dtype)
    print(
        f"# [{mode}] width {width}, {heads} heads, {size}² image ({(size // 16) ** 2} tokens) + {text_len} text "
        f"tokens, {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, boxes {boxes[0]} "
        f"(built in {time.perf_counter() - t0:.0f}s)",
        flush=True,
    )

    hook_time = [0.0]
    residual = adapter._residual

    def timed_residual(*a, **kw):
        start = time.perf_counter()
        out = residual(*a, **kw)
        hook_time[0] += time.perf_counter() - start
        return out

    adapter._residual = timed_residual

    variants = {
        "authors_dense": dict(mode="dense", cache=False, siglip=siglip, id_weight=1.0, siglip_weight=1.0),
        "ours_arcface": dict(mode="sparse", cache=True, siglip=None, id_weight=1.0, siglip_weight=0.0),
        "ours_siglip": dict(mode="sparse", cache=True, siglip=siglip, id_weight=1.0, siglip_weight=1.0),
    }

    def forward() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            transformer(**inputs)
        return time.perf_counter() - start

    forward()  # warm-up (allocator, oneDNN kernels)
    base: dict[str, list[float]] = {k: [] for k in variants}
    times: dict[str, list[float]] = {k: [] for k in variants}
    first: dict[str, list[float]] = {k: [] for k in variants}
    share: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(repeats):
        for name, v in variants.items():
            base[name].append(forward())  # blocks alone, right before the variant: a side-by-side pair
            adapter.attention_mode, adapter.cache_kv = v["mode"], v["cache"]
            with adapter.identities(
                arcface=arcface,
                siglip=v["siglip"],
                boxes=boxes,
                height=size,
                width=size,
                id_weight=v["id_weight"],
                siglip_weight=v["siglip_weight"],
            ):
                first[name].append(forward())
                hook_time[0] = 0.0
                t = forward()
                times[name].append(t)
                share[name].append(hook_time[0] / t)
        line = ", ".join(f"{k} {base[k][-1]:.2f}s → {times[k][-1]:.2f}s (in-run {1 / (1 - share[k][-1]):.4f})"
                         for k in variants)
        print(f"[{mode}] repeat {rep + 1}/{repeats} (blocks → blocks + adapter): {line}", flush=True)

    end_to_end = {
        name: statistics.median(t / b for t, b in zip(times[name], base[name], strict=True)) for name in variants
    }
    in_run = {name: statistics.median(1.0 / (1.0 - s) for s in share[name]) for name in variants}
    all_base = [t for v in base.values() for t in v]
    print(f"[{mode}] blocks alone: median {statistics.median(all_base):.2f}s, "
          f"range {min(all_base):.2f}–{max(all_base):.2f}s")
    for name in variants:
        per_rep = [round(t / b, 3) for t, b in zip(times[name], base[name], strict=True)]
        first_ratio = statistics.median(t / b for t, b in zip(first[name], base[name], strict=True))
        print(
            f"[{mode}] {name:14s} in-run {in_run[name]:.3f} (adapter time inside the same forwards: "
            f"{[round(s, 4) for s in share[name]]}); end-to-end {end_to_end[name]:.3f} (pairs {per_rep}); "
            f"first call in a block, end-to-end {first_ratio:.3f}",
            flush=True,
        )
    return {k: round(v, 4) for k, v in in_run.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--full", action="store_true", help="the long sweep: bf16, 1024², 512 text tokens, 5 repeats")
    which.add_argument("--both", action="store_true", help="quick then full in one run, with their ratio")
    parser.add_argument("--repeats", type=int, default=None, help="override the mode's repeats")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (a multiple of 64)")
    parser.add_argument("--text-len", type=int, default=None, help="text tokens (default: the mode's)")
    parser.add_argument("--small", action="store_true", help="width 384 / 3 heads: a quick check of the script")
    args = parser.parse_args()

    modes = ["quick", "full"] if args.both else ["full" if args.full else "quick"]
    results = {}
    for mode in modes:
        size, text_len, dtype, repeats = MODES[mode]
        size = args.size or size
        text_len = args.text_len or (text_len if args.size is None else max(1, round(512 * (size / 1024) ** 2)))
        t0 = time.perf_counter()
        results[mode] = measure(mode, size, text_len, dtype, args.repeats or repeats, args.small)
        print(f"[{mode}] took {time.perf_counter() - t0:.0f}s", flush=True)
    if args.both:
        ratio = {k: round(results["quick"][k] / results["full"][k], 4) for k in results["quick"]}
        print(f"quick / full in-run ratio per variant: {ratio}")
        print(json.dumps({"quick": results["quick"], "full": results["full"], "quick_over_full": ratio}))
    else:
        print(json.dumps({**results[modes[0]], "mode": modes[0]}))


if __name__ == "__main__":
    main()
