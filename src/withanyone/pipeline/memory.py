"""Memory settings in one place: the storage format of the base transformer, the adapter and T5, and the offload
scheme — as named presets (the app's ``none`` / ``model-offload`` / ``group-offload`` / ``nf4`` and the budget
presets ``24gb`` / ``16gb`` / ``12gb`` / ``8gb``) or as explicit choices that override a preset.

Every front end (``WithAnyonePipeline.from_pretrained``, ``withanyone generate``, ``withanyone app``,
``withanyone bench generate``) resolves its options here (:func:`resolve_memory`), checks them before anything
loads (:func:`check_available`), loads/quantises with :func:`load_transformer` / :func:`quantize_transformer`
and places the pipeline with :func:`apply_offload`.

Formats of the base transformer: ``bf16`` (no quantisation: the pipeline's dtype, bf16 on a GPU), ``fp8``
(diffusers layerwise casting: e4m3 storage, compute in the pipeline dtype), ``int8`` (optimum-quanto int8
weight-only),
``nf4`` (bitsandbytes 4-bit, CUDA only). A user's single-file transformer (``transformer_file=``: a GGUF file as
diffusers reads it, or an fp8/bf16 ``.safetensors`` in BFL or diffusers layout) replaces the base's
``transformer/`` folder.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import WithAnyoneError

#: Storage formats of the base transformer.
BASE_FORMATS = ("bf16", "fp8", "int8", "nf4")
#: Storage formats of the adapter (``withanyone.model.quantize.quantize_adapter``).
ADAPTER_FORMATS = ("bf16", "fp8", "int8")
#: Storage formats of the T5 text encoder.
TEXT_ENCODER_FORMATS = ("bf16", "fp8", "int8")
#: Offload schemes: everything on the device, one model at a time (diffusers model CPU offload), or block by
#: block (diffusers group offload of the transformer and T5). Sequential offload fails with the pinned accelerate.
OFFLOADS = ("none", "model", "group")
#: Single-file transformer suffixes :func:`load_transformer` reads.
TRANSFORMER_FILE_SUFFIXES = (".gguf", ".safetensors")


class MemoryConfigError(WithAnyoneError, ValueError):
    """A memory setting that does not exist or cannot run on this machine."""


@dataclass(frozen=True)
class MemoryPreset:
    """How each model is stored and where it lives: base / adapter / T5 formats and the offload scheme."""

    name: str
    base: str
    adapter: str
    offload: str
    text_encoder: str = "bf16"
    description: str = ""

    def summary(self) -> str:
        """One line: ``name: base fp8, adapter int8, T5 bf16, offload model``."""
        return (f"{self.name}: base {self.base}, adapter {self.adapter}, T5 {self.text_encoder}, "
                f"offload {self.offload}")


def _preset(name: str, base: str, adapter: str, offload: str, text_encoder: str = "bf16", *, what: str) -> MemoryPreset:
    return MemoryPreset(name, base, adapter, offload, text_encoder, what)


#: Named presets. The first four are the app's historical names (same behaviour); the budget presets name the
#: GPU memory they aim at (figures in docs/benchmarks.md, measured by benchmarks/memory.py).
PRESETS: dict[str, MemoryPreset] = {p.name: p for p in (
    _preset("none", "bf16", "bf16", "none",
            what="everything on the device (fastest; needs the most memory)"),
    _preset("model-offload", "bf16", "bf16", "model",
            what="diffusers enable_model_cpu_offload(): one model on the GPU at a time (the adapter rides with "
                 "the transformer)"),
    _preset("group-offload", "bf16", "bf16", "group",
            what="diffusers group offload (block level, 1 block per group, CUDA stream prefetch) on the "
                 "transformer and T5; the adapter, CLIP, VAE stay on the GPU"),
    _preset("nf4", "nf4", "bf16", "model",
            what="transformer quantized to 4-bit NF4 with bitsandbytes, plus model offload (needs a CUDA GPU and "
                 "bitsandbytes)"),
    _preset("24gb", "fp8", "bf16", "model",
            what="for a 24 GB GPU: base in fp8 (layerwise casting), adapter bf16, model offload"),
    _preset("16gb", "fp8", "fp8", "model",
            what="for a 16 GB GPU: base in fp8 (layerwise casting), adapter in fp8 (quanto, scaled per channel), model offload"),
    _preset("12gb", "nf4", "int8", "model", "int8",
            what="for a 12 GB GPU: base NF4 (bitsandbytes; or pass a GGUF Q4 --transformer-file), adapter and T5 "
                 "int8 (quanto weight-only), model offload"),
    _preset("8gb", "nf4", "int8", "group", "int8",
            what="for an 8 GB GPU: base NF4 (or a GGUF Q4 file), adapter and T5 int8, group offload (block by "
                 "block)"),
)}


def describe(p: MemoryPreset) -> dict[str, str]:
    """The settings of ``p`` for a sidecar or a log line."""
    return {"preset": p.name, "base": p.base, "adapter": p.adapter, "text_encoder": p.text_encoder,
            "offload": p.offload}


def _choose(kind: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise MemoryConfigError(f"{kind} {value!r}: choose from {', '.join(allowed)}")
    return value


def resolve_memory(preset: str | MemoryPreset | None = None, *, base_quantization: str | None = None,
                   adapter_quantization: str | None = None, offload: str | bool | None = None,
                   text_encoder_quantization: str | None = None) -> MemoryPreset:
    """The preset named ``preset`` (default ``none``) with any explicit format / offload overriding it.

    ``offload`` also takes the app's names (``model-offload``, ``group-offload``) and ``True`` (= ``model``,
    the old ``--offload`` flag). Raises :class:`MemoryConfigError` naming the bad value.
    """
    if isinstance(preset, MemoryPreset):
        p = preset
    else:
        name = "none" if preset is None else str(preset).lower()
        if name not in PRESETS:
            raise MemoryConfigError(f"low-VRAM preset {preset!r}: choose from {', '.join(PRESETS)}")
        p = PRESETS[name]
    changes: dict[str, str] = {}
    if base_quantization is not None:
        changes["base"] = _choose("base quantization", str(base_quantization).lower(), BASE_FORMATS)
    if adapter_quantization is not None:
        changes["adapter"] = _choose("adapter quantization", str(adapter_quantization).lower(), ADAPTER_FORMATS)
    if text_encoder_quantization is not None:
        changes["text_encoder"] = _choose("text encoder quantization", str(text_encoder_quantization).lower(),
                                          TEXT_ENCODER_FORMATS)
    if offload is not None and offload is not False:
        value = "model" if offload is True else str(offload).lower().removesuffix("-offload")
        changes["offload"] = _choose("offload", value, OFFLOADS)
    if not changes:
        return p
    changed = replace(p, **changes)
    fields = (changed.base, changed.adapter, changed.offload, changed.text_encoder)
    same = (p.base, p.adapter, p.offload, p.text_encoder) == fields
    if same:
        return p
    for known in PRESETS.values():  # e.g. --offload alone is the app's model-offload preset
        if (known.base, known.adapter, known.offload, known.text_encoder) == fields:
            return known
    return replace(changed, name="custom", description=f"{p.name} with " + ", ".join(
        f"{k.replace('_', ' ')} {v}" for k, v in changes.items()))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def _stored_quantised(path: str | os.PathLike | None) -> bool:
    """Whether a single-file transformer keeps its own format (GGUF, or float8 tensors in a safetensors header)."""
    if path is None:
        return False
    file = Path(path).expanduser()
    if file.suffix.lower() == ".gguf":
        return True
    try:
        import json
        import struct

        with open(file, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(min(size, 100_000_000)))
    except (OSError, ValueError, struct.error):
        return False
    return any(isinstance(v, dict) and str(v.get("dtype", "")).startswith("F8") for v in header.values())


def _cuda(device: Any) -> bool:
    import torch

    if device is None or str(device) == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def check_available(p: MemoryPreset, device: Any = None, transformer_file: str | os.PathLike | None = None) -> str | None:
    """None when ``p`` can run on ``device`` here, else one line saying why not (checked before anything loads)."""
    if p.base == "nf4" and not _stored_quantised(transformer_file):
        if not _cuda(device):
            here = "no CUDA GPU is present" if device is None or str(device) == "auto" else f"the device is {device}"
            return (f"base format nf4 (preset {p.name}) needs a CUDA GPU and bitsandbytes, and {here}; use fp8 or "
                    "int8, or a GGUF --transformer-file")
        if not _installed("bitsandbytes"):
            return "base format nf4 needs bitsandbytes (pip install bitsandbytes), which is not installed"
    formats = [p.adapter, p.text_encoder] + ([p.base] if transformer_file is None else [])
    if "int8" in formats and not _installed("optimum.quanto"):
        return "format int8 needs optimum-quanto (pip install 'withanyone[lowvram]'), which is not installed"
    if transformer_file is not None:
        path = Path(transformer_file).expanduser()
        if path.suffix.lower() not in TRANSFORMER_FILE_SUFFIXES:
            return f"--transformer-file {path}: not a .gguf or .safetensors file"
        if not path.is_file():
            return f"--transformer-file {path}: no such file"
        if path.suffix.lower() == ".gguf" and not _installed("gguf"):
            return f"--transformer-file {path}: reading GGUF needs the gguf package (pip install gguf)"
    return None


# ---------------------------------------------------------------------------------------------- quantisation
#: Module-name patterns the fp8 base keeps in the compute dtype (every other Linear is stored in float8 e4m3).
FP8_SKIP_PATTERNS: tuple[str, ...] = ("pos_embed", "norm_out", "^proj_out$", "lora_")

def _fp8_cast(module: Any, compute_dtype: Any, *, diffusers_model: bool) -> Any:
    """Layerwise casting: Linear/Conv weights stored in float8 e4m3, cast to ``compute_dtype`` per call.

    Everything the casting skips (norms, embeddings, ``proj_out``) ends in ``compute_dtype``, also when it came
    in as float8 (an fp8 single file); float8 weights already in a cast layer stay as they are (no copy).
    """
    import torch
    from diffusers.hooks import apply_layerwise_casting

    fp8 = torch.float8_e4m3fn
    for sub in module.modules():  # module by module: never a second full-size copy
        for param in sub.parameters(recurse=False):
            if param.is_floating_point() and param.dtype not in (fp8, compute_dtype):
                param.data = param.data.to(compute_dtype)
    if diffusers_model:
        # FLUX's own skip list ("pos_embed", "norm") would keep the AdaLN modulation Linears (norm1.linear, ...,
        # 3.25 B parameters) in the compute dtype: 15.2 GB instead of the 11.9 GB of an all-Linear fp8 file such
        # as flux1-dev-fp8.safetensors or ComfyUI's fp8_e4m3fn. Cast them too; keep only the final norm and proj_out.
        # (the model method always appends FLUX's own list, so the hook is applied directly)
        apply_layerwise_casting(module, storage_dtype=fp8, compute_dtype=compute_dtype,
                                skip_modules_pattern=FP8_SKIP_PATTERNS)
    else:
        # T5's feed-forward casts its input to ``wo``'s weight dtype (transformers keeps ``wo`` in fp32): keep it
        apply_layerwise_casting(module, storage_dtype=fp8, compute_dtype=compute_dtype,
                                skip_modules_pattern=("norm", "embed", "relative_attention_bias", "shared",
                                                      r"\.wo$"))
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("layerwise_casting") is not None:
            continue
        for param in sub.parameters(recurse=False):
            if param.dtype == fp8:
                param.data = param.data.to(compute_dtype)
    return module


def _int8(module: Any, compute_dtype: Any, exclude: tuple[str, ...] = ()) -> Any:
    """optimum-quanto int8 weight-only on every Linear (activations stay in ``compute_dtype``)."""
    from optimum.quanto import freeze, qint8, quantize

    if any(t.is_floating_point() and t.dtype != compute_dtype for t in module.parameters()):
        module.to(compute_dtype)
    quantize(module, weights=qint8, exclude=list(exclude) or None)
    freeze(module)
    return module


def _nf4(module: Any, compute_dtype: Any) -> Any:
    """bitsandbytes NF4 for every Linear of the blocks of a built transformer (quantised on the CUDA move)."""
    import bitsandbytes as bnb
    from torch import nn

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and parent is not module:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=compute_dtype, quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype), requires_grad=False,
                                               quant_type="nf4")
                if child.bias is not None:
                    new.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
                setattr(parent, name, new)
    return module.to("cuda")


def quantize_transformer(transformer: Any, fmt: str, *, compute_dtype: Any = None) -> Any:
    """Store a built ``FluxTransformer2DModel`` in ``fmt`` (in place; returned): bf16 leaves it as it is."""
    import torch

    _choose("base quantization", fmt, BASE_FORMATS)
    dtype = compute_dtype if compute_dtype is not None else transformer.dtype
    if fmt == "bf16":
        return transformer
    if fmt == "fp8":
        return _fp8_cast(transformer, dtype, diffusers_model=True)
    if fmt == "int8":
        return _int8(transformer, dtype, exclude=("proj_out", "norm_out.linear"))
    if not torch.cuda.is_available():
        raise MemoryConfigError("base format nf4 needs a CUDA GPU and bitsandbytes")
    return _nf4(transformer, dtype)


def quantize_text_encoder(text_encoder: Any, fmt: str, *, compute_dtype: Any = None) -> Any:
    """Store T5 (or any transformers encoder) in ``fmt``: bf16 (as is), fp8 (layerwise casting), int8 (quanto)."""
    _choose("text encoder quantization", fmt, TEXT_ENCODER_FORMATS)
    dtype = compute_dtype if compute_dtype is not None else text_encoder.dtype
    if fmt == "fp8":
        return _fp8_cast(text_encoder, dtype, diffusers_model=False)
    if fmt == "int8":
        return _int8(text_encoder, dtype)
    return text_encoder


def quantize_adapter(adapter: Any, fmt: str, *, compute_dtype: Any = None) -> Any:
    """The adapter stored in ``fmt`` (``withanyone.model.quantize.quantize_adapter``)."""
    _choose("adapter quantization", fmt, ADAPTER_FORMATS)
    if fmt == "bf16":
        return adapter
    from ..model.quantize import quantize_adapter as _quantize_adapter

    return _quantize_adapter(adapter, fmt, compute_dtype=compute_dtype)


# ---------------------------------------------------------------------------------------------- loading
def _is_bfl(keys: Any) -> bool:
    return any(k.startswith(("double_blocks.", "model.diffusion_model.", "diffusion_model.")) for k in keys)


def _base_config(base: Any, revision: str | None, local_files_only: bool | None) -> Path:
    """The folder holding the base's ``transformer/config.json`` (local or from the hub cache)."""
    from .sources import _Source

    return _Source(base, revision, local_files_only, "FLUX base").file("transformer/config.json").parent.parent


def _config_folder(file: Path, base: Any, config: dict[str, Any] | None, revision: str | None,
                   local_files_only: bool | None, tmp: str) -> Path:
    """A folder with ``transformer/config.json``: written from ``config`` into ``tmp``, or ``base``'s."""
    import json

    if config is not None:
        (Path(tmp) / "transformer").mkdir()
        clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
        (Path(tmp) / "transformer" / "config.json").write_text(json.dumps(clean))
        return Path(tmp)
    if base is None:
        raise MemoryConfigError(f"--transformer-file {file}: needs the base model's transformer/config.json "
                                "for its architecture (pass --base / base=)")
    return _base_config(base, revision, local_files_only)


def load_transformer_file(path: str | os.PathLike, *, base: Any = None, config: dict[str, Any] | None = None,
                          torch_dtype: Any = None, fmt: str = "bf16", revision: str | None = None,
                          local_files_only: bool | None = None) -> Any:
    """A user's single-file transformer: GGUF (any quant type diffusers reads; BFL or diffusers key names) or a
    ``.safetensors`` (fp8 / bf16 / fp32, BFL or diffusers key names). GGUF and fp8 files keep their own storage
    format; a full-precision file is then stored in ``fmt``. The architecture comes from ``config`` (a
    ``FluxTransformer2DModel`` config dict) or ``base``'s ``transformer/config.json``; a BFL safetensors file
    without either infers it from its tensor shapes."""
    import tempfile

    import torch
    from diffusers import FluxTransformer2DModel

    from ..model.bfl import bfl_to_diffusers, load_bfl_transformer
    from ..model.checkpoint import CheckpointError, load_safetensors

    file = Path(path).expanduser()
    dtype = torch_dtype if torch_dtype is not None else torch.bfloat16
    why = check_available(MemoryPreset("file", "bf16", "bf16", "none"), transformer_file=file)
    if why:
        raise MemoryConfigError(why)
    if file.suffix.lower() == ".gguf":
        from diffusers import GGUFQuantizationConfig
        from diffusers.models.model_loading_utils import load_gguf_checkpoint

        try:
            sd = load_gguf_checkpoint(str(file), return_tensors=True)
        except (ValueError, OSError) as exc:
            raise MemoryConfigError(f"--transformer-file {file}: not a GGUF file diffusers reads ({exc})") from None
        if _is_bfl(sd):
            sd = bfl_to_diffusers(sd)
        with tempfile.TemporaryDirectory() as tmp:
            folder = _config_folder(file, base, config, revision, local_files_only, tmp)
            try:
                model = FluxTransformer2DModel.from_single_file(
                    sd, config=str(folder), subfolder="transformer", torch_dtype=dtype, local_files_only=True,
                    quantization_config=GGUFQuantizationConfig(compute_dtype=dtype))
            except (ValueError, RuntimeError, KeyError) as exc:
                raise MemoryConfigError(f"--transformer-file {file}: does not fit the base's transformer "
                                        f"({' '.join(str(exc).split())[:300]})") from None
        return model.eval()
    try:
        sd = load_safetensors(file)
    except CheckpointError as exc:
        raise MemoryConfigError(f"--transformer-file {file}: {exc}") from None
    stored_fp8 = any(t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in sd.values())
    if _is_bfl(sd) and config is None and base is None:
        from ..model.checkpoint import split_authors_state_dict

        _, base_sd = split_authors_state_dict(sd)  # a release-style single file may carry adapter keys too
        model = load_bfl_transformer(base_sd)
    else:
        if _is_bfl(sd):
            from ..model.checkpoint import split_authors_state_dict

            sd = bfl_to_diffusers(split_authors_state_dict(sd)[1])
        with tempfile.TemporaryDirectory() as tmp:
            cfg = FluxTransformer2DModel.load_config(
                str(_config_folder(file, base, config, revision, local_files_only, tmp)), subfolder="transformer")
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(cfg)
        result = model.load_state_dict(sd, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise MemoryConfigError(f"--transformer-file {file}: does not fit the base's transformer (missing "
                                    f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    model.eval()
    if stored_fp8:
        return _fp8_cast(model, dtype, diffusers_model=True)
    model.to(dtype)
    return quantize_transformer(model, fmt, compute_dtype=dtype)


def load_transformer(base: Any, fmt: str = "bf16", *, transformer_file: str | os.PathLike | None = None,
                     torch_dtype: Any = None, revision: str | None = None,
                     local_files_only: bool | None = None) -> Any:
    """The base transformer stored in ``fmt`` (or the user's ``transformer_file``), or None for bf16 without a
    file (the pipeline then loads it as usual)."""
    import torch

    dtype = torch_dtype if torch_dtype is not None else torch.bfloat16
    if transformer_file is not None:
        return load_transformer_file(transformer_file, base=base, torch_dtype=dtype, fmt=fmt, revision=revision,
                                     local_files_only=local_files_only)
    if fmt == "bf16":
        return None
    from diffusers import FluxTransformer2DModel

    from .sources import _dtype_kwarg, _Source

    folder = str(_Source(base, revision, local_files_only, "FLUX base").file("transformer/config.json").parent)
    if fmt == "nf4":
        why = check_available(PRESETS["nf4"], "cuda")
        if why:
            raise MemoryConfigError(why)
        from diffusers import BitsAndBytesConfig

        return FluxTransformer2DModel.from_pretrained(
            folder, **_dtype_kwarg(dtype), quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)).eval()
    model = FluxTransformer2DModel.from_pretrained(folder, **_dtype_kwarg(dtype)).eval()
    return quantize_transformer(model, fmt, compute_dtype=dtype)


# ---------------------------------------------------------------------------------------------- offload
def apply_offload(pipe: Any, offload: str, device: Any) -> None:
    """Place ``pipe`` on ``device``: all of it (``none``), one model at a time (``model``), or the transformer
    and T5 block by block (``group``; the adapter, CLIP and VAE stay on the device)."""
    import torch

    offload = _choose("offload", str(offload).removesuffix("-offload"), OFFLOADS)
    if offload == "none":
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        from diffusers.hooks import apply_group_offloading

        onload = torch.device(device)
        use_stream = onload.type == "cuda"
        for name in ("transformer", "text_encoder_2"):
            apply_group_offloading(getattr(pipe, name), onload_device=onload, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=use_stream)
        for name in ("text_encoder", "vae", "adapter"):
            mod = getattr(pipe, name, None)
            if mod is not None:
                mod.to(onload)


def apply_memory(pipe: Any, p: MemoryPreset, device: Any, *, compute_dtype: Any = None,
                 quantize_base: bool = False, transformer_file: str | os.PathLike | None = None,
                 place: bool = True) -> Any:
    """Apply ``p`` to an already built pipeline (the tiny one, or after ``from_pretrained`` loaded the base):
    swap in ``transformer_file`` (architecture from the pipeline's own transformer config) or, with
    ``quantize_base``, store its transformer in ``p.base``; store T5 and the adapter as ``p`` says; then
    (``place``) put it on ``device`` with :func:`apply_offload`. Returns ``pipe``."""
    dtype = compute_dtype if compute_dtype is not None else pipe.transformer.dtype
    if transformer_file is not None:
        new = load_transformer_file(transformer_file, config=dict(pipe.transformer.config), torch_dtype=dtype,
                                    fmt=p.base)
        pipe.register_modules(transformer=new)
        if getattr(pipe, "adapter", None) is not None:
            pipe.adapter.attach(new)
        if hasattr(pipe, "model_sources"):
            pipe.model_sources["transformer_file"] = {"path": str(Path(transformer_file).expanduser().resolve())}
    elif quantize_base and p.base != "bf16":
        quantize_transformer(pipe.transformer, p.base, compute_dtype=dtype)
    if p.text_encoder != "bf16" and getattr(pipe, "text_encoder_2", None) is not None:
        quantize_text_encoder(pipe.text_encoder_2, p.text_encoder, compute_dtype=dtype)
    if p.adapter != "bf16" and getattr(pipe, "adapter", None) is not None:
        quantize_adapter(pipe.adapter, p.adapter, compute_dtype=dtype)
    pipe.memory = p
    if place:
        apply_offload(pipe, p.offload, device)
    return pipe
