"""The JSON sidecar written beside every generated image (CLI and app alike): everything needed to redo it."""

from __future__ import annotations

import io
import platform
from pathlib import Path
from typing import Any

from PIL import Image


def build_sidecar(pipe: Any, result: Any, *, prompt: str, references: list[Any], box_mode: str,
                  layout: str | None, id_weight: float, siglip_weight: float, height: int, width: int,
                  steps: int, guidance: float, lora: list[str], lora_scale: float, dtype: str, device: str,
                  offload: bool | str, output: str, **extra: Any) -> dict[str, Any]:
    """The sidecar dict: parameters, seed, boxes used, model sources with revisions, library versions.

    ``references``: one entry per person (the CLI: its ``--ref``; the app: the list of that person's photos
    that were used). ``extra`` keys (app-only settings such as names or the low-VRAM preset) are appended after
    the standard ones, so a CLI sidecar and an app sidecar share every standard key.
    """
    import diffusers
    import torch
    import transformers

    from .. import __version__ as withanyone_version

    sidecar = {
        "prompt": prompt, "references": list(references), "reference_sources": list(result.references),
        "boxes": [list(b) for b in result.boxes], "box_mode": box_mode, "layout": layout,
        "id_weight": id_weight, "siglip_weight": siglip_weight, "seed": result.seed,
        "height": height, "width": width, "steps": steps, "guidance": guidance,
        "lora": list(lora), "lora_scale": lora_scale, "dtype": dtype, "device": device, "offload": offload,
        "models": {**pipe.model_sources, "face_analyzer": pipe.face_analyzer_spec()},
        "versions": {"withanyone": withanyone_version, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "output": output,
    }
    sidecar.update(extra)
    return sidecar


def write_image_and_sidecar(out: str | Path, image: Image.Image, sidecar: dict[str, Any]) -> Path:
    """Write ``image`` to ``out`` (format from the suffix, PNG otherwise) and the sidecar beside it, atomically;
    returns the sidecar's path."""
    from ..io import atomic_write_bytes, atomic_write_json

    out = Path(out)
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(out.suffix.lower(), "PNG")
    image.save(buf, format=fmt)
    atomic_write_bytes(out, buf.getvalue())
    sidecar_path = out.with_suffix(".json")
    atomic_write_json(sidecar_path, sidecar)
    return sidecar_path
