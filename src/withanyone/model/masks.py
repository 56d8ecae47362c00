"""Face boxes → image-token attention masks for the identity cross-attention, built vectorised.

FLUX turns an H×W image into (H/8)×(W/8) latents packed 2×2, so image token ``r·(W/16) + c`` covers
pixels [16c, 16c+16) × [16r, 16r+16). Token (c, r) may attend to person j's ID tokens iff
``c ∈ [⌊x1/16⌋, ⌈x2/16⌉)`` and ``r ∈ [⌊y1/16⌋, ⌈y2/16⌉)`` (clipped to the grid); person j's tokens
occupy positions ``[j·n, (j+1)·n)`` of the concatenated ID sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from withanyone.errors import WithAnyoneError

PATCH_PIXELS = 16  # VAE /8, then 2×2 packing

BoxesLike = torch.Tensor | Sequence[Sequence[Sequence[float]]]

__all__ = [
    "PATCH_PIXELS",
    "InvalidBoxError",
    "token_grid",
    "boxes_to_tensor",
    "box_token_ranges",
    "box_coverage",
    "build_identity_mask",
]


class InvalidBoxError(WithAnyoneError, ValueError):
    """A face box is malformed, lies outside the image, or the box count does not match the people."""


def token_grid(height: int, width: int) -> tuple[int, int]:
    """Rows and columns of FLUX's image-token grid for an output of ``height``×``width`` pixels."""
    if int(height) < PATCH_PIXELS or int(width) < PATCH_PIXELS:
        raise InvalidBoxError(f"height={height}, width={width}: FLUX images must be at least 16×16 pixels")
    return int(height) // PATCH_PIXELS, int(width) // PATCH_PIXELS


def boxes_to_tensor(boxes: BoxesLike, *, num_people: int | None = None, batch_size: int | None = None) -> torch.Tensor:
    """Validate per-item box lists ``[[(x1, y1, x2, y2), ...], ...]`` and return a float64 [B, N, 4] tensor.

    Raises :class:`InvalidBoxError` naming the item and person when a box is not 4 finite numbers with
    x2 > x1 and y2 > y1, when items hold different numbers of boxes, or when the count differs from
    ``num_people`` / the number of items from ``batch_size``.
    """
    if isinstance(boxes, torch.Tensor):
        t = boxes.detach().to("cpu", torch.float64)
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim != 3 or t.shape[-1] != 4:
            raise InvalidBoxError(f"boxes tensor must be [B, N, 4], got shape {tuple(boxes.shape)}")
    else:
        if isinstance(boxes, (str, bytes)) or not isinstance(boxes, Sequence):
            raise InvalidBoxError(
                f"boxes must be a list (one per batch item) of (x1, y1, x2, y2) lists, got {type(boxes).__name__}"
            )
        rows = []
        for b, item in enumerate(boxes):
            if isinstance(item, torch.Tensor):
                item = item.tolist()
            if not isinstance(item, Sequence) or isinstance(item, (str, bytes)):
                raise InvalidBoxError(f"boxes[{b}] must be a list of (x1, y1, x2, y2), got {type(item).__name__}")
            people = []
            for j, box in enumerate(item):
                if isinstance(box, torch.Tensor):
                    box = box.tolist()
                try:
                    vals = [float(v) for v in box]
                except (TypeError, ValueError):
                    raise InvalidBoxError(f"boxes[{b}][{j}] = {box!r} is not four numbers (x1, y1, x2, y2)") from None
                if len(vals) != 4:
                    raise InvalidBoxError(
                        f"boxes[{b}][{j}] = {box!r} has {len(vals)} numbers, expected 4 (x1, y1, x2, y2)"
                    )
                people.append(vals)
            rows.append(people)
        counts = {len(r) for r in rows}
        if len(counts) > 1:
            raise InvalidBoxError(
                f"every batch item needs the same number of boxes, got counts {[len(r) for r in rows]}"
            )
        n = counts.pop() if counts else 0
        t = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), n, 4)
    if batch_size is not None and t.shape[0] not in (batch_size,):
        raise InvalidBoxError(f"got boxes for {t.shape[0]} batch items, expected {batch_size}")
    if num_people is not None and t.shape[1] != num_people:
        raise InvalidBoxError(
            f"got {t.shape[1]} boxes per image for {num_people} people: give exactly one face box per person"
        )
    if not torch.isfinite(t).all():
        b, j = (~torch.isfinite(t)).any(-1).nonzero()[0].tolist()
        raise InvalidBoxError(f"boxes[{b}][{j}] = {t[b, j].tolist()} is not finite")
    bad = (t[..., 2] <= t[..., 0]) | (t[..., 3] <= t[..., 1])
    if bad.any():
        b, j = bad.nonzero()[0].tolist()
        raise InvalidBoxError(f"boxes[{b}][{j}] = {t[b, j].tolist()} is empty: need x2 > x1 and y2 > y1 (pixels)")
    return t


def box_token_ranges(boxes: BoxesLike, height: int, width: int) -> torch.Tensor:
    """Token-grid ranges [B, N, 4] = (col0, row0, col1, row1), half-open, clipped, each ≥ 1 token wide.

    A box partly outside the image is clipped to it; a box smaller than a patch still covers the patch
    it lies in; a box entirely outside the image raises :class:`InvalidBoxError`.
    """
    t = boxes_to_tensor(boxes)
    rows, cols = token_grid(height, width)
    x1, y1, x2, y2 = t.unbind(-1)
    outside = (x1 >= width) | (y1 >= height) | (x2 <= 0) | (y2 <= 0)
    if outside.any():
        b, j = outside.nonzero()[0].tolist()
        raise InvalidBoxError(f"boxes[{b}][{j}] = {t[b, j].tolist()} lies entirely outside the {width}×{height} image")
    c0 = torch.floor(x1 / PATCH_PIXELS).clamp(0, cols - 1)
    r0 = torch.floor(y1 / PATCH_PIXELS).clamp(0, rows - 1)
    c1 = torch.maximum(torch.ceil(x2 / PATCH_PIXELS).clamp(max=cols), c0 + 1)
    r1 = torch.maximum(torch.ceil(y2 / PATCH_PIXELS).clamp(max=rows), r0 + 1)
    return torch.stack([c0, r0, c1, r1], dim=-1).long()


def box_coverage(
    boxes: BoxesLike, height: int, width: int, num_image_tokens: int | None = None, offset: int = 0
) -> torch.Tensor:
    """Boolean [B, N, L]: whether image token l lies in person n's box (tokens outside the grid: False).

    ``offset`` shifts the grid inside a longer sequence (Kontext: target tokens first, so offset 0).
    """
    ranges = box_token_ranges(boxes, height, width)
    rows, cols = token_grid(height, width)
    grid = rows * cols
    length = grid + offset if num_image_tokens is None else int(num_image_tokens)
    if offset < 0 or offset + grid > length:
        raise InvalidBoxError(
            f"a {width}×{height} image has {grid} tokens, which do not fit at offset {offset} in a sequence of {length}"
        )
    c = torch.arange(cols)
    r = torch.arange(rows)
    in_x = (c >= ranges[..., 0:1]) & (c < ranges[..., 2:3])  # [B, N, cols]
    in_y = (r >= ranges[..., 1:2]) & (r < ranges[..., 3:4])  # [B, N, rows]
    cover = (in_y.unsqueeze(-1) & in_x.unsqueeze(-2)).flatten(-2)  # [B, N, rows*cols], row-major
    if length == grid and offset == 0:
        return cover
    out = torch.zeros(*cover.shape[:2], length, dtype=torch.bool)
    out[..., offset : offset + grid] = cover
    return out


def build_identity_mask(
    boxes: BoxesLike,
    height: int,
    width: int,
    tokens_per_person: int,
    num_image_tokens: int | None = None,
    *,
    offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean attention mask [B, 1, L, N·n]: image token l may attend to person j's n ID tokens iff in j's box.

    Broadcasts over heads (one mask for all heads). Tokens in no box have an all-False row, for which
    the cross-attention returns exactly zero.
    """
    if tokens_per_person < 1:
        raise ValueError(f"tokens_per_person must be ≥ 1, got {tokens_per_person}")
    cover = box_coverage(boxes, height, width, num_image_tokens, offset)  # [B, N, L]
    mask = cover.transpose(1, 2).repeat_interleave(tokens_per_person, dim=2)  # [B, L, N*n]
    mask = mask.unsqueeze(1)
    return mask if device is None else mask.to(device)
