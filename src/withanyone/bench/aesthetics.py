"""Aesthetic score (aesthetic-predictor v2.5 layout: SigLIP vision tower + linear head), when weights load.

The head is read from a safetensors file with keys ``scoring_head.{0,2,4,6,8}.{weight,bias}`` (Linear layers,
no activations, applied to the unit-norm pooled SigLIP embedding). The released ``.pth`` is a pickle: convert
it once where you trust it (``safetensors.torch.save_file(torch.load(p), "head.safetensors")``); this module
never unpickles. Missing pieces make ``available`` False with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_SIGLIP = "google/siglip-so400m-patch14-384"


class AestheticScorer:
    """Aesthetic score of an output image (v2.5 scale, ~1–10)."""

    name = "aesthetic"

    def __init__(self, model: str = DEFAULT_SIGLIP, head: str | Path | None = None, device: str = "cpu",
                 offline: bool | None = None):
        self.available = False
        self.reason: str | None = None
        self.model_name = f"{model}::{head}"  # part of each row's input fingerprint
        if head is None:
            self.reason = "no aesthetic head given (a safetensors file with scoring_head.* keys)"
            return
        from .clip_metrics import unavailable_offline

        missing = unavailable_offline(model, offline)
        if missing:
            self.reason = f"SigLIP weights {model!r} {missing}"
            return
        try:
            import torch
            from safetensors.torch import load_file
            from transformers import SiglipImageProcessor, SiglipVisionModel
        except ImportError as exc:
            self.reason = f"aesthetics need torch and transformers ({exc.name} is not installed)"
            return
        from .clip_metrics import _why, load_pretrained

        try:
            self.model = load_pretrained(SiglipVisionModel, model, offline).eval().to(device)
            self.processor = load_pretrained(SiglipImageProcessor, model, offline)
        except Exception as exc:
            self.reason = f"SigLIP weights {model!r} " + _why(model, offline, exc)
            return
        head = Path(head)
        if not head.is_file():
            self.reason = f"aesthetic head {head} not found"
            return
        state = load_file(str(head))
        idx = sorted({int(k.split(".")[1]) for k in state if k.startswith("scoring_head.")})
        if not idx:
            self.reason = f"{head}: no scoring_head.* keys"
            return
        self.layers = [(state[f"scoring_head.{i}.weight"].float(), state[f"scoring_head.{i}.bias"].float())
                       for i in idx]
        self._torch = torch
        self.device = device
        self.available = True

    def score(self, sample: Any, output: str | Path) -> dict[str, float]:
        """``{"aesthetic": score}`` of the output image."""
        from ..faces import load_image

        torch = self._torch
        inputs = self.processor(images=[load_image(output)], return_tensors="pt")
        with torch.inference_mode():
            emb = self.model(pixel_values=inputs["pixel_values"].to(self.device)).pooler_output.float().cpu()
            x = emb / emb.norm(dim=-1, keepdim=True)
            for w, b in self.layers:
                x = x @ w.T + b
        return {"aesthetic": float(x.reshape(-1)[0])}
