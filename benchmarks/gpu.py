"""GPU suite: FLUX-dev-size step time, adapter overheads, low-VRAM presets and torch.compile, random weights.

Needs a CUDA device and no downloads. Built in bf16 with random weights, at the released sizes:

- the FLUX.1-dev transformer (19 double + 38 single blocks, width 3072, 24 × 128 heads, 11.9 B parameters);
- the WithAnyone adapter of the release (both branches, 57 cross-attentions, ≈ 2.8 B parameters);
- the SigLIP vision tower (siglip-base-patch16-256: 12 layers, width 768, 256 tokens per 256² crop).

Left out: the VAE (not part of a denoising step), both text encoders (stand-ins: random T5 states [1, 512,
4096] and a random pooled CLIP vector [1, 768]) and the face analyzer (stand-in: random 512-d ArcFace
embeddings). Their memory is in the computed table (``computed`` in the JSON) from parameter counts.

Measured, at 1024² (4096 image + 512 text tokens), 2 people with 256² face boxes, batch 1:

1. Step time (one transformer forward = one FLUX-dev denoising step, guidance distilled) of plain FLUX
   (adapter detached), ours ArcFace-only, ours with SigLIP and the release's dense design, interleaved per
   repeat, CUDA events after warm-up; ratios from the same run. Each adapter step is the second call in an
   ``identities()`` block (as every step after the first in a generation).
2. Peak VRAM and step time per low-VRAM preset: ``bf16`` (everything on the GPU), ``model_cpu_offload``
   (accelerate hooks: a model moves to the GPU when called, the previous one back to the CPU),
   ``group_offload`` (diffusers block-level group offload of the transformer with a CUDA stream; the adapter
   stays resident) and ``int8_weight_only`` (torchao) or ``qint8`` (optimum-quanto) where installed.
2b. True peak VRAM of every ``withanyone.pipeline.memory`` preset (``none`` … ``8gb``) on a whole random
   pipeline placed by the library's own ``apply_memory`` (formats of base / adapter / T5, offload): SigLIP on 2
   crops, CLIP + T5 on a prompt, two transformer steps with identities, the VAE decode; ``nf4`` needs
   bitsandbytes and is skipped with the reason where it cannot run.
3. ``torch.compile`` of the transformer with the adapter attached and identities active: compile time
   (first call), graphs and graph breaks seen by Dynamo, speed-up over eager.

``--dry-run`` runs the same code on the CPU at tiny width (fp32, 2 + 2 blocks, Dynamo's eager backend);
the test suite runs it. Without CUDA (and without ``--dry-run``) the script prints why it skipped, the
computed memory table, and a JSON line with ``"skipped"``. Last line: one JSON object with
``adapter_overhead_arcface``, ``adapter_overhead_siglip`` (fractions of a plain step: 0.01 = 1 %),
``peak_vram_gb`` per preset and ``compile_speedup``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _flux_dev import FLUX_DEV, SIGLIP_BASE  # noqa: E402

GB = 1e9
TINY = dict(num_layers=2, num_single_layers=2, attention_head_dim=64, num_attention_heads=2,
            joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 28, 28))
SIGLIP_TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=2)
VARIANTS = {
    "plain": None,
    "ours_arcface": dict(mode="sparse", cache=True, siglip=False, id_weight=1.0, siglip_weight=0.0),
    "ours_siglip": dict(mode="sparse", cache=True, siglip=True, id_weight=1.0, siglip_weight=1.0),
    "authors_dense": dict(mode="dense", cache=False, siglip=True, id_weight=1.0, siglip_weight=1.0),
}


@dataclass
class Setup:
    """Sizes of one run: FLUX config, SigLIP config, image side, text tokens, device and dtype."""

    flux: dict
    siglip: dict
    size: int
    text_len: int
    device: torch.device
    dtype: torch.dtype
    compile_backend: str

    @property
    def width(self) -> int:
        return self.flux["num_attention_heads"] * self.flux["attention_head_dim"]


# ----------------------------------------------------------------------------- building blocks


def build_transformer(s: Setup, device: torch.device | str):
    """A random-weight FluxTransformer2DModel of ``s.flux`` built directly on ``device`` in ``s.dtype``."""
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(s.dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            return FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True, **s.flux).eval()
    finally:
        torch.set_default_dtype(previous)


def build_adapter(s: Setup, device: torch.device | str):
    """The release-size adapter (both branches) for ``s.flux``, random weights."""
    from withanyone.model import WithAnyoneAdapter

    previous = torch.get_default_dtype()
    torch.set_default_dtype(s.dtype)
    try:
        torch.manual_seed(1)
        with torch.device(device):
            return WithAnyoneAdapter(num_double_blocks=s.flux["num_layers"], num_single_blocks=s.flux["num_single_layers"],
                                     hidden_size=s.width, num_heads=s.width // 128 if s.width >= 1536 else s.width // 64,
                                     head_dim=64, siglip_dim=s.siglip["hidden_size"]).eval()
    finally:
        torch.set_default_dtype(previous)


def build_siglip(s: Setup, device: torch.device | str):
    """A random SigLIP vision tower of ``s.siglip``."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(2)
    with torch.device(device):
        return SiglipVisionModel(SiglipVisionConfig(num_channels=3, **s.siglip)).to(s.dtype).eval()


def step_inputs(s: Setup) -> dict[str, Any]:
    """Transformer inputs of one step: packed latents, random T5/CLIP stand-ins, positions."""
    g = torch.Generator().manual_seed(0)
    side = s.size // 16
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    t = dict(device=s.device, dtype=s.dtype)
    return {
        "hidden_states": torch.randn(1, side * side, 64, generator=g).to(**t),
        "encoder_hidden_states": torch.randn(1, s.text_len, s.flux["joint_attention_dim"], generator=g).to(**t),
        "pooled_projections": torch.randn(1, s.flux["pooled_projection_dim"], generator=g).to(**t),
        "timestep": torch.tensor([0.5], **t),
        "guidance": torch.tensor([4.0], **t),
        "img_ids": ids.reshape(-1, 3).to(**t),
        "txt_ids": torch.zeros(s.text_len, 3, **t),
        "return_dict": False,
    }


def identity_inputs(s: Setup, siglip_model) -> dict[str, Any]:
    """Random ArcFace embeddings, two crops through the SigLIP tower, and two 256²-at-1024² face boxes."""
    g = torch.Generator().manual_seed(3)
    k = s.size / 1024
    image = s.siglip["image_size"]
    crops = torch.rand(2, 3, image, image, generator=g).to(s.device, s.dtype) * 2 - 1
    with torch.inference_mode():
        feats = siglip_model(pixel_values=crops).last_hidden_state  # [2, 256, hidden]
    return {
        "arcface": torch.nn.functional.normalize(torch.randn(1, 2, 512, generator=g), dim=-1).to(s.device, s.dtype),
        "siglip": feats.unsqueeze(0),
        "boxes": [[(128 * k, 192 * k, 384 * k, 448 * k), (640 * k, 192 * k, 896 * k, 448 * k)]],
        "height": s.size,
        "width": s.size,
        "crops": crops,
    }


class Timer:
    """Seconds of one call: CUDA events on a GPU (after a synchronise), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


@contextlib.contextmanager
def variant(adapter, transformer, spec: dict | None, ids: dict):
    """Plain FLUX (adapter detached) for ``None``, else the adapter configured and identities active."""
    if spec is None:
        adapter.detach()
        try:
            yield
        finally:
            adapter.attach(transformer)
        return
    adapter.attention_mode, adapter.cache_kv = spec["mode"], spec["cache"]
    with adapter.identities(arcface=ids["arcface"], siglip=ids["siglip"] if spec["siglip"] else None,
                            boxes=ids["boxes"], height=ids["height"], width=ids["width"],
                            id_weight=spec["id_weight"], siglip_weight=spec["siglip_weight"]):
        yield


def peak_gb(device: torch.device) -> float | None:
    """Peak allocated CUDA memory since the last reset, in GB (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- measurements


def step_times(transformer, adapter, inputs: dict, ids: dict, timer: Timer, warmup: int, repeats: int) -> dict:
    """Median step seconds per variant, interleaved per repeat; each adapter step is the block's 2nd call."""
    def forward():
        with torch.inference_mode():
            transformer(**inputs)

    for _ in range(warmup):
        for spec in VARIANTS.values():
            with variant(adapter, transformer, spec, ids):
                forward()
                forward()
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    first: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(repeats):
        for name, spec in VARIANTS.items():
            with variant(adapter, transformer, spec, ids):
                first[name].append(timer(forward))
                times[name].append(timer(forward))
    return {"step_s": {k: statistics.median(v) for k, v in times.items()},
            "first_step_s": {k: statistics.median(v) for k, v in first.items()}}


def quantize_transformer(transformer) -> str:
    """Quantise the transformer's Linear weights to int8 in place with an installed backend; its name."""
    try:
        from torchao.quantization import quantize_

        try:
            from torchao.quantization import Int8WeightOnlyConfig

            quantize_(transformer, Int8WeightOnlyConfig())
        except ImportError:
            from torchao.quantization import int8_weight_only

            quantize_(transformer, int8_weight_only())
        return "int8_weight_only (torchao)"
    except ImportError:
        pass
    try:
        from optimum.quanto import freeze, qint8, quantize

        quantize(transformer, weights=qint8)
        freeze(transformer)
        return "qint8 (optimum-quanto)"
    except ImportError as exc:
        raise RuntimeError("no quantisation backend installed (torchao or optimum-quanto)") from exc


def preset_run(name: str, s: Setup, timer: Timer, repeats: int) -> dict[str, Any]:
    """Build fresh components, apply one preset, time the ours-SigLIP step; peak VRAM over the whole call."""
    dev = s.device
    on_gpu = dev.type == "cuda"
    reset_peak(dev)
    home = "cpu" if name in ("model_cpu_offload", "group_offload") else dev
    transformer = build_transformer(s, home)
    adapter = build_adapter(s, home)
    siglip = build_siglip(s, home)
    note = ""
    hooks = []
    if name == "model_cpu_offload":
        from accelerate import cpu_offload_with_hook

        sig_hook = cpu_offload_with_hook(siglip, dev)[1]
        hooks = [sig_hook, cpu_offload_with_hook(transformer, dev, prev_module_hook=sig_hook)[1]]
        note = "SigLIP then transformer + adapter move to the GPU when called; step = steady state"
    elif name == "group_offload":
        transformer.enable_group_offload(onload_device=dev, offload_device=torch.device("cpu"),
                                         offload_type="block_level", num_blocks_per_group=1, use_stream=on_gpu)
        adapter.to(dev)
        siglip.to(dev)
        note = "block-level, 1 block per group" + (", CUDA stream prefetch" if on_gpu else "") + "; adapter resident"
    elif name == "quantized":
        note = quantize_transformer(transformer)
    adapter.attach(transformer)
    ids = identity_inputs(s, siglip)
    inputs = step_inputs(s)
    spec = VARIANTS["ours_siglip"]

    def forward():
        with torch.inference_mode():
            transformer(**inputs)

    with variant(adapter, transformer, spec, ids):
        onload = timer(forward)  # first call: onload under offloading, K/V projection
        forward()
        steps = [timer(forward) for _ in range(repeats)]
    out = {"step_s": statistics.median(steps), "first_step_s": onload, "peak_vram_gb": peak_gb(dev), "note": note}
    for h in hooks:
        h.remove()
    adapter.detach()
    return out  # the components go with this frame; the caller resets the peak


def memory_preset_run(name: str, s: Setup, timer: Timer) -> dict[str, Any]:
    """One ``withanyone.pipeline.memory`` preset on a whole random pipeline: peak device memory over SigLIP,
    both text encoders, two transformer steps with identities and the VAE decode, and the step time."""
    from withanyone.pipeline import WithAnyonePipeline
    from withanyone.pipeline.memory import PRESETS, apply_memory, check_available
    from withanyone.pipeline.tiny import tiny_scheduler, tiny_text_encoders, tiny_tokenizers, tiny_vae

    p = PRESETS[name]
    why = check_available(p, s.device)
    if why:
        raise RuntimeError(why)
    dev = s.device
    reset_peak(dev)
    if s.flux is FLUX_DEV:
        import _flux_dev as fd

        clip, t5, vae = fd.clip("cpu", s.dtype), fd.t5("cpu", s.dtype), fd.vae("cpu", s.dtype)
    else:
        clip, t5 = (m.to(s.dtype) for m in tiny_text_encoders())
        vae = tiny_vae().to(s.dtype)
    clip_tok, t5_tok = tiny_tokenizers()  # token ids are all the encoders need; the weights are random anyway
    transformer, adapter, siglip = build_transformer(s, "cpu"), build_adapter(s, "cpu"), build_siglip(s, "cpu")
    pipe = WithAnyonePipeline(scheduler=tiny_scheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
                              text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer, adapter=adapter)
    apply_memory(pipe, p, dev, compute_dtype=s.dtype, quantize_base=True)
    reset_peak(dev)
    t0 = time.perf_counter()
    siglip.to(dev)
    ids = identity_inputs(s, siglip)
    if p.offload != "none":
        siglip.to("cpu")  # the pipeline hands SigLIP back under offload
    adapter.to(dev)  # the pipeline keeps the adapter on the device for the whole call
    with torch.inference_mode():
        embeds, pooled, _ = pipe.encode_prompt("a photo of two people", device=dev, max_sequence_length=s.text_len)
    inputs = step_inputs(s)
    inputs.update(encoder_hidden_states=embeds.to(s.dtype), pooled_projections=pooled.to(s.dtype))
    spec = VARIANTS["ours_siglip"]
    out = {}

    def forward():
        with torch.inference_mode():
            out["latents"] = transformer(**inputs)[0]

    with variant(adapter, transformer, spec, ids):
        forward()
        step = timer(forward)
    with torch.inference_mode():
        z = pipe._unpack_latents(out["latents"], s.size, s.size, pipe.vae_scale_factor)
        pipe.vae.decode(z.to(s.dtype), return_dict=False)
    result = {"peak_vram_gb": peak_gb(dev), "step_s": step, "call_s": time.perf_counter() - t0,
              "formats": p.summary()}
    pipe.maybe_free_model_hooks()
    adapter.detach()
    return result


def compile_run(s: Setup, timer: Timer, repeats: int) -> dict[str, Any]:
    """torch.compile of the transformer with the adapter attached (ours SigLIP active): time and graph breaks."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    transformer = build_transformer(s, s.device)
    adapter = build_adapter(s, s.device).attach(transformer)
    siglip = build_siglip(s, s.device)
    ids = identity_inputs(s, siglip)
    inputs = step_inputs(s)
    spec = VARIANTS["ours_siglip"]
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(transformer, backend=s.compile_backend)

    def run(model):
        def f():
            with torch.inference_mode():
                model(**inputs)
        return f

    with variant(adapter, transformer, spec, ids):
        run(transformer)()  # eager warm-up (K/V cached, plan built)
        eager = statistics.median(timer(run(transformer)) for _ in range(repeats))
        compile_s = timer(run(compiled))
        timer(run(compiled))
        graphs_first_block = int(counters["stats"]["unique_graphs"])
        compiled_s = statistics.median(timer(run(compiled)) for _ in range(repeats))
    breaks = int(sum(counters["graph_break"].values()))
    with variant(adapter, transformer, spec, ids):  # a second generation: its first call projects K/V
        run(compiled)()
        run(compiled)()
    graphs_two_blocks = int(counters["stats"]["unique_graphs"])
    with variant(adapter, transformer, spec, ids):  # a third one must reuse every graph
        run(compiled)()
        run(compiled)()
    recompiled = int(counters["stats"]["unique_graphs"]) - graphs_two_blocks
    blocks = s.flux["num_layers"] + s.flux["num_single_layers"]
    out = {"backend": s.compile_backend, "compile_s": compile_s, "eager_step_s": eager, "compiled_step_s": compiled_s,
           "speedup": eager / compiled_s, "graphs": graphs_first_block, "graph_breaks": breaks,
           "graphs_first_call_path": graphs_two_blocks - graphs_first_block,
           "new_graphs_third_generation": recompiled, "blocks": blocks}
    adapter.detach()
    dynamo.reset()
    return out


def variant_steps(s: Setup, timer: Timer, warmup: int, repeats: int) -> tuple[dict, float]:
    """Build the resident set, time the SigLIP tower once per generation and every variant's step."""
    t0 = time.perf_counter()
    reset_peak(s.device)
    transformer = build_transformer(s, s.device)
    adapter = build_adapter(s, s.device).attach(transformer)
    siglip = build_siglip(s, s.device)
    ids = identity_inputs(s, siglip)

    def encode():
        with torch.inference_mode():
            siglip(pixel_values=ids["crops"])

    siglip_s = statistics.median(timer(encode) for _ in range(max(repeats, 3)))
    print(f"built in {time.perf_counter() - t0:.1f}s; SigLIP tower on 2 crops: {1e3 * siglip_s:.1f} ms "
          "(once per generation)", flush=True)
    st = step_times(transformer, adapter, step_inputs(s), ids, timer, warmup, repeats)
    adapter.detach()
    return st, siglip_s


# ----------------------------------------------------------------------------- computed memory


def computed_memory() -> dict[str, Any]:
    """Weights per preset in GB from parameter counts at FLUX-dev size (meta device; nothing allocated)."""
    import _flux_dev as fd

    s = Setup(FLUX_DEV, SIGLIP_BASE, 1024, 512, torch.device("meta"), torch.bfloat16, "inductor")
    with torch.device("meta"):
        tr = build_transformer(s, "meta")
        ad = build_adapter(s, "meta")
        sig = build_siglip(s, "meta")
    t5, clip, vae = fd.t5(), fd.clip(), fd.vae()

    def n(m) -> int:
        return sum(p.numel() for p in m.parameters())

    params = {"transformer": n(tr), "adapter": n(ad), "siglip": n(sig), "t5": n(t5), "clip": n(clip), "vae": n(vae)}
    blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
    largest_block = max(n(b) for b in blocks)
    outside_blocks = params["transformer"] - sum(n(b) for b in blocks)
    linear = sum(m.weight.numel() for m in tr.modules() if isinstance(m, torch.nn.Linear))
    b2 = 2 / GB  # bf16 bytes per parameter, in GB
    bench = params["transformer"] + params["adapter"] + params["siglip"]
    full = bench + params["t5"] + params["clip"] + params["vae"]
    # group offload with stream prefetch: the running block and the next one resident, plus what is outside blocks
    group = outside_blocks + 2 * largest_block + params["adapter"]
    int8 = (params["transformer"] - linear) * 2 + linear * 1  # int8 weights (+ per-channel scales, ≪ 1 %)
    presets = {
        "bf16": {"bench": bench * b2, "pipeline": full * b2},
        "model_cpu_offload": {"bench": (params["transformer"] + params["adapter"]) * b2,
                              "pipeline": max(params["transformer"] + params["adapter"], params["t5"]) * b2},
        "group_offload": {"bench": group * b2, "pipeline": group * b2},
        "quantized": {"bench": (int8 + (params["adapter"] + params["siglip"]) * 2) / GB,
                      "pipeline": (int8 + (full - params["transformer"]) * 2) / GB},
    }
    return {"params_m": {k: round(v / 1e6, 1) for k, v in params.items()},
            "largest_block_m": round(largest_block / 1e6, 1), "outside_blocks_m": round(outside_blocks / 1e6, 1),
            "weights_gb": {k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in presets.items()}}


def print_computed(c: dict) -> None:
    print("computed weights (bf16, from parameter counts; activations not included):")
    print("  parameters (M): " + ", ".join(f"{k} {v:,.0f}" for k, v in c["params_m"].items())
          + f"; largest block {c['largest_block_m']:,.0f} M, transformer outside blocks {c['outside_blocks_m']:,.0f} M")
    print(f"  {'preset':20s}{'this benchmark GB':>19s}{'whole pipeline GB':>19s}")
    for k, v in c["weights_gb"].items():
        print(f"  {k:20s}{v['bench']:19.2f}{v['pipeline']:19.2f}")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny width, fp32, Dynamo's eager backend")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 10; dry run 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; dry run 1)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 1024; dry run 128)")
    ap.add_argument("--presets", default="bf16,model_cpu_offload,group_offload,quantized")
    ap.add_argument("--memory-presets", default=None,
                    help="withanyone.pipeline.memory presets to run on a whole random pipeline (default: all; "
                         "'' for none)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-backend", default=None, help="default inductor (dry run: eager)")
    args = ap.parse_args(argv)

    if args.dry_run:
        s = Setup(TINY, SIGLIP_TINY, args.size or 128, 16, torch.device("cpu"), torch.float32,
                  args.compile_backend or "eager")
        repeats, warmup = args.repeats or 2, args.warmup if args.warmup is not None else 1
    else:
        computed = computed_memory()
        if not torch.cuda.is_available():
            why = "torch has no CUDA support" if torch.version.cuda is None else "no CUDA device visible"
            print(f"gpu.py: skipped: {why} (torch {torch.__version__}). Run it on a CUDA machine; "
                  "`--dry-run` checks the script on the CPU at tiny width.")
            print_computed(computed)
            result = {"skipped": why, "computed_weights_gb": {k: v["bench"] for k, v in computed["weights_gb"].items()}}
            print(json.dumps(result))
            return result
        s = Setup(FLUX_DEV, SIGLIP_BASE, args.size or 1024, 512, torch.device("cuda"), torch.bfloat16,
                  args.compile_backend or "inductor")
        repeats, warmup = args.repeats or 10, args.warmup if args.warmup is not None else 2
        print(f"device: {torch.cuda.get_device_name(s.device)}, torch {torch.__version__}")
        print_computed(computed)
    timer = Timer(s.device)
    print(f"# {'dry run: ' if args.dry_run else ''}width {s.width}, {s.flux['num_layers']} + "
          f"{s.flux['num_single_layers']} blocks, {s.size}² ({(s.size // 16) ** 2} image + {s.text_len} text tokens), "
          f"{str(s.dtype).removeprefix('torch.')}, 2 people, {repeats} repeats", flush=True)

    # 1. step time per variant, one resident model set
    st, siglip_s = variant_steps(s, timer, warmup, repeats)
    reset_peak(s.device)
    plain = st["step_s"]["plain"]
    overhead = {k: v / plain - 1.0 for k, v in st["step_s"].items() if k != "plain"}
    for k, v in st["step_s"].items():
        extra = "" if k == "plain" else (f"  overhead {100 * overhead[k]:+.2f} %  "
                                         f"(first step {1e3 * st['first_step_s'][k]:.1f} ms)")
        print(f"  step {k:14s} {1e3 * v:9.2f} ms{extra}")

    # 2. presets
    presets: dict[str, Any] = {}
    for name in [p for p in args.presets.split(",") if p]:
        try:
            presets[name] = preset_run(name, s, timer, repeats)
            reset_peak(s.device)
            r = presets[name]
            peak = "n/a (CPU)" if r["peak_vram_gb"] is None else f"{r['peak_vram_gb']:.2f} GB"
            print(f"  preset {name:18s} step {1e3 * r['step_s']:9.2f} ms, first {1e3 * r['first_step_s']:9.2f} ms, "
                  f"peak {peak}  [{r['note']}]", flush=True)
        except Exception as exc:  # noqa: BLE001 — one preset failing (a missing backend) must not end the suite
            presets[name] = {"skipped": f"{type(exc).__name__}: {exc}"}
            print(f"  preset {name:18s} skipped: {presets[name]['skipped']}", flush=True)
            reset_peak(s.device)

    # 2b. the library's memory presets on a whole pipeline (true peak VRAM on CUDA)
    from withanyone.pipeline.memory import PRESETS as MEMORY_PRESETS

    memory: dict[str, Any] = {}
    names = list(MEMORY_PRESETS) if args.memory_presets is None else [n for n in args.memory_presets.split(",") if n]
    for name in names:
        try:
            memory[name] = memory_preset_run(name, s, timer)
            r = memory[name]
            peak = "n/a (CPU)" if r["peak_vram_gb"] is None else f"{r['peak_vram_gb']:.2f} GB"
            print(f"  memory preset {name:14s} peak {peak}, step {1e3 * r['step_s']:9.2f} ms, whole call "
                  f"{r['call_s']:.1f}s  [{r['formats']}]", flush=True)
        except Exception as exc:  # noqa: BLE001 — nf4 without bitsandbytes must not end the suite
            memory[name] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            print(f"  memory preset {name:14s} skipped: {memory[name]['skipped']}", flush=True)
        reset_peak(s.device)

    # 3. torch.compile
    comp = None
    if not args.no_compile:
        comp = compile_run(s, timer, repeats)
        print(f"  compile ({comp['backend']}): first call {comp['compile_s']:.1f}s, {comp['graphs']} graph(s), "
              f"{comp['graph_breaks']} graph break(s) for {comp['blocks']} blocks, "
              f"+{comp['graphs_first_call_path']} for the first call of a generation (K/V projection), "
              f"{comp['new_graphs_third_generation']} new in a third generation; "
              f"step {1e3 * comp['eager_step_s']:.2f} → {1e3 * comp['compiled_step_s']:.2f} ms "
              f"({comp['speedup']:.2f}x)", flush=True)

    result = {
        "adapter_overhead_arcface": round(overhead["ours_arcface"], 4),
        "adapter_overhead_siglip": round(overhead["ours_siglip"], 4),
        "adapter_overhead_dense": round(overhead["authors_dense"], 4),
        "step_ms": {k: round(1e3 * v, 2) for k, v in st["step_s"].items()},
        "siglip_tower_ms": round(1e3 * siglip_s, 2),
        "peak_vram_gb": {k: (None if "skipped" in v or v["peak_vram_gb"] is None else round(v["peak_vram_gb"], 2))
                         for k, v in presets.items()},
        "preset_step_ms": {k: (None if "skipped" in v else round(1e3 * v["step_s"], 2)) for k, v in presets.items()},
        "memory_preset_peak_vram_gb": {k: (None if "skipped" in v or v["peak_vram_gb"] is None
                                           else round(v["peak_vram_gb"], 2)) for k, v in memory.items()},
        "memory_preset_step_ms": {k: (None if "skipped" in v else round(1e3 * v["step_s"], 2))
                                  for k, v in memory.items()},
        "compile_speedup": None if comp is None else round(comp["speedup"], 3),
        "compile_s": None if comp is None else round(comp["compile_s"], 1),
        "graph_breaks": None if comp is None else comp["graph_breaks"],
        "new_graphs_third_generation": None if comp is None else comp["new_graphs_third_generation"],
        "dry_run": bool(args.dry_run),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
