"""Test-only: ComfyUI's FLUX config detection with the widths read from the tensors (it hard-codes FLUX-dev's).

``comfy.model_detection.detect_unet_config`` fills a FLUX config with 3072 wide, 24 heads and a 4096-d T5
context whatever the file holds, so a tiny FLUX cannot be built from it. :func:`install` wraps the function:
for a FLUX state dict it replaces those numbers with the ones the weights imply (hidden size from ``img_in``,
head dim from the query norm, T5 width from ``txt_in``, MLP ratio from ``img_mlp``) and scales FLUX's rope split
``[16, 56, 56]`` of 128 to the head dim. On FLUX-dev itself the result is the hard-coded config, unchanged.
"""

from __future__ import annotations

import functools


def shape_flux_config(config: dict, state_dict, key_prefix: str) -> dict:
    """``config`` (a detected FLUX unet config) with its widths taken from ``state_dict``'s tensor shapes."""
    if not isinstance(config, dict) or config.get("image_model") != "flux":
        return config
    p = key_prefix
    hidden = state_dict[f"{p}img_in.weight"].shape[0]
    head_dim = state_dict[f"{p}double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    out = dict(config)
    out["hidden_size"] = hidden
    out["num_heads"] = hidden // head_dim
    out["context_in_dim"] = state_dict[f"{p}txt_in.weight"].shape[1]
    out["mlp_ratio"] = state_dict[f"{p}double_blocks.0.img_mlp.0.weight"].shape[0] / hidden
    out["axes_dim"] = [head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16]
    return out


def install() -> None:
    """Wrap ``comfy.model_detection.detect_unet_config`` with :func:`shape_flux_config` (idempotent)."""
    import comfy.model_detection as md

    if getattr(md.detect_unet_config, "_withanyone_shapes", False):
        return
    original = md.detect_unet_config

    @functools.wraps(original)
    def detect_unet_config(state_dict, key_prefix, *args, **kwargs):
        return shape_flux_config(original(state_dict, key_prefix, *args, **kwargs), state_dict, key_prefix)

    detect_unet_config._withanyone_shapes = True
    md.detect_unet_config = detect_unet_config
