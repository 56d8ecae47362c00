"""Where each person's face goes: explicit boxes, boxes taken from a layout photo, or automatic placements.

Boxes are ``(x1, y1, x2, y2)`` in pixels of the *generated* image, one per person, in reference order.

Automatic placements (``boxes="auto"``), by number of people ``n`` and output size ``W × H``:

* one row when the image is landscape or square (``W ≥ H``) or ``n ≤ 2``; otherwise (portrait, ``n ≥ 3``)
  two rows, the top one holding ``⌈n/2⌉`` people;
* square boxes of side ``s = min(0.30·H / rows, 0.55·W / per_row, 0.35·min(W, H))`` (never under 16 px,
  one FLUX patch);
* the box centres sit at ``x = W·(i + ½)/per_row`` (each row centred), ``y = 0.35·H`` for one row, or
  ``0.28·H`` and ``0.58·H`` for two rows: heads in the upper part of the picture, as in group photos.

A layout photo's faces map to the output with one scale for both axes, so face boxes keep their aspect ratio
when the photo's aspect differs from the output's: ``fit="contain"`` (default) letterboxes the whole photo
into the output (scale ``min(W/w, H/h)``, centred: every face stays inside), ``fit="cover"`` centre-crops it
(scale ``max(W/w, H/h)``: faces near the cropped edges may fall outside and are refused).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import FaceCountError

Box = tuple[float, float, float, float]

#: Smallest box side the automatic layout produces (one 16-px FLUX patch).
MIN_SIDE = 16.0
#: How a layout photo maps onto the output: letterboxed whole (``contain``) or centre-cropped (``cover``).
LAYOUT_FITS = ("contain", "cover")


def layout_box(bbox: Sequence[float], photo_size: tuple[int, int], height: int, width: int,
               fit: str = "contain") -> Box:
    """A face box of a ``photo_size`` (w, h) layout photo in output pixels: one scale for x and y (aspect
    kept), the photo centred on the output; ``fit`` ``"contain"`` (whole photo visible) or ``"cover"``."""
    if fit not in LAYOUT_FITS:
        raise ValueError(f"`fit` must be one of {', '.join(LAYOUT_FITS)}, got {fit!r}")
    w0, h0 = (float(v) for v in photo_size)
    s = (min if fit == "contain" else max)(width / w0, height / h0)
    dx, dy = (width - w0 * s) / 2, (height - h0 * s) / 2
    x1, y1, x2, y2 = (float(v) for v in bbox[:4])
    return (x1 * s + dx, y1 * s + dy, x2 * s + dx, y2 * s + dy)


def validate_boxes(boxes: Any, num_people: int, height: int, width: int, name: str = "boxes") -> list[Box]:
    """Check explicit boxes: one per person, finite, x2 > x1 and y2 > y1, overlapping the image.

    Boxes partly outside the image are kept (the adapter clips them to the token grid); a box entirely
    outside it is refused, since that person could never appear. Raises ``ValueError`` naming ``name``.
    """
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` must be a list of (x1, y1, x2, y2) boxes in pixels, got {boxes!r}") from exc
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"`{name}` must be a list of (x1, y1, x2, y2) boxes in pixels, got shape {arr.shape}")
    if arr.shape[0] != num_people:
        raise ValueError(f"`{name}` holds {arr.shape[0]} box(es) but there are {num_people} reference(s); "
                         "give exactly one box per person, in reference order")
    out: list[Box] = []
    for i, (x1, y1, x2, y2) in enumerate(arr):
        if not np.isfinite([x1, y1, x2, y2]).all():
            raise ValueError(f"`{name}`[{i}] = {tuple(arr[i])} holds NaN or infinity")
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"`{name}`[{i}] = {tuple(float(v) for v in arr[i])} is empty: need x2 > x1 and y2 > y1")
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            raise ValueError(f"`{name}`[{i}] = {tuple(float(v) for v in arr[i])} lies entirely outside the "
                             f"{width}x{height} image")
        out.append((float(x1), float(y1), float(x2), float(y2)))
    return out


def auto_boxes(num_people: int, height: int, width: int) -> list[Box]:
    """Preset face boxes for ``num_people`` in a ``width × height`` image (see the module docstring)."""
    if num_people < 1:
        raise ValueError(f"need at least one person for automatic boxes, got {num_people}")
    two_rows = width < height and num_people >= 3
    rows = 2 if two_rows else 1
    per_row = math.ceil(num_people / 2) if two_rows else num_people
    side = min(0.30 * height / rows, 0.55 * width / per_row, 0.35 * min(width, height))
    side = max(side, MIN_SIDE)
    ys = [0.28 * height, 0.58 * height] if two_rows else [0.35 * height]
    boxes: list[Box] = []
    remaining = num_people
    for r in range(rows):
        count = min(per_row, remaining)
        remaining -= count
        for i in range(count):
            cx = width * (i + 0.5) / count
            cy = ys[r]
            boxes.append((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    return boxes


def boxes_from_layout(layout: Any, num_people: int, height: int, width: int, analyzer: Any,
                      order: str = "left-to-right", fit: str = "contain") -> list[Box]:
    """Face boxes of a layout photo in output pixels: its ``num_people`` largest faces.

    The photo maps onto the output by :func:`layout_box` (one scale for both axes, centred; ``fit``
    ``"contain"`` letterboxes, ``"cover"`` centre-crops), so boxes keep their aspect ratio.
    ``order="left-to-right"`` gives reference 1 the leftmost face; ``"size"`` the largest. Raises
    :class:`FaceCountError` naming the photo when it holds fewer faces than people.
    """
    from ..faces.image import describe_source, load_image

    image = load_image(layout)
    name = describe_source(layout)
    faces = analyzer.detect(image, embed=False)
    if len(faces) < num_people:
        raise FaceCountError(f"layout photo {name} shows {len(faces)} face(s) but {num_people} reference(s) "
                             "were given; use a photo with at least one face per person, or pass boxes")
    faces = sorted(faces, key=lambda f: -f.area)[:num_people]
    if order == "left-to-right":
        faces = sorted(faces, key=lambda f: f.center[0])
    elif order != "size":
        raise ValueError(f"`order` must be 'left-to-right' or 'size', got {order!r}")
    h0, w0 = image.shape[:2]
    return [layout_box(f.bbox, (w0, h0), height, width, fit) for f in faces]


def resolve_boxes(boxes: Any, num_people: int, height: int, width: int, analyzer: Any = None) -> list[Box]:
    """Boxes for one generation: ``None``/``"auto"`` → :func:`auto_boxes`; a sequence of 4-tuples →
    :func:`validate_boxes`; anything else (path, PIL image, array) → a layout photo."""
    if boxes is None or (isinstance(boxes, str) and boxes == "auto"):
        return auto_boxes(num_people, height, width)
    if _looks_like_boxes(boxes):
        return validate_boxes(boxes, num_people, height, width)
    if analyzer is None:
        raise ValueError("`boxes` is a layout photo but no face analyzer is available to find its faces")
    return validate_boxes(boxes_from_layout(boxes, num_people, height, width, analyzer), num_people, height,
                          width, name="layout boxes")


def _looks_like_boxes(obj: Any) -> bool:
    """True for a (possibly empty) sequence of 4-number sequences (not an image array)."""
    if isinstance(obj, np.ndarray):
        return obj.ndim == 2 and obj.shape[1] == 4 and obj.shape[0] <= 64 and obj.dtype != np.uint8
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return all(isinstance(b, (Sequence, np.ndarray)) and not isinstance(b, (str, bytes)) and len(b) == 4
                   for b in obj)
    try:  # torch tensor
        import torch

        return isinstance(obj, torch.Tensor) and obj.ndim == 2 and obj.shape[1] == 4
    except ImportError:
        return False
