"""What flows between the WithAnyone nodes: a PERSON (one identity) and WITHANYONE_BOXES (face boxes in a frame).

Plain dataclasses with no ComfyUI import, so the library and its tests run without ComfyUI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..pipeline.layout import Box, validate_boxes

__all__ = ["Person", "FaceBoxes", "PERSON", "BOXES", "ADAPTER", "FACE_ANALYZER", "SIGLIP"]

#: ComfyUI type names of the pack's own sockets (core types are used everywhere else).
PERSON = "WITHANYONE_PERSON"
BOXES = "WITHANYONE_BOXES"
ADAPTER = "WITHANYONE_ADAPTER"
FACE_ANALYZER = "WITHANYONE_FACE_ANALYZER"
SIGLIP = "WITHANYONE_SIGLIP"


@dataclass
class Person:
    """One identity: the ArcFace vector at insightface's raw norm, the SigLIP face crop and, once a SigLIP model
    has seen it, the crop's SigLIP features [T, D]; ``warnings`` are shown under the node."""

    arcface: np.ndarray
    crop: np.ndarray | None = None
    siglip: Any = None
    source: str = "<embedding>"
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.arcface = np.asarray(self.arcface, dtype=np.float32).reshape(-1)


@dataclass
class FaceBoxes:
    """One ``(x1, y1, x2, y2)`` pixel box per person (in the people's order) inside a ``width × height`` frame;
    Apply WithAnyone rescales them to the latent's own size."""

    boxes: list[Box]
    width: int
    height: int
    method: str = "typed"

    def __post_init__(self) -> None:
        if int(self.width) < 16 or int(self.height) < 16:
            raise ValueError(f"boxes frame {self.width}x{self.height}: width and height must be at least 16 pixels")
        self.width, self.height = int(self.width), int(self.height)
        self.boxes = validate_boxes(self.boxes, len(self.boxes), self.height, self.width) if self.boxes else []

    def scaled(self, width: int, height: int) -> list[Box]:
        """The boxes in a ``width × height`` image (unchanged when it is the boxes' own frame)."""
        if (int(width), int(height)) == (self.width, self.height):
            return list(self.boxes)
        sx, sy = width / self.width, height / self.height
        return [(x1 * sx, y1 * sy, x2 * sx, y2 * sy) for x1, y1, x2, y2 in self.boxes]


def parse_boxes_text(text: str) -> list[Box]:
    """``"x1,y1,x2,y2; x1,y1,x2,y2"`` (``;`` or new lines between boxes) → boxes; ValueError names the bad part."""
    boxes: list[Box] = []
    for i, part in enumerate(p for chunk in text.replace("\n", ";").split(";") if (p := chunk.strip())):
        nums = [v for v in part.replace(" ", ",").split(",") if v]
        try:
            vals = [float(v) for v in nums]
        except ValueError:
            raise ValueError(f"box {i + 1} {part!r} is not four numbers x1,y1,x2,y2") from None
        if len(vals) != 4:
            raise ValueError(f"box {i + 1} {part!r} has {len(vals)} numbers, expected four: x1,y1,x2,y2")
        boxes.append((vals[0], vals[1], vals[2], vals[3]))
    return boxes


def boxes_from_bbox(bbox: Any) -> list[Box]:
    """A ``BBOX`` socket's value → boxes: dicts with ``x, y, width, height`` or sequences ``(x1, y1, x2, y2)``."""
    items: Sequence[Any] = [bbox] if isinstance(bbox, dict) else list(bbox)
    if len(items) == 4 and all(isinstance(v, (int, float, np.number)) for v in items):
        items = [items]
    out: list[Box] = []
    for i, b in enumerate(items):
        if isinstance(b, dict):
            try:
                x, y, w, h = (float(b[k]) for k in ("x", "y", "width", "height"))
            except KeyError as exc:
                raise ValueError(f"BBOX {i + 1} {b!r} lacks key {exc}: need x, y, width, height") from None
            out.append((x, y, x + w, y + h))
        else:
            vals = [float(v) for v in np.asarray(b, dtype=np.float64).reshape(-1)]
            if len(vals) != 4:
                raise ValueError(f"BBOX {i + 1} {b!r} is not four numbers x1,y1,x2,y2")
            out.append((vals[0], vals[1], vals[2], vals[3]))
    return out
