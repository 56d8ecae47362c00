"""Optional background matting of reference face crops before SigLIP (the release's ``use_matting``).

The release runs BiRefNet (``briaai/RMBG-2.0``, ``AutoModelForImageSegmentation``) on each 512 × 512 crop:
the crop as a ``[0, 1]`` tensor at its own size (no resize, no normalisation), the *last* output's sigmoid
as the foreground mask, the mask scaled to bytes (truncated), resized to the crop and used to paste the crop
onto black. :func:`matte_crop` does the same with any transformers segmentation model: an output list or
tuple gives its last element, a ``ModelOutput`` its ``logits``; one channel → sigmoid; several → softmax, and
the foreground is everything but label 0 (background).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: The release's matting model.
DEFAULT_MATTING = "briaai/RMBG-2.0"


def load_matting(source: Any, *, torch_dtype: torch.dtype | None = None, trust_remote_code: bool | None = None,
                 local_files_only: bool | None = None) -> Any:
    """A segmentation model from a hub id or folder (safetensors only). ``trust_remote_code`` defaults to True
    only for the release's ``briaai/RMBG-2.0`` (its BiRefNet class lives in the repo, as the release loads it)."""
    from transformers import AutoConfig, AutoModelForImageSegmentation, AutoModelForSemanticSegmentation
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES

    if trust_remote_code is None:
        trust_remote_code = str(source) == DEFAULT_MATTING
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if local_files_only is not None:
        kw["local_files_only"] = local_files_only
    config = AutoConfig.from_pretrained(source, **kw)
    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModelForImageSegmentation" not in auto_map and \
            getattr(config, "model_type", None) in MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES:
        cls = AutoModelForSemanticSegmentation
    else:
        cls = AutoModelForImageSegmentation
    model = cls.from_pretrained(source, use_safetensors=True, **kw)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.eval()


def _foreground(out: Any) -> torch.Tensor:
    """``[H, W]`` foreground probability from a segmentation model's output."""
    if isinstance(out, (list, tuple)):
        out = out[-1]
    if not isinstance(out, torch.Tensor):
        out = out["logits"] if "logits" in out else out[0]
    while isinstance(out, (list, tuple)):
        out = out[-1]
    logits = out.float()
    if logits.ndim == 4:
        logits = logits[0]
    if logits.ndim == 2:
        return logits.sigmoid()
    if logits.shape[0] == 1:
        return logits[0].sigmoid()
    return 1.0 - logits.softmax(0)[0]


def foreground_mask(crop: np.ndarray, model: Any) -> np.ndarray:
    """The model's foreground mask of ``crop`` (``HxWx3`` uint8) as ``HxW`` uint8, resized to the crop."""
    from PIL import Image

    param = next(model.parameters())
    pixels = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0).unsqueeze(0)
    with torch.no_grad():
        prob = _foreground(model(pixels.to(param.device, param.dtype))).cpu()
    mask = Image.fromarray(prob.mul(255).to(torch.uint8).numpy())  # torchvision's ToPILImage
    return np.asarray(mask.resize((crop.shape[1], crop.shape[0])))


def matte_crop(crop: np.ndarray, model: Any) -> np.ndarray:
    """``crop`` pasted onto black through the model's foreground mask (RGB uint8, same size)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(crop)).convert("RGB")
    result = Image.new("RGB", image.size, (0, 0, 0))
    result.paste(image, (0, 0), Image.fromarray(foreground_mask(np.asarray(image), model)))
    return np.asarray(result)
