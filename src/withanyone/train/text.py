"""Precomputed prompt embeddings, so a training run needs no T5 (or CLIP) on its GPUs.

:func:`precompute_text_embeddings` runs the pipeline's text encoders once over a list of prompts and
writes one safetensors file (``t5`` [P, L, D], ``pooled`` [P, C], the prompts in the metadata);
:func:`load_text_embeddings` reads it back as prompt → (t5 [1, L, D], pooled [1, C]).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from withanyone.errors import WithAnyoneError

__all__ = ["TextEmbeddingError", "precompute_text_embeddings", "load_text_embeddings"]


class TextEmbeddingError(WithAnyoneError, ValueError):
    """A precomputed text-embedding file is missing, malformed, or lacks a prompt the run needs."""


def precompute_text_embeddings(pipe: Any, prompts: Sequence[str], path: str | Path,
                               max_sequence_length: int = 512) -> Path:
    """Encode each distinct prompt alone (batch-independent numbers) and write them to ``path`` atomically."""
    from withanyone.model.checkpoint import save_state_dict

    unique = list(dict.fromkeys(prompts))
    if not unique:
        raise TextEmbeddingError(f"{path}: no prompts to encode")
    device = next(pipe.text_encoder_2.parameters()).device
    t5, pooled = [], []
    with torch.no_grad():
        for p in unique:
            e, c, _ = pipe.encode_prompt(prompt=[p], prompt_2=None, device=device, num_images_per_prompt=1,
                                         max_sequence_length=max_sequence_length)
            t5.append(e[0].cpu())
            pooled.append(c[0].cpu())
    tensors = {"t5": torch.stack(t5).contiguous(), "pooled": torch.stack(pooled).contiguous()}
    meta = {"withanyone": json.dumps({"prompts": unique, "max_sequence_length": max_sequence_length})}
    return save_state_dict(tensors, Path(path), metadata=meta)


def load_text_embeddings(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """prompt → (t5 [1, L, D], pooled [1, C]) from :func:`precompute_text_embeddings`'s file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TextEmbeddingError(f"{path}: text-embedding file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            prompts = json.loads((f.metadata() or {})["withanyone"])["prompts"]
            t5, pooled = f.get_tensor("t5"), f.get_tensor("pooled")
    except (OSError, KeyError, ValueError) as exc:
        raise TextEmbeddingError(f"{path}: not a text-embedding file ({exc})") from exc
    if len(prompts) != len(t5) or len(prompts) != len(pooled):
        raise TextEmbeddingError(f"{path}: {len(prompts)} prompts but {len(t5)}/{len(pooled)} embeddings")
    return {p: (t5[i:i + 1], pooled[i:i + 1]) for i, p in enumerate(prompts)}
