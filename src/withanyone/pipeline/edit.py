"""Edit preprocessing for WithAnyone.Ke ("put these people into this photo"): faces → canvas → blurred condition.

The release (``gradio_edit.py`` + ``util.py``) detects the base photo's faces, crops the photo square around
all of them and resizes it to 512 (``face_preserving_resize``), maps the boxes back to the photo
(``resize_bbox``), blurs every face region of the photo (``blur_faces_in_image``: Gaussian radius 15, only
faces ≥ 100 px on both sides) and runs Kontext with that photo as the condition and the boxes as the places of
the new identities. The functions here do the same arithmetic (integer truncations included), generalised:

- :func:`square_around_faces` works for 1..N faces (the release reads ``face_bboxes[0]`` and ``[1]``) and raises
  :class:`EditError` when the faces cannot fit one square; its crop start is the middle of the valid window
  (``rng=random.Random(seed)`` draws it as the release's ``random.randint`` does).
- :func:`prepare_edit` blurs at the photo's resolution and then crops/resizes, so the release's condition is
  reproduced exactly on square photos, and non-square photos work too. Named options beyond the release:
  ``canvas="photo"`` (keep the whole photo at diffusers' nearest Kontext resolution), ``keep_unreplaced=True``
  (blur only the faces being replaced), ``feather`` (soft-edged blur mask, px).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import WithAnyoneError

__all__ = [
    "CANVASES", "KONTEXT_RESOLUTIONS", "CropTransform", "EditError", "EditPlan", "FACE_ORDERS", "RELEASE_BLUR_MIN_FACE",
    "EDIT_DET_THRESH", "RELEASE_BLUR_RADIUS", "RELEASE_SIZE", "blur_faces", "detect_faces", "kontext_resolution", "map_boxes",
    "photo_sha256", "prepare_edit", "square_around_faces",
]

#: The release's canvas side (``face_preserving_resize(..., 512)``).
RELEASE_SIZE = 512
#: ``blur_faces_in_image``'s Gaussian radius and smallest blurred face side (px of the blurred image).
RELEASE_BLUR_RADIUS = 15
RELEASE_BLUR_MIN_FACE = 100
#: Detection threshold of the release's edit demo: its FaceExtractor calls insightface's ``prepare(ctx_id=0)``,
#: whose default is 0.5 (the FLUX pipeline's references use util.py's 0.4). Here, not in kontext.py, so the CLI
#: can build its analyzer without importing diffusers.
EDIT_DET_THRESH = 0.5
#: ``canvas`` values: the release's square crop around the faces, or the whole photo (our option).
CANVASES = ("square", "photo")
#: Face numbering: left to right (default), or the detector's own order.
FACE_ORDERS = ("left", "detector")

#: The (width, height) pairs FLUX.1 Kontext was trained on: diffusers' ``PREFERRED_KONTEXT_RESOLUTIONS`` (BFL's list),
#: restated so preprocessing does not import diffusers' pipelines (a test checks they agree).
KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                       (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                       (1456, 720), (1504, 688), (1568, 672))

BoxList = Sequence[Sequence[float]]


class EditError(WithAnyoneError, ValueError):
    """An edit cannot be prepared (no faces, faces that cannot be squared, bad indices); one-line message."""


@dataclass(frozen=True)
class CropTransform:
    """Photo → canvas: crop ``(left, top, left + crop_w, top + crop_h)`` then resize to ``out_w × out_h``."""

    left: int
    top: int
    crop_w: int
    crop_h: int
    out_w: int
    out_h: int

    @property
    def scale_x(self) -> float:
        """Canvas pixels per photo pixel, horizontally."""
        return self.out_w / self.crop_w

    @property
    def scale_y(self) -> float:
        """Canvas pixels per photo pixel, vertically."""
        return self.out_h / self.crop_h

    def apply(self, image: Image.Image) -> Image.Image:
        """The canvas of ``image`` (the release's crop, then a LANCZOS resize)."""
        crop = image.crop((self.left, self.top, self.left + self.crop_w, self.top + self.crop_h))
        return crop.resize((self.out_w, self.out_h), Image.Resampling.LANCZOS)

    def to_canvas(self, boxes: BoxList) -> list[list[int]]:
        """Photo boxes → canvas boxes (shift, then ``int(v · scale)`` as the release does)."""
        out = []
        for b in boxes:
            x1, y1, x2, y2 = (int(v) for v in b)
            out.append([int((x1 - self.left) * self.scale_x), int((y1 - self.top) * self.scale_y),
                        int((x2 - self.left) * self.scale_x), int((y2 - self.top) * self.scale_y)])
        return out

    def to_photo(self, boxes: BoxList) -> list[list[int]]:
        """Canvas boxes → photo boxes (``int(v / scale + offset)``, the release's ``resize_bbox`` on square photos)."""
        sx, sy = self.crop_w / self.out_w, self.crop_h / self.out_h
        return [[int(b[0] * sx + self.left), int(b[1] * sy + self.top), int(b[2] * sx + self.left),
                 int(b[3] * sy + self.top)] for b in boxes]

    def to_dict(self) -> dict[str, int]:
        """JSON-ready fields."""
        return {"left": self.left, "top": self.top, "crop_w": self.crop_w, "crop_h": self.crop_h,
                "out_w": self.out_w, "out_h": self.out_h}


def _pil(photo: Any) -> Image.Image:
    if isinstance(photo, Image.Image):
        return photo.convert("RGB") if photo.mode != "RGB" else photo
    from ..faces.image import load_image, to_pil

    return to_pil(load_image(photo))


def _name(photo: Any) -> str:
    from ..faces.image import describe_source

    return describe_source(photo)


def square_around_faces(photo: Any, boxes: BoxList, size: int = RELEASE_SIZE,
                        rng: random.Random | None = None, *, name: str | None = None,
                        ) -> tuple[Image.Image, list[list[int]], CropTransform]:
    """The release's ``face_preserving_resize`` for 1..N faces: a square crop (side = the photo's shorter side)
    holding every box, resized to ``size``; returns (canvas, boxes in canvas pixels, transform).

    Boxes are truncated to ints, as in the release; a box reaching past the border is clipped to it (the release
    gives up on negative coordinates). No boxes: a centred crop. Raises :class:`EditError` when the faces span
    more than the shorter side."""
    img = _pil(photo)
    width, height = img.size
    if not isinstance(size, int) or size < 16:
        raise EditError(f"size must be an integer ≥ 16 pixels, got {size!r}")
    ints = [[int(v) for v in b] for b in boxes]
    side = min(width, height)
    if ints:
        min_x1 = max(0, min(b[0] for b in ints))
        min_y1 = max(0, min(b[1] for b in ints))
        max_x2 = min(width, max(b[2] for b in ints))
        max_y2 = min(height, max(b[3] for b in ints))
        span_w, span_h = max_x2 - min_x1, max_y2 - min_y1
        if span_w > side and width > height or span_h > side and width <= height:
            span = span_w if width > height else span_h
            raise EditError(
                f"{name or _name(photo)}: the faces span {span} px {'across' if width > height else 'down'} the photo, more "
                f"than its shorter side ({side} px), so no square crop holds them all; use canvas='photo', "
                f"or keep_unreplaced=True and replace fewer faces")
    else:
        min_x1 = min_y1 = 0
        max_x2, max_y2 = width, height
    if width > height:
        lo, hi, room = max_x2 - side, min_x1, width - side
    else:
        lo, hi, room = max_y2 - side, min_y1, height - side
    if not ints:
        start = room // 2
    elif lo < hi:
        start = rng.randint(int(lo), int(hi)) if rng is not None else (max(int(lo), 0) + min(int(hi), room)) // 2
    else:
        start = int(lo)
    start = max(0, min(start, room))
    left, top = (start, 0) if width > height else (0, start)
    tf = CropTransform(left=left, top=top, crop_w=side, crop_h=side, out_w=size, out_h=size)
    return tf.apply(img), tf.to_canvas(ints), tf


def map_boxes(boxes: BoxList, from_size: tuple[int, int], to_size: tuple[int, int]) -> list[list[int]]:
    """The release's ``resize_bbox``: boxes of a ``from_size`` (w, h) image onto ``to_size``, fitted with the
    smaller scale and centred (``int`` truncation)."""
    (fw, fh), (tw, th) = from_size, to_size
    scale = min(tw / fw, th / fh)
    ox, oy = (tw - fw * scale) / 2, (th - fh * scale) / 2
    return [[int(b[0] * scale + ox), int(b[1] * scale + oy), int(b[2] * scale + ox), int(b[3] * scale + oy)]
            for b in boxes]


def blur_faces(image: Any, boxes: BoxList, radius: float = RELEASE_BLUR_RADIUS,
               min_face: float = RELEASE_BLUR_MIN_FACE, feather: float = 0.0) -> Image.Image:
    """The release's ``blur_faces_in_image``: each box (both sides ≥ ``min_face``) replaced by a Gaussian blur
    (``radius``) of that region of the original; ``feather`` > 0 (our option) blends it in through a mask that
    fades over ``feather`` px inside the box edge instead of a hard paste."""
    img = _pil(image)
    _check_pixels(feather=feather, min_face=min_face)
    valid = [b for b in boxes if b[2] - b[0] >= min_face and b[3] - b[1] >= min_face]
    out = img.copy()
    w, h = img.size
    for b in valid:
        x1, y1, x2, y2 = (int(v) for v in b)
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
        if x2 <= x1 or y2 <= y1:
            continue
        region = img.crop((x1, y1, x2, y2)).filter(ImageFilter.GaussianBlur(radius=radius))
        if feather <= 0:
            out.paste(region, (x1, y1))
            continue
        mask = Image.new("L", region.size, 0)
        inset = int(round(feather / 2))
        ImageDraw.Draw(mask).rectangle((inset, inset, region.size[0] - 1 - inset, region.size[1] - 1 - inset),
                                       fill=255)
        mask = mask.filter(ImageFilter.GaussianBlur(radius=feather / 2))
        out.paste(region, (x1, y1), mask)
    return out


def _check_pixels(**values: float) -> None:
    """Each named value is a finite number of pixels ≥ 0, else :class:`EditError` naming it."""
    for key, v in values.items():
        if not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
            raise EditError(f"{key} must be a finite number of pixels ≥ 0, got {v!r}")


def detect_faces(photo: Any, analyzer: Any, order: str = "left") -> list[Any]:
    """The photo's faces (``Face`` objects) found by the face stack's detector — any ``FaceAnalyzer`` (the offline
    dlib default or an insightface pack) — numbered left to right (``order="left"``) or as the detector returns
    them (``"detector"``)."""
    if order not in FACE_ORDERS:
        raise EditError(f"order must be one of {', '.join(FACE_ORDERS)}, got {order!r}")
    if analyzer is None or not hasattr(analyzer, "detect"):
        raise EditError("detect_faces needs a face analyzer (withanyone.faces.FaceAnalyzer)")
    img = np.asarray(_pil(photo))
    try:
        faces = list(analyzer.detect(img, embed=False))
    except TypeError:  # analyzers without the embed switch
        faces = list(analyzer.detect(img))
    if order == "left":
        faces.sort(key=lambda f: (float(f.bbox[0]), float(f.bbox[1])))
    return faces


def photo_sha256(path_or_image: Any) -> str:
    """SHA-256 of a photo: of the file's bytes for a path, else of ``mode``, size and raw RGB pixels."""
    if isinstance(path_or_image, (str, os.PathLike)):
        p = Path(path_or_image)
        if not p.is_file():
            raise EditError(f"{p}: no such photo")
        return hashlib.sha256(p.read_bytes()).hexdigest()
    if isinstance(path_or_image, (bytes, bytearray, memoryview)):
        return hashlib.sha256(bytes(path_or_image)).hexdigest()
    img = _pil(path_or_image)
    head = f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode()
    return hashlib.sha256(head + img.tobytes()).hexdigest()


def kontext_resolution(width: int, height: int, size: int | None = RELEASE_SIZE) -> tuple[int, int]:
    """diffusers' preferred Kontext resolution nearest the photo's aspect ratio, scaled to about ``size``² pixels
    (``None``: as listed, ~1 MP) and rounded down to multiples of 16."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    if size is not None:
        k = size / math.sqrt(w * h)
        w, h = w * k, h * k
    return max(16, int(w) // 16 * 16), max(16, int(h) // 16 * 16)


@dataclass
class EditPlan:
    """Everything one edit needs: the blurred ``condition`` canvas, where each new identity goes, and why.

    ``boxes`` are the identity boxes in canvas pixels (one per reference, in reference order), ``replaced`` the
    face indices they replace (empty with user boxes), ``face_boxes`` every detected face in canvas pixels,
    ``blurred`` the faces whose regions were blurred, ``transform`` the photo → canvas crop/resize."""

    condition: Image.Image
    canvas: Image.Image
    boxes: list[list[int]]
    replaced: list[int]
    faces: list[Any]
    face_boxes: list[list[int]]
    blurred: list[int]
    transform: CropTransform
    photo_size: tuple[int, int]
    photo_sha256: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """Canvas (= output) size (width, height)."""
        return self.condition.size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for sidecars (no images)."""
        return {
            "photo_sha256": self.photo_sha256, "photo_size": list(self.photo_size), "size": list(self.size),
            "boxes": self.boxes, "replaced": self.replaced, "face_boxes": self.face_boxes,
            "blurred": self.blurred, "transform": self.transform.to_dict(), **self.options,
        }


def _indices(replace: Any, n_faces: int, n_refs: int, name: str) -> list[int]:
    if replace is None:
        if n_refs != n_faces:
            raise EditError(f"{name}: {n_faces} face(s) detected but {n_refs} reference(s) given; pass replace=[face "
                            f"indices] (0..{n_faces - 1}, left to right) with one index per reference, or boxes=")
        return list(range(n_faces))
    if isinstance(replace, int):
        replace = [replace]
    idx = [int(i) for i in replace]
    bad = [i for i in idx if not 0 <= i < n_faces]
    if bad:
        raise EditError(f"{name}: replace={idx} names face(s) {bad}, but only faces 0..{n_faces - 1} were detected")
    if len(set(idx)) != len(idx):
        raise EditError(f"{name}: replace={idx} names a face twice")
    if len(idx) != n_refs:
        raise EditError(f"{name}: replace names {len(idx)} face(s) but {n_refs} reference(s) were given")
    return idx


def prepare_edit(photo: Any, references: Sequence[Any] | int, analyzer: Any = None, replace: Any = None,
                 boxes: BoxList | str | None = None, canvas: str = "square", keep_unreplaced: bool = False,
                 feather: float = 0.0, *, size: int = RELEASE_SIZE, blur_radius: float = RELEASE_BLUR_RADIUS,
                 min_blur_face: float = RELEASE_BLUR_MIN_FACE, rng: random.Random | None = None,
                 order: str = "left", faces: Sequence[Any] | None = None) -> EditPlan:
    """Detect ``photo``'s faces, build the canvas, blur the faces and place the new identities (see module doc).

    ``references`` (or their count) pairs with ``replace`` (face indices, default all faces) or with ``boxes``
    (a list of canvas-pixel boxes overriding the detected ones; ``None``/``"faces"`` = the replaced faces' boxes).
    ``canvas="square"`` (release: square crop around the faces, ``size``²) or ``"photo"`` (the whole photo at
    the nearest Kontext aspect, ~``size``² pixels). ``keep_unreplaced`` leaves faces that are not replaced
    unblurred (release: every face is blurred); ``feather`` softens the blur's edge. ``faces`` skips detection.
    """
    name = _name(photo)
    _check_pixels(feather=feather, min_blur_face=min_blur_face)  # bad values first, before any face work
    if canvas not in CANVASES:
        raise EditError(f"canvas must be one of {', '.join(CANVASES)}, got {canvas!r}")
    if not isinstance(size, int) or size < 16 or size % 16:
        raise EditError(f"size must be a positive multiple of 16 pixels, got {size!r}")
    n_refs = references if isinstance(references, int) else len(references)
    if n_refs < 1:
        raise EditError("an edit needs at least one reference person")
    img = _pil(photo)
    if faces is None:
        faces = detect_faces(img, analyzer, order=order)
    faces = list(faces)
    user_boxes = boxes is not None and not (isinstance(boxes, str) and boxes == "faces")
    if isinstance(boxes, str) and boxes != "faces":
        raise EditError(f"boxes must be None, 'faces' or a list of (x1, y1, x2, y2) canvas boxes, got {boxes!r}")
    if not faces and not user_boxes:
        raise EditError(f"{name}: no faces detected; pass boxes= to say where the new people go")
    if user_boxes and replace is not None:
        raise EditError("pass either replace= (face indices) or boxes= (canvas boxes), not both")
    det = [[float(v) for v in f.bbox] for f in faces]
    replaced = [] if user_boxes else _indices(replace, len(faces), n_refs, name)

    if canvas == "square":
        _, face_boxes, tf = square_around_faces(img, [det[i] for i in replaced] if keep_unreplaced and replaced
                                                else det, size, rng, name=name)
        face_boxes = tf.to_canvas(det)
    else:
        out_w, out_h = kontext_resolution(img.width, img.height, size)
        tf = CropTransform(left=0, top=0, crop_w=img.width, crop_h=img.height, out_w=out_w, out_h=out_h)
        face_boxes = tf.to_canvas(det)

    if user_boxes:
        from .layout import validate_boxes

        try:
            validate_boxes(boxes, n_refs, tf.out_h, tf.out_w)
        except ValueError as exc:
            raise EditError(str(exc).splitlines()[0]) from exc
        id_boxes = [[int(v) for v in b] for b in boxes]
    else:  # clipped to the canvas, as the release's mask clamps its patch indices
        id_boxes = [[max(0, b[0]), max(0, b[1]), min(tf.out_w, b[2]), min(tf.out_h, b[3])]
                    for b in (face_boxes[i] for i in replaced)]

    if keep_unreplaced:
        blurred = list(replaced)
        regions = [face_boxes[i] for i in replaced] + (id_boxes if user_boxes else [])
    else:
        blurred = list(range(len(faces)))
        regions = list(face_boxes) + (id_boxes if user_boxes else [])
    photo_regions = tf.to_photo(regions)  # canvas → photo: the release's resize_bbox on square photos
    # only the faces blur_faces really blurs: both photo-px sides ≥ min_blur_face (the release skips smaller ones)
    blurred = [i for i, (x1, y1, x2, y2) in zip(blurred, photo_regions, strict=False)
               if x2 - x1 >= min_blur_face and y2 - y1 >= min_blur_face]
    condition = tf.apply(blur_faces(img, photo_regions, blur_radius, min_blur_face, feather))
    return EditPlan(
        condition=condition, canvas=tf.apply(img), boxes=id_boxes, replaced=replaced, faces=faces,
        face_boxes=face_boxes, blurred=blurred, transform=tf, photo_size=img.size,
        photo_sha256=photo_sha256(photo if isinstance(photo, (str, os.PathLike, bytes)) else img),
        options={"canvas": canvas, "keep_unreplaced": bool(keep_unreplaced), "feather": float(feather),
                 "blur_radius": float(blur_radius), "min_blur_face": float(min_blur_face), "order": order},
    )
