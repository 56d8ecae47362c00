"""Per-block identity cross-attention (released layout) with a dense and a sparse gather→attend→scatter path.

Image tokens are the queries, ID tokens the keys/values; a boolean mask [B, 1, L, S] limits each image
token to the tokens of the person whose face box contains it. Rows with no allowed key come out of
SDPA as exact zeros, and ``to_out`` has no bias, so tokens outside every box get a zero residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IdentityCrossAttention",
    "select_covered_tokens",
    "gather_mask_rows",
    "gather_tokens",
    "scatter_add_tokens",
]


class IdentityCrossAttention(nn.Module):
    """LayerNorm(ID) / LayerNorm(image) → q from image, k,v from ID (no biases) → SDPA → ``to_out``."""

    def __init__(self, dim: int = 3072, num_heads: int = 24, head_dim: int = 64, kv_dim: int | None = None):
        super().__init__()
        kv_dim = dim if kv_dim is None else kv_dim
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.norm1 = nn.LayerNorm(kv_dim)  # ID tokens
        self.norm2 = nn.LayerNorm(dim)  # image tokens
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project_kv(self, id_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ID tokens [B, S, D] → keys and values [B, heads, S, head_dim]."""
        k, v = self.to_kv(self.norm1(id_tokens)).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def attend(
        self, image_tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Image tokens [B, L, D] attend to projected ID keys/values under ``mask`` [B, 1, L, S] → [B, L, D]."""
        q = self._heads(self.to_q(self.norm2(image_tokens)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def forward(
        self, id_tokens: torch.Tensor, image_tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense residual for every image token (the release's computation): [B, L, D]."""
        k, v = self.project_kv(id_tokens)
        return self.attend(image_tokens, k, v, mask)


def select_covered_tokens(covered: torch.Tensor) -> torch.Tensor:
    """Indices [B, K] of the image tokens covered by some box (rows padded by repeating their first index).

    ``covered`` is [B, L] bool; K is the largest count over the batch. Padding rows repeat a covered
    index, whose mask row is then all False by construction of :func:`gather_mask_rows`.
    """
    counts = covered.sum(-1)
    k = int(counts.max()) if covered.numel() else 0
    # stable sort puts covered tokens first, in token order
    order = torch.sort((~covered).to(torch.uint8), dim=-1, stable=True).indices[:, :k]
    pad = torch.arange(k, device=covered.device).unsqueeze(0) >= counts.unsqueeze(1)
    first = order[:, :1].expand_as(order)
    return torch.where(pad, first, order)


def gather_mask_rows(mask: torch.Tensor, index: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Rows of ``mask`` [B, 1, L, S] at ``index`` [B, K]; padding rows (beyond each item's count) all False."""
    rows = torch.gather(mask, 2, index[:, None, :, None].expand(-1, 1, -1, mask.shape[-1]))
    valid = torch.arange(index.shape[1], device=index.device).unsqueeze(0) < covered.sum(-1, keepdim=True)
    return rows & valid[:, None, :, None]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` [B, L, D] at ``index`` [B, K] → [B, K, D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_add_tokens(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Out-of-place ``x[b, index[b, k]] += values[b, k]`` (padding rows carry zeros)."""
    return x.scatter_add(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), values)
