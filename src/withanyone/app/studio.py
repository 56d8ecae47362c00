"""The app's state and actions, free of Gradio: analyse uploads, resolve placements, run one generation with
per-step progress and cancel, write image + sidecar. ``ui.py`` wires these to widgets."""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..pipeline.layout import Box, auto_boxes, validate_boxes
from .models import LoadedModels
from .people import (
    MAX_PEOPLE,
    TRAINED_PEOPLE,
    LayoutAssignment,
    PhotoAnalysis,
    analyse_photo,
    assign_layout,
    merge_identity,
)

#: Output size presets (aspect → width, height); FLUX-dev sizes, and tiny ones for ``--tiny`` on a CPU.
SIZES = {"1:1": (1024, 1024), "16:9": (1344, 768), "9:16": (768, 1344), "4:3": (1152, 896), "3:4": (896, 1152),
         "3:2": (1216, 832)}
TINY_SIZES = {"1:1": (128, 128), "16:9": (224, 128), "9:16": (128, 224), "4:3": (160, 128), "3:4": (128, 160),
              "3:2": (192, 128)}
COLORS = [(230, 57, 70), (29, 161, 242), (46, 196, 182), (255, 183, 3), (155, 93, 229), (241, 91, 181),
          (0, 187, 249), (254, 228, 64)]


class Cancelled(Exception):
    """Raised inside the denoising loop when the user pressed Cancel."""


@dataclass
class Person:
    """One person of a generation request: a display name and the uploaded photo paths."""

    name: str
    photos: list[str] = field(default_factory=list)


@dataclass
class Placement:
    """How faces are placed: ``mode`` is ``auto``, ``drawn`` (``boxes`` from the canvas, labelled) or
    ``layout`` (``layout`` photo path)."""

    mode: str = "auto"
    boxes: list[dict[str, Any]] = field(default_factory=list)
    layout: str | None = None


class Studio:
    """Everything the app does, callable from tests without a browser."""

    def __init__(self, models: LoadedModels, out_dir: str | Path):
        self.models = models
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._analysis: dict[str, PhotoAnalysis] = {}
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._face_lock = threading.RLock()
        self._lora: str | None = None

    # ------------------------------------------------------------------ references
    @property
    def analyzer(self) -> Any:
        """The pipeline's face analyzer (created on first use)."""
        return self.models.pipe.face_analyzer()

    def analyse(self, path: str) -> PhotoAnalysis:
        """Analyse one uploaded photo (cached by content)."""
        p = Path(path)
        try:
            key = hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError:
            key = str(p)
        with self._face_lock:  # uploads and generations may analyse from two threads; one detector at a time
            hit = self._analysis.get(key)
            if hit is None:
                hit = self._analysis[key] = analyse_photo(p, self.analyzer, name=p.name)
        return hit

    def analyse_person(self, paths: Sequence[str]) -> tuple[list[PhotoAnalysis], list[str]]:
        """Analyses and warnings for one person's photos (a warning too when none is usable)."""
        results = [self.analyse(p) for p in paths]
        warnings = [w for r in results for w in r.warnings]
        if results and not any(r.ok for r in results):
            warnings.append("no usable photo for this person yet")
        return results, warnings

    def references(self, people: Sequence[Person], need_crop: bool) -> tuple[list[Any], list[str]]:
        """One :class:`Reference` per person; errors (a person without a usable photo) as messages."""
        if not 1 <= len(people) <= MAX_PEOPLE:
            return [], [f"choose between 1 and {MAX_PEOPLE} people"]
        refs, errors = [], []
        for person in people:
            analyses, _ = self.analyse_person(person.photos)
            ref = merge_identity(analyses, need_crop=need_crop)
            if ref is None:
                errors.append(f"{person.name}: no photo with a detectable face — upload one")
            refs.append(ref)
        return refs, errors

    def photo_use(self, people: Sequence[Person]) -> tuple[list[list[str]], list[list[dict[str, str]]]]:
        """Per person: the photos that give the identity, and the ignored ones with why (empty, corrupt,
        faceless — the warning the app showed)."""
        used: list[list[str]] = []
        ignored: list[list[dict[str, str]]] = []
        for person in people:
            analyses = [self.analyse(p) for p in person.photos]
            used.append([p for p, a in zip(person.photos, analyses, strict=True) if a.ok])
            ignored.append([{"photo": p, "why": a.warnings[0] if a.warnings else "no usable face"}
                            for p, a in zip(person.photos, analyses, strict=True) if not a.ok])
        return used, ignored

    # ------------------------------------------------------------------ placement
    def assign(self, layout: str, people: Sequence[Person], height: int, width: int) -> LayoutAssignment:
        """Boxes for ``people`` from a layout photo, matched by identity when possible."""
        refs = [merge_identity(self.analyse_person(p.photos)[0]) for p in people]
        with self._face_lock:
            return assign_layout(layout, refs, height, width, self.analyzer)

    def resolve_boxes(self, placement: Placement, people: Sequence[Person], height: int,
                      width: int) -> tuple[list[Box], str]:
        """The boxes for this request (reference order) and the sidecar's ``box_mode``."""
        n = len(people)
        if placement.mode == "auto":
            return auto_boxes(n, height, width), "auto"
        if placement.mode == "layout":
            if not placement.layout:
                raise ValueError("placement 'layout photo' chosen but no layout photo uploaded")
            return self.assign(placement.layout, people, height, width).boxes, "layout"
        if placement.mode == "drawn":
            return boxes_by_name(placement.boxes, [p.name for p in people], height, width), "explicit"
        raise ValueError(f"unknown placement {placement.mode!r}")

    # ------------------------------------------------------------------ generation
    def cancel(self) -> None:
        """Stop the running generation after its current step."""
        self._cancel.set()

    def _set_lora(self, lora: str | None, scale: float) -> None:
        pipe = self.models.pipe
        if lora != self._lora:
            if self._lora is not None:
                pipe.unload_lora_weights()
            if lora:
                pipe.load_lora_weights(lora, adapter_name="studio")
            self._lora = lora or None
        if self._lora:
            pipe.set_adapters(["studio"], [scale])

    def generate(self, prompt: str, people: Sequence[Person], placement: Placement, *, height: int, width: int,
                 steps: int, guidance: float, seed: int | None, siglip_weight: float, lora: str | None = None,
                 lora_scale: float = 1.0, **pipeline_kwargs: Any) -> Iterator[dict[str, Any]]:
        """Run one generation; yields ``{"step", "total"}`` after each step, then ``{"done": True, "image",
        "boxes", "seed", "image_path", "sidecar_path", "sidecar", "seconds"}``. Extra keyword arguments go to
        the pipeline unchanged. Raises ``ValueError`` for bad requests and :class:`Cancelled`."""
        if not self.models.ready:
            raise ValueError(self.models.error or "no model loaded")
        if not prompt.strip():
            raise ValueError("write a prompt first")
        siglip_weight = float(siglip_weight)
        id_weight = 1.0 - siglip_weight
        refs, errors = self.references(people, need_crop=siglip_weight > 0)
        if errors:
            raise ValueError("; ".join(errors))
        boxes, box_mode = self.resolve_boxes(placement, people, height, width)
        if seed is None:
            seed = int(np.random.default_rng().integers(0, 2**31 - 1))
        self._cancel.clear()
        steps_q: queue.Queue = queue.Queue()
        box: dict[str, Any] = {}

        def on_step(i: int, n: int) -> None:
            steps_q.put((i, n))
            if self._cancel.is_set():
                raise Cancelled()

        def work() -> None:
            try:
                with self._lock:
                    self._set_lora(lora, lora_scale)
                    box["result"] = self.models.pipe(
                        prompt, references=refs, boxes=boxes, id_weight=id_weight, siglip_weight=siglip_weight,
                        height=int(height), width=int(width), num_inference_steps=int(steps),
                        guidance_scale=float(guidance), seed=int(seed), step_callback=on_step, **pipeline_kwargs)
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc
            finally:
                steps_q.put(None)

        t0 = time.perf_counter()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while True:
            item = steps_q.get()
            if item is None:
                break
            yield {"step": item[0], "total": item[1]}
        thread.join()
        if "error" in box:
            raise box["error"]
        result = box["result"]
        seconds = time.perf_counter() - t0
        image = result.images[0]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = self.out_dir / f"withanyone-{stamp}-{seed}.png"
        from ..pipeline.sidecar import build_sidecar, write_image_and_sidecar

        used, ignored = self.photo_use(people)
        sidecar = build_sidecar(
            self.models.pipe, result, prompt=prompt, references=used,
            box_mode=box_mode, layout=placement.layout if box_mode == "layout" else None, id_weight=id_weight,
            siglip_weight=siglip_weight, height=int(height), width=int(width), steps=int(steps),
            guidance=float(guidance), lora=[lora] if lora else [], lora_scale=lora_scale, dtype=self.models.dtype,
            device=self.models.device, offload=self.models.preset, output=str(out),
            names=[p.name for p in people], ignored_photos=ignored,
            pipeline_kwargs={k: _jsonable(v) for k, v in pipeline_kwargs.items()}, app="withanyone app")
        sidecar_path = write_image_and_sidecar(out, image, sidecar)
        yield {"done": True, "image": image, "boxes": list(result.boxes), "seed": result.seed,
               "image_path": str(out), "sidecar_path": str(sidecar_path), "sidecar": sidecar, "seconds": seconds,
               "steps": int(steps)}


def boxes_by_name(drawn: Sequence[dict[str, Any]], names: Sequence[str], height: int, width: int) -> list[Box]:
    """Canvas boxes (``xmin/ymin/xmax/ymax`` + ``label``) → one box per person: a box labelled with a person's
    name goes to that person; unlabelled ones fill the remaining people in left-to-right order."""
    if len(drawn) != len(names):
        raise ValueError(f"{len(drawn)} box(es) drawn for {len(names)} people: draw exactly one box per person")
    out: list[Box | None] = [None] * len(names)
    rest = []
    for b in drawn:
        xyxy = (float(b["xmin"]), float(b["ymin"]), float(b["xmax"]), float(b["ymax"]))
        label = str(b.get("label") or "").strip()
        if label in names and out[names.index(label)] is None:
            out[names.index(label)] = xyxy
        else:
            rest.append(xyxy)
    rest.sort(key=lambda r: r[0] + r[2])
    for i in range(len(out)):
        if out[i] is None:
            out[i] = rest.pop(0)
    return validate_boxes(out, len(names), height, width, name="drawn boxes")


def draw_boxes(image: Image.Image | np.ndarray, boxes: Sequence[Box], labels: Sequence[str] | None = None,
               width: int = 3) -> Image.Image:
    """A copy of ``image`` with labelled, coloured face boxes."""
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image.copy()
    im = im.convert("RGB")
    d = ImageDraw.Draw(im)
    for i, b in enumerate(boxes):
        color = COLORS[i % len(COLORS)]
        d.rectangle([float(v) for v in b], outline=color, width=width)
        if labels is not None and i < len(labels):
            d.text((float(b[0]) + 3, float(b[1]) + 2), str(labels[i]), fill=color)
    return im


def canvas(height: int, width: int, boxes: Sequence[Box] = (), labels: Sequence[str] | None = None) -> Image.Image:
    """A light grey canvas of the output size, with face boxes drawn."""
    im = Image.new("RGB", (int(width), int(height)), (236, 238, 241))
    return draw_boxes(im, boxes, labels, width=max(2, int(min(height, width)) // 200)) if boxes else im


def people_note(n: int) -> str:
    """A warning when more people are asked for than the release was trained on."""
    if n > TRAINED_PEOPLE:
        return (f"⚠ {n} people: the released model was trained on 1–{TRAINED_PEOPLE}; beyond that identities "
                "may blend or be lost.")
    return ""


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        return repr(v)
