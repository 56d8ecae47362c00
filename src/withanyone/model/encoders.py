"""Identity token encoders: ArcFace embedding → 8 tokens, SigLIP patch features → tokens (released layout).

Both are ``nn.Sequential`` so their parameter names are exactly the release's (``0`` first Linear,
``1`` GELU, ``2`` LayerNorm, ``3`` second Linear).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ArcFaceTokenEncoder", "SiglipTokenEncoder", "siglip_branch_tokens"]


class ArcFaceTokenEncoder(nn.Sequential):
    """``Linear(d, 4w) → GELU → LayerNorm(4w) → Linear(4w, n·w)``, reshaped to n tokens of width w per person."""

    def __init__(self, arcface_dim: int = 512, hidden_size: int = 3072, num_tokens: int = 8):
        super().__init__(
            nn.Linear(arcface_dim, 4 * hidden_size, bias=True),
            nn.GELU(),
            nn.LayerNorm(4 * hidden_size),
            nn.Linear(4 * hidden_size, num_tokens * hidden_size, bias=True),
        )
        self.arcface_dim = arcface_dim
        self.hidden_size = hidden_size
        self.num_tokens = num_tokens

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, N, d] ArcFace embeddings → [B, N, n, w] tokens."""
        if embeddings.shape[-1] != self.arcface_dim:
            raise ValueError(
                f"arcface embeddings must have {self.arcface_dim} dims (insightface recognizer), got shape "
                f"{tuple(embeddings.shape)}"
            )
        out = super().forward(embeddings)
        return out.unflatten(-1, (self.num_tokens, self.hidden_size))


class SiglipTokenEncoder(nn.Sequential):
    """``Linear(768, w) → GELU → LayerNorm(w) → Linear(w, w)`` applied to every SigLIP patch token."""

    def __init__(self, siglip_dim: int = 768, hidden_size: int = 3072):
        super().__init__(
            nn.Linear(siglip_dim, hidden_size, bias=True),
            nn.GELU(),
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.siglip_dim = siglip_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, N, T, 768] SigLIP last hidden states → [B, N, T, w]."""
        if features.shape[-1] != self.siglip_dim:
            raise ValueError(
                f"siglip features must have {self.siglip_dim} dims (SigLIP vision last_hidden_state), got "
                f"shape {tuple(features.shape)}"
            )
        return super().forward(features)


def siglip_branch_tokens(siglip_tokens: torch.Tensor, arcface_tokens: torch.Tensor) -> torch.Tensor:
    """Per person, the SigLIP tokens followed by the person's ArcFace tokens: [B, N, T+n, w] → [B, N·(T+n), w]."""
    return torch.cat([siglip_tokens, arcface_tokens], dim=2).flatten(1, 2)
