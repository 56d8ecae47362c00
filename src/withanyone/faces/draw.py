"""Draw faces (boxes, landmarks, names) on an image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .types import Face

_COLORS = [(46, 204, 113), (52, 152, 219), (231, 76, 60), (241, 196, 15), (155, 89, 182), (26, 188, 156)]


def draw_faces(image: np.ndarray, faces: Sequence[Face], labels: Sequence[str | None] | None = None) -> Image.Image:
    """A PIL copy of ``image`` with each face's box, 5 landmarks and label (name and score) drawn."""
    im = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    draw = ImageDraw.Draw(im)
    lw = max(2, round(max(im.size) / 300))
    font_size = max(12, round(max(im.size) / 45))
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for k, face in enumerate(faces):
        color = _COLORS[k % len(_COLORS)]
        x1, y1, x2, y2 = (float(v) for v in face.bbox)
        draw.rectangle([x1, y1, x2, y2], outline=color, width=lw)
        r = lw * 1.2
        for x, y in face.landmarks:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        text = labels[k] if labels is not None and labels[k] else None
        if text:
            tb = draw.textbbox((x1, y1), text, font=font)
            th = tb[3] - tb[1] + 2 * lw
            ty = y1 - th if y1 - th >= 0 else y2
            draw.rectangle([x1, ty, x1 + tb[2] - tb[0] + 2 * lw, ty + th], fill=color)
            draw.text((x1 + lw, ty + lw - (tb[1] - y1)), text, fill=(0, 0, 0), font=font)
    return im
