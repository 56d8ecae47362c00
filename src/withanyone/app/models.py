"""Loading the pipeline for the app: real weights (with a low-VRAM preset) or ``--tiny``; a missing file
becomes a message for the screen instead of a crash."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..pipeline import memory as _memory

#: Low-VRAM presets: the library's (:data:`withanyone.pipeline.memory.PRESETS`, name → formats + offload +
#: description), shown in the app and the docs. diffusers' sequential CPU offload is not offered: with the pinned
#: accelerate + torch 2.13 it fails even for a plain FluxPipeline (see docs/app.md).
PRESETS = _memory.PRESETS


def preset_available(name: str, device: str | None = None, transformer_file: str | None = None) -> str | None:
    """None when preset ``name`` can run here (on ``device``), else why not."""
    if name not in PRESETS:
        return f"unknown preset {name!r} (choose from {', '.join(PRESETS)})"
    return _memory.check_available(PRESETS[name], device, transformer_file)


@dataclass
class LoadOptions:
    """What ``withanyone app`` was asked to load."""

    base: str = "black-forest-labs/FLUX.1-dev"
    adapter: str = "WithAnyone/WithAnyone"
    siglip: str = "google/siglip-base-patch16-256-i18n"
    face_pack: str = "antelopev2"
    low_vram: str = "none"
    transformer_file: str | None = None
    tiny: bool = False
    offline: bool = False
    device: str = "auto"
    #: The Edit tab's FLUX.1 Kontext base and WithAnyone.Ke adapter (loaded on the first edit).
    kontext_base: str = "black-forest-labs/FLUX.1-Kontext-dev"
    kontext_adapter: str = "WithAnyone/WithAnyone"
    kontext_adapter_file: str | None = None


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
    """Place ``pipe`` on ``device`` according to the low-VRAM ``preset``'s offload scheme."""
    if preset not in PRESETS:
        raise ValueError(preset_available(preset) or preset)
    _memory.apply_offload(pipe, PRESETS[preset].offload, device)


def load_models(opts: LoadOptions) -> LoadedModels:
    """Build the pipeline for the app; any missing file or bad option is returned as ``error`` text.

    The preset's storage formats apply on every device (int8/fp8 also save CPU memory); its offload is
    skipped on the CPU, where there is no GPU memory to save."""
    import torch

    device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    notes: list[str] = []
    preset = opts.low_vram
    why = preset_available(preset, device, opts.transformer_file)
    if why:
        return LoadedModels(None, why, preset, device, "-", opts.tiny)
    mem = PRESETS[preset]
    if device == "cpu" and mem.offload != "none":
        notes.append(f"offload of preset {preset} skipped on CPU")
        mem = replace(mem, offload="none")
    from ..errors import WithAnyoneError

    if opts.tiny:
        from ..pipeline.tiny import tiny_pipeline

        pipe = tiny_pipeline()
        try:
            _memory.apply_memory(pipe, mem, device, compute_dtype=torch.float32, quantize_base=True,
                                 transformer_file=opts.transformer_file)
        except (WithAnyoneError, ValueError) as exc:
            return LoadedModels(None, str(exc), preset, device, "-", True, notes)
        pipe.set_progress_bar_config(disable=True)
        return LoadedModels(pipe, None, preset, device, "float32", True, notes)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    from ..pipeline.pipeline import WithAnyonePipeline

    try:
        pipe = WithAnyonePipeline.from_pretrained(opts.base, adapter=opts.adapter, siglip=opts.siglip,
                                                  face_pack=opts.face_pack, torch_dtype=getattr(torch, dtype),
                                                  local_files_only=opts.offline or None, low_vram=mem,
                                                  transformer_file=opts.transformer_file, device=device)
    except (WithAnyoneError, FileNotFoundError, OSError, ValueError) as exc:
        return LoadedModels(None, missing_weights_message(exc, opts), preset, device, dtype, False, notes)
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
