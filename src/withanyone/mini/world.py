"""The mini world: procedural face-like sprites whose identity is a fixed set of factors per person.

A person (:class:`Person`) is drawn once from a seed: head shape and proportions, skin / hair / eye colours,
hair style, eye spacing and size, nose, mouth width, a marking (spot, stripe or freckles) and its colour.
A photo of that person draws *nuisance* afresh: expression (smile, eye openness), rotation, scale,
lighting (brightness and a directional gradient) and the background. Everything is numpy and
deterministic from integer seeds.

Boxes are squares framing the head (the face model and the detector work on this convention): the
aligned face of a box is the box resized to 112×112 (:func:`box_landmarks` gives the five ArcFace
points that make ``align_face`` do exactly that).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from withanyone.faces.align import ARCFACE_TEMPLATE

__all__ = ["Person", "Photo", "Canvas", "make_people", "render_canvas", "render_portrait", "random_layout",
           "box_landmarks", "CANVAS", "split_ids"]

#: Side of a group canvas in pixels (8×8 FLUX image tokens of 16 px).
CANVAS = 128


def _rng(*seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(s) & 0xFFFFFFFF for s in seed]))


@dataclass(frozen=True)
class Person:
    """One identity's fixed factors (drawn by :func:`make_people`)."""

    pid: int
    aspect: float  # head width / height
    chin: float  # how much the lower half narrows
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_style: int  # 0 bald, 1 cap, 2 cap + sides, 3 fringe, 4 tall
    hair_height: float
    eye_color: tuple[float, float, float]
    eye_dx: float
    eye_y: float
    eye_r: float
    brow: float  # brow thickness (0: none)
    nose: float  # nose length
    mouth_w: float
    mouth_y: float
    mark: int  # 0 none, 1 cheek spot, 2 forehead stripe, 3 freckles, 4 eye patch
    mark_color: tuple[float, float, float]
    mark_side: int  # −1 or +1
    ears: bool

    @property
    def name(self) -> str:
        """The identity's name: ``id0042``."""
        return f"id{self.pid:04d}"


def _color(rng: np.random.Generator, lo: float = 0.1, hi: float = 0.95) -> tuple[float, float, float]:
    return tuple(float(v) for v in rng.uniform(lo, hi, 3))


def make_people(ids: list[int] | range, world_seed: int = 0) -> list[Person]:
    """The people with the given integer ids, each a deterministic function of (world_seed, id)."""
    out = []
    for pid in ids:
        r = _rng(world_seed, 1, pid)
        out.append(Person(
            pid=int(pid), aspect=float(r.uniform(0.68, 1.0)), chin=float(r.uniform(0.0, 0.35)),
            skin=_color(r, 0.25, 0.95), hair=_color(r, 0.0, 0.9), hair_style=int(r.integers(0, 5)),
            hair_height=float(r.uniform(0.15, 0.45)), eye_color=_color(r, 0.0, 0.8),
            eye_dx=float(r.uniform(0.22, 0.42)), eye_y=float(r.uniform(-0.25, 0.0)), eye_r=float(r.uniform(0.08, 0.16)),
            brow=float(r.choice([0.0, 0.03, 0.06])), nose=float(r.uniform(0.08, 0.28)),
            mouth_w=float(r.uniform(0.15, 0.42)), mouth_y=float(r.uniform(0.35, 0.55)), mark=int(r.integers(0, 5)),
            mark_color=_color(r, 0.0, 1.0), mark_side=int(r.choice([-1, 1])), ears=bool(r.integers(0, 2)),
        ))
    return out


def split_ids(num_train: int, num_heldout: int) -> tuple[list[int], list[int]]:
    """Disjoint id ranges: training ids 0… and held-out ids from 100000 on."""
    return list(range(num_train)), list(range(100_000, 100_000 + num_heldout))


@dataclass
class Photo:
    """Per-photo nuisance of one person."""

    smile: float
    eye_open: float
    rotation: float  # radians
    scale: float  # head size inside its box
    brightness: float
    light_dir: float
    light_amount: float
    offset: tuple[float, float]

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Photo:
        """Random nuisance."""
        return cls(smile=float(rng.uniform(-1, 1)), eye_open=float(rng.uniform(0.35, 1.0)),
                   rotation=float(rng.uniform(-0.45, 0.45)), scale=float(rng.uniform(0.85, 1.05)),
                   brightness=float(rng.uniform(0.7, 1.15)), light_dir=float(rng.uniform(0, 2 * np.pi)),
                   light_amount=float(rng.uniform(0.0, 0.35)),
                   offset=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))))


@dataclass
class Canvas:
    """A rendered image (uint8 RGB) and who is where: square boxes (x1, y1, x2, y2) and the people."""

    image: np.ndarray
    boxes: list[tuple[float, float, float, float]]
    people: list[Person]
    photos: list[Photo] = field(default_factory=list)


def _soft(d: np.ndarray, aa: float) -> np.ndarray:
    """Coverage of a shape from a signed distance-like value (inside < 0), anti-aliased over ``aa``."""
    return np.clip(0.5 - d / aa, 0.0, 1.0)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    a, b = np.array(_color(rng, 0.05, 0.95)), np.array(_color(rng, 0.05, 0.95))
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    g = (np.cos(ang) * xx + np.sin(ang) * yy)
    g = (g - g.min()) / max(float(np.ptp(g)), 1e-6)
    img = a[None, None] * (1 - g[..., None]) + b[None, None] * g[..., None]
    return img


def _draw_person(img: np.ndarray, p: Person, ph: Photo, box: tuple[float, float, float, float]) -> None:
    """Paint one person into ``img`` (float RGB, modified in place) inside ``box``."""
    x1, y1, x2, y2 = box
    side = x2 - x1
    cx = (x1 + x2) / 2 + ph.offset[0] * side
    cy = (y1 + y2) / 2 + ph.offset[1] * side + 0.04 * side
    ry = 0.36 * side * ph.scale  # head half-height in pixels
    h, w = img.shape[:2]
    r0, r1 = max(int(y1) - 1, 0), min(int(np.ceil(y2)) + 1, h)
    c0, c1 = max(int(x1) - 1, 0), min(int(np.ceil(x2)) + 1, w)
    if r1 <= r0 or c1 <= c0:
        return
    ss = 2  # supersampling
    yy, xx = np.mgrid[r0:r1:1 / ss, c0:c1:1 / ss] + 0.5 / ss
    ca, sa = np.cos(-ph.rotation), np.sin(-ph.rotation)
    dx, dy = (xx - cx) / ry, (yy - cy) / ry
    u, v = ca * dx - sa * dy, sa * dx + ca * dy  # head frame: v down, head spans v ∈ [−1, 1]
    aa = 1.5 / ry
    region = img[r0:r1, c0:c1]
    up = np.repeat(np.repeat(region, ss, 0), ss, 1)
    layer = up.copy()

    def paint(cov: np.ndarray, color: tuple[float, float, float] | np.ndarray) -> None:
        nonlocal layer
        layer = layer * (1 - cov[..., None]) + np.asarray(color)[None, None] * cov[..., None]

    aw = p.aspect
    # head: an ellipse whose lower half narrows by `chin`
    width = aw * (1 - p.chin * np.clip(v, 0, 1))
    head_d = np.sqrt((u / np.maximum(width, 1e-3)) ** 2 + v ** 2) - 1
    if p.ears:
        for s in (-1, 1):
            paint(_soft(np.sqrt(((u - s * aw * 0.98) / 0.16) ** 2 + ((v + 0.05) / 0.25) ** 2) - 1, aa * 4),
                  np.asarray(p.skin) * 0.85)
    if p.hair_style in (2, 4):  # hair behind the head
        hh = 1 + p.hair_height
        paint(_soft(np.sqrt((u / (aw * 1.12)) ** 2 + ((v + 0.1) / hh) ** 2) - 1, aa) * (v < 0.35), p.hair)
    paint(_soft(head_d, aa), p.skin)
    if p.hair_style in (1, 2, 3, 4):  # cap over the top of the head
        top = -1 + p.hair_height * (1.6 if p.hair_style == 4 else 1.0) + 0.15
        cap = _soft(head_d - 0.06, aa) * _soft(v - top, aa * 2)
        if p.hair_style == 3:  # fringe: a wavy lower edge
            cap = _soft(head_d - 0.06, aa) * _soft(v - top - 0.12 * np.sin(u * 9), aa * 2)
        if p.hair_style == 4:
            cap = np.maximum(cap, _soft(np.sqrt((u / (aw * 0.8)) ** 2 + ((v + 1.0) / (0.35 + p.hair_height)) ** 2) - 1, aa))
        paint(cap, p.hair)
    # markings
    s = p.mark_side
    if p.mark == 1:
        paint(_soft(np.hypot(u - s * 0.45 * aw, v - 0.25) - 0.13, aa), p.mark_color)
    elif p.mark == 2:
        paint(_soft(np.abs(v - (p.eye_y - 0.32)) - 0.05, aa) * _soft(np.abs(u) - 0.5 * aw, aa) * _soft(head_d, aa),
              p.mark_color)
    elif p.mark == 3:
        for fx, fy in ((0.35, 0.2), (0.5, 0.3), (0.42, 0.38), (-0.35, 0.2), (-0.5, 0.3), (-0.42, 0.38)):
            paint(_soft(np.hypot(u - fx * aw, v - fy) - 0.045, aa), p.mark_color)
    elif p.mark == 4:
        paint(_soft(np.hypot(u - s * p.eye_dx, v - p.eye_y) - p.eye_r * 1.9, aa), p.mark_color)
    # eyes: white, iris (the eye colour); openness squashes them vertically
    ey = p.eye_y
    for side_ in (-1, 1):
        ex = side_ * p.eye_dx
        er = p.eye_r
        open_ = max(ph.eye_open, 0.15)
        d_eye = np.sqrt(((u - ex) / er) ** 2 + ((v - ey) / (er * open_)) ** 2) - 1
        paint(_soft(d_eye, aa / er), (0.97, 0.97, 0.97))
        paint(_soft(np.sqrt(((u - ex) / (er * 0.6)) ** 2 + ((v - ey) / (er * 0.6 * open_)) ** 2) - 1, aa / er) *
              _soft(d_eye, aa / er), p.eye_color)
        if p.brow > 0:
            by = ey - er * 1.6 - 0.05
            paint(_soft(np.abs(v - by - 0.15 * (u - ex) ** 2) - p.brow, aa) * _soft(np.abs(u - ex) - er * 1.3, aa),
                  np.asarray(p.hair) * 0.8)
    # nose: a short vertical bar, shaded skin
    nose_top = ey + 0.08
    paint(_soft(np.abs(u) - 0.035, aa) * _soft(np.abs(v - (nose_top + p.nose / 2)) - p.nose / 2, aa),
          np.asarray(p.skin) * 0.65)
    # mouth: an arc v = mouth_y − smile·k·(1 − (u/w)²)
    mw = p.mouth_w
    curve = p.mouth_y - ph.smile * 0.12 * (1 - np.clip(u / mw, -1, 1) ** 2)
    paint(_soft(np.abs(v - curve) - 0.035, aa) * _soft(np.abs(u) - mw, aa), (0.45, 0.08, 0.1))
    # lighting: brightness × (1 + gradient along light_dir), on the whole head region
    head_cov = np.maximum(_soft(head_d - (p.hair_height if p.hair_style in (2, 4) else 0.0), aa), 0)
    shade = ph.brightness * (1 + ph.light_amount * (np.cos(ph.light_dir) * u + np.sin(ph.light_dir) * v))
    lit = layer * shade[..., None]
    layer = layer * (1 - head_cov[..., None]) + lit * head_cov[..., None]
    down = layer.reshape(r1 - r0, ss, c1 - c0, ss, 3).mean(axis=(1, 3))
    img[r0:r1, c0:c1] = down


def render_canvas(people: list[Person], boxes: list[tuple[float, float, float, float]], seed: int,
                  size: int | tuple[int, int] = CANVAS, photos: list[Photo] | None = None) -> Canvas:
    """A canvas with ``people`` in ``boxes``; background and nuisance drawn from ``seed`` (or ``photos``)."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = _rng(seed, 2)
    img = _background(rng, h, w)
    photos = photos if photos is not None else [Photo.draw(rng) for _ in people]
    for p, ph, b in zip(people, photos, boxes, strict=True):
        _draw_person(img, p, ph, b)
    return Canvas((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), list(boxes), list(people), photos)


def render_portrait(person: Person, seed: int, size: int = 64) -> Canvas:
    """A single-person photo (the person's head filling most of a ``size``² canvas): a reference photo."""
    rng = _rng(seed, 3)
    side = float(rng.uniform(0.62, 0.78) * size)
    x1 = float(rng.uniform(0, size - side))
    y1 = float(rng.uniform(0, size - side))
    return render_canvas([person], [(x1, y1, x1 + side, y1 + side)], seed, size)


def random_layout(n: int, rng: np.random.Generator, size: int = CANVAS, min_side: float = 34,
                  max_side: float = 52) -> list[tuple[float, float, float, float]]:
    """``n`` non-overlapping square boxes on a ``size``² canvas (rejection sampling), left to right."""
    for _ in range(200):
        boxes = []
        for _ in range(n):
            side = float(rng.uniform(min_side, max_side if n == 1 else min(max_side, (size - 4) / n + 8)))
            x1, y1 = float(rng.uniform(0, size - side)), float(rng.uniform(0, size - side))
            boxes.append((x1, y1, x1 + side, y1 + side))
        ok = all(a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
                 for i, a in enumerate(boxes) for b in boxes[i + 1:])
        if ok:
            return sorted(boxes)
    side = (size - 2) / n
    return [(i * side + 1, (size - side) / 2, (i + 1) * side, (size + side) / 2) for i in range(n)]


def box_landmarks(box: tuple[float, float, float, float] | np.ndarray) -> np.ndarray:
    """The five ArcFace points of a square box: ``align_face`` with them maps the box onto the 112² frame."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (np.array([x1, y1]) + ARCFACE_TEMPLATE.astype(np.float64) / 112.0 * np.array([x2 - x1, y2 - y1])
            ).astype(np.float32)
