"""The memory table, measured: device bytes of every component per low-VRAM preset at FLUX.1-dev size, the peak
each offload scheme implies, and what each preset costs in accuracy and CPU speed. Random weights, CPU.

How each figure is obtained (the ``source`` of every component row says which):

- **CPU, per block × count** — the transformer, the adapter and T5 do not fit this machine's 24 GB at full size
  in bf16 (23.8 + 5.6 + 9.5 GB), so one *full-width* slice of each is built with real tensors and quantised with
  the library's own functions (``withanyone.pipeline.memory.quantize_transformer`` / ``quantize_text_encoder``,
  ``withanyone.model.quantize.quantize_adapter``): the transformer with 1 double + 1 single block, the adapter
  with its token encoders and one ArcFace + one SigLIP cross-attention per block, T5 with one block. The stored
  bytes (quantised data + scales, ``weight_bytes``) of one block times the block count plus the bytes outside
  the blocks give the full model.
- **CPU, full** — CLIP-L, the VAE and SigLIP are built whole and counted.
- **computed** — formats that do not run on this CPU: NF4 (bitsandbytes, CUDA only; 0.5 byte per weight +
  double-quantised absmax per 64) and GGUF Q8_0 / Q5_K / Q4_0 (ggml block sizes: 34, 176 and 18 bytes per 32, 256
  and 32 weights) on every Linear weight counted on the meta device, the rest bf16.
- **GPU** — true peak VRAM per preset comes from ``benchmarks/gpu.py`` on a CUDA machine (empty here).

Peak under offload (weights only, activations come on top): ``none`` holds everything; ``model`` (diffusers model
CPU offload) holds the adapter — which our pipeline moves to the device for the whole call — plus the largest of
T5, CLIP, transformer and VAE (SigLIP runs alone before); ``group`` (block-level, 1 block per group, CUDA stream
prefetch) holds CLIP, VAE, SigLIP and the adapter plus the larger of the transformer's and T5's bytes outside
their blocks + two blocks. "sum" is every component's device bytes added up (what would be resident without
offload).

Accuracy and speed (same run, interleaved): the full-width transformer slice (1 double + 1 single block) with the
adapter slice attached, 2 people, ArcFace + SigLIP branches; per (base format, adapter format) the relative
error of the identity residual (output with identities − output without) against bf16/bf16, the base's own
output error, and the step time of the slice relative to bf16/bf16. Quick default: 256² (256 image tokens);
``--full``: 512² and more repeats. Step times are the fastest of the interleaved rounds. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _flux_dev as fd  # noqa: E402

from withanyone.model.quantize import quantize_adapter, weight_bytes  # noqa: E402
from withanyone.pipeline.memory import PRESETS, quantize_text_encoder, quantize_transformer  # noqa: E402

GB = 1e9
BF16 = torch.bfloat16
MEASURED_BASE = ("bf16", "fp8", "int8")
#: bytes per weight of the computed formats (NF4: double-quantised absmax, bitsandbytes' default)
COMPUTED_BASE = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "gguf-q8_0": 34 / 32, "gguf-q5_k": 176 / 256,
                 "gguf-q4_0": 18 / 32}
ADAPTER_FMTS = ("bf16", "fp8", "int8")
T5_FMTS = ("bf16", "fp8", "int8")
COMPONENTS = ("transformer", "adapter", "t5", "clip", "vae", "siglip")


def _free() -> None:
    gc.collect()


# ----------------------------------------------------------------------------- bytes per component and format


def computed_transformer(meta) -> dict[str, dict[str, Any]]:
    """NF4 / GGUF bytes of the full transformer from Linear weight counts (meta device)."""
    linears = [(name, m) for name, m in meta.named_modules() if isinstance(m, torch.nn.Linear)]
    total = fd.count(meta)
    out = {}
    for fmt, bpw in COMPUTED_BASE.items():
        # diffusers/bitsandbytes NF4 swaps the Linears below the top level (the library's _nf4); GGUF files
        # (city96) quantise every 2-D weight
        chosen = [m for name, m in linears if fmt != "nf4" or "." in name]
        q = sum(m.weight.numel() for m in chosen)
        out[fmt] = {"bytes": int(round(q * bpw + 2 * (total - q))), "source": "computed"}
    return out


def transformer_bytes(slice_bf16, counts: dict) -> tuple[dict, dict]:
    """Measured bytes of the full transformer per format from a 1 + 1 block slice; also the quantised slices."""
    out, slices = {}, {}
    for fmt in MEASURED_BASE:
        q = quantize_transformer(copy.deepcopy(slice_bf16), fmt, compute_dtype=BF16)
        d, s = weight_bytes(q.transformer_blocks[0]), weight_bytes(q.single_transformer_blocks[0])
        rest = weight_bytes(q) - d - s
        out[fmt] = {"bytes": rest + counts["double_blocks"] * d + counts["single_blocks"] * s,
                    "block_bytes": max(d, s), "outside_blocks": rest,
                    "source": f"CPU, per block × count (1 double × {counts['double_blocks']}, "
                              f"1 single × {counts['single_blocks']})"}
        slices[fmt] = q
    return out, slices


def adapter_bytes(slice_bf16, blocks: int) -> tuple[dict, dict]:
    """Measured bytes of the full adapter per format from an encoders + 1 + 1 block slice; also the slices."""
    out, slices = {}, {}
    for fmt in ADAPTER_FMTS:
        q = quantize_adapter(copy.deepcopy(slice_bf16), fmt)
        per_block = weight_bytes(q.ipa_arc[0]) + weight_bytes(q.ipa_sig[0])
        layers = sum(weight_bytes(x) for x in (*q.ipa_arc, *q.ipa_sig))
        encoders = weight_bytes(q) - layers
        out[fmt] = {"bytes": encoders + blocks * per_block, "block_bytes": per_block, "outside_blocks": encoders,
                    "source": f"CPU, token encoders full + 1 ArcFace + 1 SigLIP cross-attention × {blocks}"}
        slices[fmt] = q
    return out, slices


def t5_bytes(slice_bf16, blocks: int) -> tuple[dict, dict]:
    """Measured bytes of T5-XXL per format from a 1-block slice; also the relative error of the slice's output."""
    ids = torch.randint(0, fd.T5_XXL["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = slice_bf16(input_ids=ids).last_hidden_state.float()
    out: dict = {}
    err: dict[str, float | str] = {}
    for fmt in T5_FMTS:
        q = quantize_text_encoder(copy.deepcopy(slice_bf16), fmt, compute_dtype=BF16)
        blk = weight_bytes(q.encoder.block[0])
        rest = weight_bytes(q) - blk
        out[fmt] = {"bytes": rest + blocks * blk, "block_bytes": blk, "outside_blocks": rest,
                    "source": f"CPU, per block × count (1 × {blocks})"}
        try:
            with torch.inference_mode():
                o = q(input_ids=ids).last_hidden_state.float()
            err[fmt] = float((o - ref).norm() / ref.norm())
        except RuntimeError as exc:  # a format that does not run is recorded, not fatal
            err[fmt] = f"fails: {str(exc).splitlines()[0]}"
        del q
        _free()
    return out, err


# ----------------------------------------------------------------------------- presets


def preset_bytes(p, comp: dict) -> dict[str, Any]:
    """Device bytes per component, their sum and the resident peak of ``p``'s offload scheme."""
    base = p.base
    tr = comp["transformer"][base]
    dev = {"transformer": tr["bytes"], "adapter": comp["adapter"][p.adapter]["bytes"],
           "t5": comp["t5"][p.text_encoder]["bytes"], "clip": comp["clip"]["bf16"]["bytes"],
           "vae": comp["vae"]["bf16"]["bytes"], "siglip": comp["siglip"]["bf16"]["bytes"]}
    total = sum(dev.values())
    if p.offload == "none":
        peak, how = total, "everything resident"
    elif p.offload == "model":
        stages = {k: dev[k] for k in ("t5", "clip", "transformer", "vae")}
        big = max(stages, key=stages.get)
        peak = max(dev["siglip"], dev["adapter"] + stages[big])
        how = f"adapter + {big}"
    else:
        if "block_bytes" not in tr:  # computed formats: blocks scale with the bf16 layout
            ratio = tr["bytes"] / comp["transformer"]["bf16"]["bytes"]
            tr = {k: int(v * ratio) for k, v in comp["transformer"]["bf16"].items() if k != "source"}
        t5 = comp["t5"][p.text_encoder]
        stream = max(tr["outside_blocks"] + 2 * tr["block_bytes"], t5["outside_blocks"] + 2 * t5["block_bytes"])
        resident = dev["clip"] + dev["vae"] + dev["siglip"] + dev["adapter"]
        peak, how = resident + stream, "CLIP + VAE + SigLIP + adapter + 2 streamed blocks"
    return {"device_bytes": dev, "sum_bytes": total, "peak_bytes": peak, "peak_is": how}


# ----------------------------------------------------------------------------- accuracy and speed


def slice_inputs(size: int, text_len: int) -> dict[str, Any]:
    """One transformer call at ``size``² (packed latents, random T5/CLIP stand-ins), bf16."""
    g = torch.Generator().manual_seed(0)
    side = size // 16
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return {"hidden_states": torch.randn(1, side * side, 64, generator=g).to(BF16),
            "encoder_hidden_states": torch.randn(1, text_len, fd.FLUX_DEV["joint_attention_dim"], generator=g).to(BF16),
            "pooled_projections": torch.randn(1, fd.FLUX_DEV["pooled_projection_dim"], generator=g).to(BF16),
            "timestep": torch.tensor([0.5], dtype=BF16), "guidance": torch.tensor([3.5], dtype=BF16),
            "img_ids": ids.reshape(-1, 3).to(BF16), "txt_ids": torch.zeros(text_len, 3, dtype=BF16),
            "return_dict": False}


def identity_kwargs(size: int) -> dict[str, Any]:
    """Two people, 256²-at-1024² face boxes, random ArcFace and SigLIP-feature stand-ins, both branches on."""
    g = torch.Generator().manual_seed(3)
    k = size / 1024
    return {"arcface": torch.nn.functional.normalize(torch.randn(1, 2, 512, generator=g), dim=-1).to(BF16),
            "siglip": torch.randn(1, 2, 256, 768, generator=g).to(BF16),
            "boxes": [[(128 * k, 192 * k, 384 * k, 448 * k), (640 * k, 192 * k, 896 * k, 448 * k)]],
            "height": size, "width": size, "id_weight": 1.0, "siglip_weight": 1.0}


def accuracy_and_speed(tr_slices: dict, ad_slices: dict, combos: list[tuple[str, str]], size: int, text_len: int,
                       repeats: int) -> dict[tuple[str, str], dict[str, float]]:
    """Per (base, adapter): residual error vs bf16/bf16, base output error and step seconds (the fastest of the
    interleaved rounds: the one least disturbed by other jobs on a shared machine)."""
    inputs, ids = slice_inputs(size, text_len), identity_kwargs(size)

    def call(tr):
        with torch.inference_mode():
            return tr(**inputs)[0].float()

    bare = {b: call(tr_slices[b]) for b in {b for b, _ in combos}}
    outs, times = {}, {c: [] for c in combos}
    for r in range(repeats):  # the first call in each identities() block warms up; the second is timed
        for base, fmt in combos:
            tr, ad = tr_slices[base], ad_slices[fmt]
            ad.attach(tr)
            try:
                with ad.identities(**ids):
                    call(tr)  # a generation's first step projects the ID keys/values; later steps reuse them
                    t0 = time.perf_counter()
                    out = call(tr)
                    dt = time.perf_counter() - t0
            finally:
                ad.detach()
            if r == 0:
                outs[(base, fmt)] = out
            times[(base, fmt)].append(dt)
    ref_res = outs[("bf16", "bf16")] - bare["bf16"]
    ref_step = min(times[("bf16", "bf16")])
    result = {}
    for c in combos:
        res = outs[c] - bare[c[0]]
        result[c] = {"residual_rel_err": float((res - ref_res).norm() / ref_res.norm()),
                     "base_rel_err": float((bare[c[0]] - bare["bf16"]).norm() / bare["bf16"].norm()),
                     "step_s": min(times[c]), "step_ratio": min(times[c]) / ref_step}
    return result


def fp8_cast_adapter_error(ad_bf16, tr_bf16, size: int, text_len: int) -> float:
    """Residual error of the adapter under diffusers' unscaled layerwise fp8 casting (the alternative not used)."""
    from diffusers.hooks import apply_layerwise_casting

    ad = copy.deepcopy(ad_bf16)
    apply_layerwise_casting(ad, storage_dtype=torch.float8_e4m3fn, compute_dtype=BF16, skip_modules_pattern=("norm",))
    inputs, ids = slice_inputs(size, text_len), identity_kwargs(size)
    outs = []
    with torch.inference_mode():
        bare = tr_bf16(**inputs)[0].float()
        for a in (ad_bf16, ad):
            a.attach(tr_bf16)
            try:
                with a.identities(**ids):
                    outs.append(tr_bf16(**inputs)[0].float() - bare)
            finally:
                a.detach()
    return float((outs[1] - outs[0]).norm() / outs[0].norm())


# ----------------------------------------------------------------------------- main


def _gb(b: float) -> str:
    return f"{b / GB:.2f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="512² slice, 5 repeats (default: 256², 2 repeats)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per combination (default 2; --full 5)")
    ap.add_argument("--no-speed", action="store_true", help="bytes only (no accuracy / speed on the slice)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    size, text_len, repeats = (512, 128, 5) if args.full else (256, 64, 2)
    repeats = args.repeats or repeats

    # counts on the meta device
    meta = {"transformer": fd.transformer(), "adapter": fd.adapter(), "t5": fd.t5(), "clip": fd.clip(),
            "vae": fd.vae(), "siglip": fd.siglip()}
    params = {k: fd.count(v) for k, v in meta.items()}
    counts = {"double_blocks": len(meta["transformer"].transformer_blocks),
              "single_blocks": len(meta["transformer"].single_transformer_blocks),
              "adapter_blocks": len(meta["adapter"].ipa_arc), "t5_blocks": len(meta["t5"].encoder.block)}

    comp: dict[str, dict[str, Any]] = {}
    # full-size small models, bf16
    for k in ("clip", "vae", "siglip"):
        m = getattr(fd, k)("cpu", BF16)
        comp[k] = {"bf16": {"bytes": weight_bytes(m), "source": "CPU, full"}}
        del m
    # T5: one full-width block
    t5_slice = fd.t5("cpu", BF16, num_layers=1)
    comp["t5"], t5_err = t5_bytes(t5_slice, counts["t5_blocks"])
    del t5_slice
    _free()
    print(f"# built CLIP, VAE, SigLIP and a 1-block T5 in {time.perf_counter() - t0:.0f}s", flush=True)
    # transformer and adapter slices, full width
    tr_slice = fd.transformer("cpu", BF16, num_layers=1, num_single_layers=1)
    comp["transformer"], tr_slices = transformer_bytes(tr_slice, counts)
    comp["transformer"].update(computed_transformer(meta["transformer"]))
    ad_slice = fd.adapter("cpu", BF16, num_double_blocks=1, num_single_blocks=1)
    comp["adapter"], ad_slices = adapter_bytes(ad_slice, counts["adapter_blocks"])
    del meta
    print(f"# built and quantised the transformer and adapter slices in {time.perf_counter() - t0:.0f}s", flush=True)

    # component table
    print("\n| component | format | device bytes | source |\n|---|---|---:|---|")
    for k in COMPONENTS:
        for fmt, v in comp[k].items():
            print(f"| {k} | {fmt} | {_gb(v['bytes'])} GB | {v['source']} |")

    # accuracy and speed on the slice
    acc: dict[tuple[str, str], dict[str, float]] = {}
    cast_err = None
    if not args.no_speed:
        combos = [("bf16", "bf16"), ("fp8", "bf16"), ("int8", "bf16"), ("bf16", "fp8"), ("bf16", "int8"),
                  ("int8", "int8")]  # the last: every Linear int8, the CPU-runnable alternative to nf4 + int8
        combos += sorted({(p.base, p.adapter) for p in PRESETS.values() if p.base in MEASURED_BASE} - set(combos))
        acc = accuracy_and_speed(tr_slices, ad_slices, combos, size, text_len, repeats)
        cast_err = fp8_cast_adapter_error(ad_slices["bf16"], tr_slices["bf16"], size, text_len)
        print(f"\n# full-width slice (1 double + 1 single block, adapter attached, 2 people, both branches), "
              f"{size}² ({(size // 16) ** 2} image + {text_len} text tokens), bf16 compute, "
              f"{torch.get_num_threads()} threads, fastest of {repeats} rounds")
        print("| base | adapter | identity residual error vs bf16 | base output error | step | vs bf16 |")
        print("|---|---|---:|---:|---:|---:|")
        for (b, a), v in acc.items():
            print(f"| {b} | {a} | {100 * v['residual_rel_err']:.2f} % | {100 * v['base_rel_err']:.2f} % | "
                  f"{v['step_s']:.2f} s | {v['step_ratio']:.2f}× |")
        print(f"adapter fp8 by diffusers' unscaled layerwise casting instead (not used): residual error "
              f"{100 * cast_err:.2f} %")
        print("T5 one-block output error vs bf16: " + ", ".join(
            f"{k} {100 * v:.2f} %" if isinstance(v, float) else f"{k} {v}" for k, v in t5_err.items()))

    # presets
    rows = {}
    print("\n| preset | base | adapter | T5 | offload | " + " | ".join(COMPONENTS)
          + " | sum | resident peak | residual error | step vs bf16 |")
    print("|---|---|---|---|---|" + "---:|" * (len(COMPONENTS) + 4))
    for name, p in PRESETS.items():
        r = preset_bytes(p, comp)
        a = acc.get((p.base, p.adapter))
        r["residual_rel_err"] = None if a is None else round(a["residual_rel_err"], 5)
        r["step_ratio"] = None if a is None else round(a["step_ratio"], 3)
        rows[name] = r
        err = "—" if a is None else f"{100 * a['residual_rel_err']:.2f} %"
        speed = "—" if a is None else f"{a['step_ratio']:.2f}×"
        print(f"| {name} | {p.base} | {p.adapter} | {p.text_encoder} | {p.offload} | "
              + " | ".join(_gb(r["device_bytes"][k]) for k in COMPONENTS)
              + f" | {_gb(r['sum_bytes'])} | {_gb(r['peak_bytes'])} ({r['peak_is']}) | {err} | {speed} |")
    smallest = min(rows, key=lambda n: rows[n]["peak_bytes"])
    head = rows[smallest]
    print(f"\nsmallest preset: {smallest} — resident peak {_gb(head['peak_bytes'])} GB of weights on the device at "
          f"once; {_gb(head['sum_bytes'])} GB summed over every component (adapter {PRESETS[smallest].adapter})")
    result = {
        "headline_preset": smallest,
        "headline_peak_gb": round(head["peak_bytes"] / GB, 2),
        "headline_sum_gb": round(head["sum_bytes"] / GB, 2),
        "presets": {n: {"device_bytes": r["device_bytes"], "sum_bytes": r["sum_bytes"], "peak_bytes": r["peak_bytes"],
                        "residual_rel_err": r["residual_rel_err"], "step_ratio": r["step_ratio"]}
                    for n, r in rows.items()},
        "components_bytes": {k: {f: v["bytes"] for f, v in comp[k].items()} for k in COMPONENTS},
        "params": params,
        "accuracy": {f"{b}+{a}": {k: round(v, 5) for k, v in d.items()} for (b, a), d in acc.items()},
        "adapter_fp8_cast_residual_rel_err": None if cast_err is None else round(cast_err, 5),
        "t5_block_rel_err": {k: round(v, 5) if isinstance(v, float) else v for k, v in t5_err.items()},
        "slice": {"size": size, "text_tokens": text_len, "repeats": repeats},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
