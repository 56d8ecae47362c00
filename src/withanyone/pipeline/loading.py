"""Load FLUX + the WithAnyone adapter + SigLIP from hub ids or local paths, with exact missing-file errors.

Defaults: base ``black-forest-labs/FLUX.1-dev`` (diffusers layout), adapter ``WithAnyone/WithAnyone``
(the released ``withanyone.safetensors``), SigLIP ``google/siglip-base-patch16-256-i18n``, faces from the
insightface ``antelopev2`` pack. Each source may be a local folder or file instead. Before any weights are
read, every file the load needs is checked (locally, or in the hub cache when offline), so a missing file
raises :class:`~withanyone.errors.ModelNotFoundError` naming that file rather than a generic failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError
from .sources import _dtype_kwarg, _offline, _Source  # noqa: F401  (re-exported: used here and by tests)

DEFAULT_BASE = "black-forest-labs/FLUX.1-dev"
DEFAULT_ADAPTER = "WithAnyone/WithAnyone"
DEFAULT_SIGLIP = "google/siglip-base-patch16-256-i18n"
DEFAULT_FACE_PACK = "antelopev2"
#: The released adapter's file name in its hub repo.
ADAPTER_FILE = "withanyone.safetensors"

_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_CONFIG_NAMES = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}


def _check_weights(src: _Source, folder: str) -> None:
    """Require a component's weights: a single safetensors file or an index and every shard it lists."""
    for base in _WEIGHT_NAMES:
        name = f"{folder}/{base}" if folder else base
        index = f"{name}.index.json"
        if src.has(name):
            return
        if src.has(index):
            shards = sorted(set(json.loads(src.file(index).read_text())["weight_map"].values()))
            for shard in shards:
                src.file(f"{folder}/{shard}" if folder else shard)
            return
    options = " or ".join(f"{folder}/{b}[.index.json + shards]" for b in _WEIGHT_NAMES)
    raise ModelNotFoundError(f"{src.role}: no weights for component '{folder}' in {src.ref}: expected {options}")


def check_base(base: str | os.PathLike, revision: str | None = None, local_files_only: bool | None = None,
               skip: tuple[str, ...] = ()) -> _Source:
    """Check that a diffusers-layout FLUX pipeline has every file it needs; raise naming the first missing."""
    src = _Source(base, revision, local_files_only, "FLUX base")
    index = json.loads(src.file("model_index.json").read_text())
    for name, spec in index.items():
        if name.startswith("_") or name in skip or not isinstance(spec, list) or spec[0] is None:
            continue
        if name.startswith("tokenizer"):
            src.file(f"{name}/{_CONFIG_NAMES['tokenizer']}")
        elif name == "scheduler":
            src.file(f"{name}/{_CONFIG_NAMES['scheduler']}")
        else:
            src.file(f"{name}/config.json")
            _check_weights(src, name)
    return src


def locate_adapter(adapter: Any, revision: str | None = None,
                   local_files_only: bool | None = None) -> tuple[str, Path, dict[str, Any]]:
    """Find the adapter's weights without loading them: ``("diffusers", folder)`` for a ``save_pretrained``
    folder or ``("authors", file)`` for the released single file; raises naming the missing file."""
    path = Path(str(adapter)).expanduser()
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise ModelNotFoundError(f"adapter: {path} is missing")
        return "authors", path, {"path": str(path.resolve())}
    src = _Source(adapter, revision, local_files_only, "adapter")
    if src.has("config.json"):
        weights = src.file("diffusion_pytorch_model.safetensors")
        return "diffusers", weights.parent, src.describe()
    weights = src.file(ADAPTER_FILE)
    return "authors", weights, src.describe()


def load_adapter(adapter: Any, revision: str | None = None, local_files_only: bool | None = None,
                 torch_dtype: Any = None, num_double_blocks: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The adapter from a ``WithAnyoneAdapter``, a ``save_pretrained`` folder, the authors' file, or a hub
    repo holding either; returns it and a description of its source. ``num_double_blocks`` (the
    transformer's) tells the authors' flat block list where double blocks end (inferred for FLUX-dev)."""
    from ..model import WithAnyoneAdapter

    if isinstance(adapter, WithAnyoneAdapter):
        return adapter, {"object": type(adapter).__name__}
    kind, path, desc = locate_adapter(adapter, revision, local_files_only)
    if kind == "diffusers":
        model = WithAnyoneAdapter.from_pretrained(str(path), **_dtype_kwarg(torch_dtype))
    else:
        model = WithAnyoneAdapter.from_authors_checkpoint(str(path), torch_dtype=torch_dtype,
                                                          num_double_blocks=num_double_blocks)
    return model.eval(), desc


def WithAnyoneAdapterType() -> type:  # noqa: N802
    """The adapter class (imported lazily: torch + diffusers)."""
    from ..model import WithAnyoneAdapter

    return WithAnyoneAdapter


def load_siglip(siglip: Any, torch_dtype: Any = None, revision: str | None = None,
                local_files_only: bool | None = None) -> tuple[Any, Any]:
    """SigLIP's vision tower and image processor from a hub id or folder (full SigLIP checkpoints too)."""
    from transformers import AutoImageProcessor, SiglipVisionModel

    src = _Source(siglip, revision, local_files_only, "SigLIP")
    src.file("config.json")
    src.file("preprocessor_config.json")
    _check_weights(src, "")
    folder = str(src.file("config.json").parent)
    model = SiglipVisionModel.from_pretrained(folder, torch_dtype=torch_dtype).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    return model, processor


def from_pretrained(cls: Any, base: str | os.PathLike = DEFAULT_BASE, adapter: Any = DEFAULT_ADAPTER,
                    siglip: Any = DEFAULT_SIGLIP, face_pack: Any = DEFAULT_FACE_PACK, *, torch_dtype: Any = None,
                    revision: str | None = None, local_files_only: bool | None = None, low_vram: Any = None,
                    base_quantization: str | None = None, adapter_quantization: str | None = None,
                    text_encoder_quantization: str | None = None, offload: str | bool | None = None,
                    transformer_file: str | os.PathLike | None = None, device: Any = None,
                    **components: Any) -> Any:
    """Build a :class:`WithAnyonePipeline` (see the module docstring); ``components`` override base parts.

    ``adapter="default"`` takes the base folder's own ``adapter/`` (a ``WithAnyonePipeline.save_pretrained``
    output) when it has one, else ``WithAnyone/WithAnyone``. Memory (:mod:`withanyone.pipeline.memory`):
    ``low_vram`` names a preset, the ``*_quantization`` / ``offload`` arguments override it, and
    ``transformer_file`` (GGUF / fp8 safetensors) replaces the base's transformer; every setting is checked before
    anything loads. An offload other than ``none`` places the pipeline on ``device`` (default: CUDA when present).
    """
    import torch

    from . import memory

    mem = memory.resolve_memory(low_vram, base_quantization=base_quantization,
                                adapter_quantization=adapter_quantization, offload=offload,
                                text_encoder_quantization=text_encoder_quantization)
    where = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    why = memory.check_available(mem, where, transformer_file)
    if why:
        raise memory.MemoryConfigError(why)
    dtype = torch_dtype if torch_dtype is not None else torch.bfloat16
    skip = tuple(components) + (("transformer",) if transformer_file is not None else ())
    src = check_base(base, revision, local_files_only, skip=skip)
    index = json.loads(src.file("model_index.json").read_text())
    if "adapter" in index and "adapter" not in components:
        components["adapter"] = None  # loaded below by our loader (diffusers cannot import it by library name)
        if adapter == "default" and isinstance(index["adapter"], list) and index["adapter"][0] is not None:
            adapter = src.file("adapter/config.json").parent
    if adapter == "default":
        adapter = DEFAULT_ADAPTER
    if adapter is not None and not isinstance(adapter, WithAnyoneAdapterType()):
        locate_adapter(adapter, None, local_files_only)  # a missing adapter file fails before the base loads
    folder = str(src.file("model_index.json").parent)
    if transformer_file is not None and "transformer" not in components:
        src.file("transformer/config.json")  # the architecture of the single file (fetched into the snapshot)
    if "transformer" in components:
        memory.quantize_transformer(components["transformer"], mem.base, compute_dtype=dtype)
    else:
        transformer = memory.load_transformer(folder, mem.base, transformer_file=transformer_file, torch_dtype=dtype,
                                              local_files_only=True)
        if transformer is not None:
            components["transformer"] = transformer
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained.__func__(cls, folder, **_dtype_kwarg(dtype), **components)
    adapter_desc: dict[str, Any] | None = None
    if adapter is not None:
        adapter_model, adapter_desc = load_adapter(adapter, None, local_files_only, torch_dtype=dtype,
                                                   num_double_blocks=len(pipe.transformer.transformer_blocks))
        pipe.set_identity_adapter(adapter_model)
    if siglip is not None:
        if isinstance(siglip, (str, os.PathLike)):  # loaded (and its files checked) only at first use
            siglip_ref = str(siglip)

            def siglip_loader() -> tuple[Any, Any]:
                loaded = load_siglip(siglip_ref, torch_dtype=dtype, local_files_only=local_files_only)
                where = _Source(siglip_ref, None, local_files_only, "SigLIP")
                where.file("config.json")  # cached by now; records the hub commit
                pipe.model_sources["siglip"] = where.describe()
                return loaded

            pipe.set_siglip(siglip_loader)
        else:
            pipe.set_siglip(siglip)
    pipe.set_face_analyzer(face_pack)
    pipe.model_sources = {
        "base": src.describe(), "adapter": adapter_desc,
        "siglip": {"source": str(siglip)} if siglip is not None else None,
        "face_pack": str(face_pack),
    }
    if transformer_file is not None:
        pipe.model_sources["transformer_file"] = {"path": str(Path(transformer_file).expanduser().resolve())}
    pipe.memory = mem
    memory.apply_memory(pipe, mem, where, compute_dtype=dtype, place=mem.offload != "none" or device is not None)
    return pipe
