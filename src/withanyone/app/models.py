"""Loading the pipeline for the app: real weights (with a low-VRAM preset) or ``--tiny``; a missing file
becomes a message for the screen instead of a crash."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

#: Low-VRAM presets: name → what it does (shown in the app and the docs). diffusers' sequential CPU offload is
#: not offered: with the pinned accelerate + torch 2.13 it fails even for a plain FluxPipeline (see docs/app.md).
PRESETS: dict[str, str] = {
    "none": "everything on the device (fastest; needs the most memory)",
    "model-offload": "diffusers enable_model_cpu_offload(): one model on the GPU at a time (the adapter rides "
                     "with the transformer)",
    "group-offload": "diffusers group offload (block level, 1 block per group, CUDA stream prefetch) on the "
                     "transformer and T5; the adapter, CLIP, VAE stay on the GPU",
    "nf4": "transformer quantized to 4-bit NF4 with bitsandbytes, plus model offload (needs bitsandbytes)",
}


def preset_available(name: str) -> str | None:
    """None when ``name`` can run here, else why not."""
    if name not in PRESETS:
        return f"unknown preset {name!r} (choose from {', '.join(PRESETS)})"
    if name == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        return "preset nf4 needs bitsandbytes (pip install bitsandbytes), which is not installed"
    return None


@dataclass
class LoadOptions:
    """What ``withanyone app`` was asked to load."""

    base: str = "black-forest-labs/FLUX.1-dev"
    adapter: str = "WithAnyone/WithAnyone"
    siglip: str = "google/siglip-base-patch16-256-i18n"
    face_pack: str = "antelopev2"
    low_vram: str = "none"
    tiny: bool = False
    offline: bool = False
    device: str = "auto"


@dataclass
class LoadedModels:
    """The pipeline (or None) and what the UI says about it."""

    pipe: Any
    error: str | None
    preset: str
    device: str
    dtype: str
    tiny: bool
    notes: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """Whether generation is possible."""
        return self.pipe is not None


def apply_preset(pipe: Any, preset: str, device: str) -> None:
    """Place ``pipe`` on ``device`` according to the low-VRAM ``preset``."""
    if preset == "none":
        pipe.to(device)
    elif preset in ("model-offload", "nf4"):
        pipe.enable_model_cpu_offload(device=device)
    elif preset == "group-offload":
        import torch

        onload = torch.device(device)
        use_stream = onload.type == "cuda"
        from diffusers.hooks import apply_group_offloading

        for name in ("transformer", "text_encoder_2"):
            apply_group_offloading(getattr(pipe, name), onload_device=onload, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=use_stream)
        for name in ("text_encoder", "vae", "adapter"):
            mod = getattr(pipe, name, None)
            if mod is not None:
                mod.to(onload)
    else:
        raise ValueError(preset_available(preset) or preset)


def load_models(opts: LoadOptions) -> LoadedModels:
    """Build the pipeline for the app; any missing file or bad option is returned as ``error`` text."""
    import torch

    device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    notes: list[str] = []
    preset = opts.low_vram
    why = preset_available(preset)
    if why:
        return LoadedModels(None, why, preset, device, "-", opts.tiny)
    if opts.tiny:
        from ..pipeline.tiny import tiny_pipeline

        pipe = tiny_pipeline()
        if device == "cpu" and preset != "none":
            notes.append(f"low-VRAM preset {preset} ignored on CPU")
            preset = "none"
        apply_preset(pipe, preset, device)
        pipe.set_progress_bar_config(disable=True)
        return LoadedModels(pipe, None, preset, device, "float32", True, notes)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if device == "cpu" and preset != "none":
        notes.append(f"low-VRAM preset {preset} ignored on CPU")
        preset = "none"
    from ..errors import WithAnyoneError
    from ..pipeline.pipeline import WithAnyonePipeline

    kwargs: dict[str, Any] = {}
    try:
        if preset == "nf4":
            from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

            kwargs["transformer"] = FluxTransformer2DModel.from_pretrained(
                opts.base, subfolder="transformer", torch_dtype=torch.bfloat16,
                local_files_only=opts.offline or None,
                quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16))
        pipe = WithAnyonePipeline.from_pretrained(opts.base, adapter=opts.adapter, siglip=opts.siglip,
                                                  face_pack=opts.face_pack, torch_dtype=getattr(torch, dtype),
                                                  local_files_only=opts.offline or None, **kwargs)
    except (WithAnyoneError, FileNotFoundError, OSError, ValueError) as exc:
        return LoadedModels(None, missing_weights_message(exc, opts), preset, device, dtype, False, notes)
    apply_preset(pipe, preset, device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModels(pipe, None, preset, device, dtype, False, notes)


def missing_weights_message(exc: BaseException, opts: LoadOptions) -> str:
    """What failed to load, and how to get it (markdown for the app's banner)."""
    from ..hub import GATED_REPOS, download_command

    gated = [r for r in (opts.base, opts.adapter, opts.siglip) if r in GATED_REPOS]
    first = (f"accept the licence of {' and '.join(gated)} on the hub ("
             + ", ".join(f"https://huggingface.co/{r}" for r in gated) + "), log in, then" if gated else "run")
    cmds = ["hf auth login"] if gated else []
    cmds += [download_command(opts.base), download_command(opts.adapter, ("withanyone.safetensors",)),
             download_command(opts.siglip)]
    return (f"**The models could not be loaded:** {exc}\n\n"
            f"How to get them: {first}\n\n" + "".join(f"    {c}\n" for c in cmds) + "\n"
            "and the insightface `antelopev2` pack (see docs/pipeline.md), or pass local folders with "
            "`--base/--adapter/--siglip/--face-pack`. Without weights, `withanyone app --tiny` runs the whole app "
            "on a tiny random model (its images are noise).")
