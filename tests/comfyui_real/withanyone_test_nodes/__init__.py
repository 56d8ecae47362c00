"""Test-only ComfyUI custom nodes for the real-ComfyUI tests (never shipped to users).

Loaded into the headless test server from ``custom_nodes/``. Importing it makes ComfyUI's FLUX detection read
widths from tensor shapes (see :mod:`.detection`), so the tests' tiny FLUX files load through ``UNETLoader``.
"""

from __future__ import annotations

import sys

import torch

from .detection import install

if "comfy" in sys.modules:  # inside ComfyUI (the test server); the in-process harness installs it itself
    install()


class RandomFluxConditioning:
    """Seeded random FLUX CONDITIONING (T5 tokens + CLIP pooled vector), standing in for a T5/CLIP text encoder."""

    CATEGORY = "testing/withanyone"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "tokens": ("INT", {"default": 16, "min": 1, "max": 512}),
                "context_dim": ("INT", {"default": 64, "min": 1, "max": 8192}),
                "pooled_dim": ("INT", {"default": 32, "min": 1, "max": 8192}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0}),
            }
        }

    def make(self, seed: int, tokens: int, context_dim: int, pooled_dim: int, guidance: float):
        return (random_flux_conditioning(seed, tokens, context_dim, pooled_dim, guidance),)


def random_flux_conditioning(seed: int, tokens: int = 16, context_dim: int = 64, pooled_dim: int = 32,
                             guidance: float = 3.5) -> list:
    """The CONDITIONING list ComfyUI's CLIPTextEncode + FluxGuidance would give, filled from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, tokens, context_dim, generator=g)
    pooled = torch.randn(1, pooled_dim, generator=g)
    return [[cond, {"pooled_output": pooled, "guidance": guidance}]]


NODE_CLASS_MAPPINGS = {"WithAnyoneTestRandomFluxConditioning": RandomFluxConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"WithAnyoneTestRandomFluxConditioning": "Random FLUX Conditioning (test)"}
