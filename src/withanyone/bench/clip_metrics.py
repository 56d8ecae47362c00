"""CLIP-I (GT vs output) and CLIP-T (output vs prompt) with transformers' CLIP, when its weights load.

Scores are raw cosines of CLIP's projected embeddings (multiply by 100 for the "CLIPScore" convention).
If torch/transformers are missing or the weights cannot be loaded offline, ``available`` is False and
``reason`` says what was missing; the report then prints "not computed: <reason>" — never a silent zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CLIP = "openai/clip-vit-base-patch16"


def load_pretrained(cls: Any, name: str, offline: bool | None = None, **kwargs: Any) -> Any:
    """``cls.from_pretrained(name)``: a local folder or the local hub cache first, then one download try —
    skipped at once when offline (``offline``, ``HF_HUB_OFFLINE`` or no network, see :mod:`withanyone.hub`)."""
    from ..hub import hub_offline

    if Path(name).is_dir():
        return cls.from_pretrained(name, **kwargs)
    try:
        return cls.from_pretrained(name, local_files_only=True, **kwargs)
    except Exception:
        if hub_offline(offline) or _looks_local(name):
            raise
        return cls.from_pretrained(name, **kwargs)


def _looks_local(name: str) -> bool:
    """True when ``name`` reads as a path rather than a hub id ``owner/model``."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def first_sentence(text: str, limit: int = 240) -> str:
    """The first line of ``text``, shortened at a sentence or word boundary (never mid-word) to ``limit``."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    if len(line) <= limit:
        return line
    cut = line[:limit]
    end = cut.rfind(". ")
    if end > limit // 3:
        return cut[:end + 1]
    return cut[:cut.rfind(" ")].rstrip(",;:") + " …" if " " in cut else cut + " …"


def unavailable_offline(model: str, offline: bool | None = None) -> str | None:
    """Why ``model``'s weights cannot load, known before torch/transformers are imported (seconds saved):
    a path that does not exist, or a hub id missing from the local cache while offline. None = try to load."""
    from ..hub import hub_offline, offline_reason

    if Path(model).expanduser().exists():
        return None
    if _looks_local(model):
        return f"were not found: {model} is no such file or folder"
    if not hub_offline(offline):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # an id the hub library rejects: let the loader say why
        return None
    if isinstance(cached, str):
        return None
    return (f"are not in the local Hugging Face cache and {offline_reason(offline)}, so no download was tried; "
            "pass a local folder, or '' to skip this metric")


def _why(model: str, offline: bool | None, exc: Exception) -> str:
    """Why weights did not load, as a whole sentence (it goes to the console and report.md)."""
    from ..hub import hub_offline, offline_reason

    if not Path(model).exists():
        if _looks_local(model):
            return f"were not found: {model} is no such file or folder"
        if hub_offline(offline):
            return (f"are not in the local Hugging Face cache and {offline_reason(offline)}, so no download was "
                    "tried; pass a local folder, or '' to skip this metric")
    return f"could not be loaded ({type(exc).__name__}: {first_sentence(str(exc))})"


class ClipScorer:
    """CLIP-I and CLIP-T for one (sample, output); loads ``model`` (hub id or folder) once."""

    name = "clip"

    def __init__(self, model: str = DEFAULT_CLIP, device: str = "cpu", offline: bool | None = None):
        self.model_name = model
        self.available = False
        self.reason: str | None = None
        self._gt_cache: dict[str, np.ndarray] = {}
        missing = unavailable_offline(model, offline)
        if missing:
            self.reason = f"CLIP weights {model!r} {missing}"
            return
        try:
            import torch  # noqa: F401
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as exc:
            self.reason = f"CLIP needs torch and transformers ({exc.name} is not installed)"
            return
        try:
            self.model = load_pretrained(CLIPModel, model, offline).eval().to(device)
            self.processor = load_pretrained(CLIPProcessor, model, offline)
        except Exception as exc:
            self.reason = f"CLIP weights {model!r} " + _why(model, offline, exc)
            return
        self.device = device
        self.available = True

    def image_features(self, images: list[Any]) -> np.ndarray:
        """Unit-norm projected image embeddings (N, D) of images (paths or arrays)."""
        import torch

        from ..faces import load_image

        arrs = [load_image(i) for i in images]
        inputs = self.processor(images=arrs, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        feats = out.float().cpu().numpy()
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    def text_features(self, texts: list[str]) -> np.ndarray:
        """Unit-norm projected text embeddings (N, D)."""
        import torch

        inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            out = self.model.get_text_features(input_ids=inputs["input_ids"].to(self.device),
                                               attention_mask=inputs["attention_mask"].to(self.device))
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        feats = out.float().cpu().numpy()
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    def score(self, sample: Any, output: str | Path) -> dict[str, float]:
        """``{"clip_i": cos(GT, output), "clip_t": cos(output, prompt)}`` (clip_i only with a GT)."""
        out = self.image_features([output])[0]
        res: dict[str, float] = {}
        if sample.prompt:
            res["clip_t"] = float(out @ self.text_features([sample.prompt])[0])
        if sample.gt is not None and Path(sample.gt).is_file():
            key = str(sample.gt)
            if key not in self._gt_cache:
                self._gt_cache[key] = self.image_features([sample.gt])[0]
            res["clip_i"] = float(out @ self._gt_cache[key])
        return res
