"""The ComfyUI nodes of the WithAnyone pack (classic node API: INPUT_TYPES / RETURN_TYPES / FUNCTION).

Core types wherever one fits (``MODEL``, ``IMAGE``, ``STRING``, ``BBOX``); the pack's own sockets are the
adapter, the face analyzer, SigLIP, a person and the face boxes (names in :mod:`withanyone.comfy.types`).
ComfyUI modules (``folder_paths``, ``comfy.*``) are imported inside the functions, so this module — and the
node classes' ``INPUT_TYPES`` — load without ComfyUI (lists of model files are then empty).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..pipeline.layout import auto_boxes
from ..pipeline.sampling import release_mu
from .patch import AdapterModule, apply_withanyone
from .types import ADAPTER, BOXES, FACE_ANALYZER, PERSON, SIGLIP, FaceBoxes, Person, boxes_from_bbox, parse_boxes_text

logger = logging.getLogger("withanyone.comfy")

CATEGORY = "WithAnyone"
#: Model folders under ComfyUI's ``models/``: the released adapter, insightface packs, SigLIP (HF folders).
ADAPTER_FOLDER = "withanyone"
INSIGHTFACE_FOLDER = "insightface"
SIGLIP_FOLDER = "clip_vision"
WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2")
MAX_PEOPLE = 4
MAX_RESOLUTION = 16384


def _folder_paths() -> Any:
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def register_folders() -> None:
    """Add ``models/withanyone`` and ``models/insightface`` to ComfyUI's model folders (idempotent)."""
    fp = _folder_paths()
    if fp is None:
        return
    for name in (ADAPTER_FOLDER, INSIGHTFACE_FOLDER):
        path = os.path.join(fp.models_dir, name)
        if name not in fp.folder_names_and_paths or path not in fp.folder_names_and_paths[name][0]:
            fp.add_model_folder_path(name, path)
        if name == ADAPTER_FOLDER:
            paths, exts = fp.folder_names_and_paths[name]
            if not exts:
                fp.folder_names_and_paths[name] = (paths, {".safetensors"})


def adapter_files() -> list[str]:
    """``*.safetensors`` files under ``models/withanyone`` (empty without ComfyUI)."""
    fp = _folder_paths()
    if fp is None:
        return []
    register_folders()
    return [f for f in fp.get_filename_list(ADAPTER_FOLDER) if f.endswith(".safetensors")]


def _subfolders(folder: str, marker: str) -> list[str]:
    fp = _folder_paths()
    if fp is None:
        return []
    register_folders()
    found: list[str] = []
    for root in fp.get_folder_paths(folder):
        base = Path(root)
        for sub in (base, base / "models"):
            if sub.is_dir():
                for d in sorted(sub.iterdir()):
                    if d.is_dir() and any(d.glob(marker)):
                        found.append(str(d.relative_to(base)))
    return sorted(set(found))


def insightface_packs() -> list[str]:
    """insightface pack folders (holding ``*.onnx``) under ``models/insightface`` (and its ``models/``)."""
    return _subfolders(INSIGHTFACE_FOLDER, "*.onnx")


def siglip_folders() -> list[str]:
    """Hugging Face SigLIP folders (holding ``config.json``) under ``models/clip_vision``."""
    return _subfolders(SIGLIP_FOLDER, "config.json")


def _resolve_folder(folder: str, name: str) -> str:
    fp = _folder_paths()
    roots = fp.get_folder_paths(folder) if fp is not None else []
    for root in roots:
        path = Path(root) / name
        if path.is_dir():
            return str(path)
    raise FileNotFoundError(f"{name}: no such folder under models/{folder} ({', '.join(roots) or 'no paths'})")


def _dtype(name: str) -> torch.dtype | None:
    return {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
            "fp8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
            "fp8_e5m2": getattr(torch, "float8_e5m2", None)}[name]


def use_comfy_ops(adapter: torch.nn.Module, manual_cast: bool) -> int:
    """Turn the adapter's ``Linear``/``LayerNorm`` into ComfyUI's cast-capable ops (same weights, same maths
    when not casting), so low-VRAM partial loading and fp8 storage work; returns how many were converted."""
    try:
        import comfy.ops
    except ImportError:
        return 0
    ops = comfy.ops.manual_cast if manual_cast else comfy.ops.disable_weight_init
    n = 0
    for m in adapter.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = ops.Linear
            n += 1
        elif type(m) is torch.nn.LayerNorm:
            m.__class__ = ops.LayerNorm
            n += 1
    return n


def image_batch_to_arrays(image: torch.Tensor) -> list[np.ndarray]:
    """ComfyUI ``IMAGE`` [B, H, W, C] floats in 0..1 → RGB ``uint8`` arrays (rounded: a loaded PNG round-trips)."""
    t = image.detach().cpu().float()
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[-1] not in (1, 3, 4):
        raise ValueError(f"IMAGE must be [B, H, W, C] with C in 1/3/4, got shape {tuple(image.shape)}")
    arr = np.round(np.clip(t.numpy(), 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return [a[..., :3] for a in arr]


def arrays_to_image(arrays: list[np.ndarray]) -> torch.Tensor:
    """RGB ``uint8`` arrays of one size → ComfyUI ``IMAGE`` [B, H, W, 3]."""
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)


# ---------------------------------------------------------------------- loaders
class SiglipEncoder:
    """SigLIP's vision tower + processor (``WITHANYONE_SIGLIP``): face crops → last hidden states [T, D]."""

    def __init__(self, model: Any, processor: Any):
        self.model, self.processor = model, processor

    def encode(self, crop: np.ndarray) -> torch.Tensor:
        """One 512×512 face crop → its SigLIP features ``[T, D]`` (float32, CPU), on ComfyUI's device."""
        from ..pipeline.references import encode_siglip

        device = _torch_device()
        home = next(self.model.parameters()).device
        self.model.to(device)
        try:
            return encode_siglip([crop], self.model, self.processor)[0].float().cpu()
        finally:
            self.model.to(home)


def _torch_device() -> torch.device:
    try:
        import comfy.model_management as mm

        return mm.get_torch_device()
    except ImportError:
        return torch.device("cpu")


class WithAnyoneLoader:
    """Load WithAnyone: the released ``withanyone.safetensors`` → the adapter under ComfyUI's model management."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "adapter_name": (adapter_files(), {"tooltip": "models/withanyone/*.safetensors (WithAnyone/WithAnyone)"}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": "storage dtype; fp8 is cast "
                             "to the model's compute dtype per call"}),
        }, "optional": {
            "double_blocks": ("INT", {"default": 0, "min": 0, "max": 256, "advanced": True, "tooltip": "blocks of "
                              "the file that follow double-stream blocks; 0: auto (19 for FLUX.1's 57)"}),
        }}

    RETURN_TYPES = (ADAPTER,)
    RETURN_NAMES = ("withanyone",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the WithAnyone identity adapter; ComfyUI loads and offloads it with the FLUX model."

    def load(self, adapter_name: str, weight_dtype: str = "default", double_blocks: int = 0) -> tuple[Any]:
        fp = _folder_paths()
        path = fp.get_full_path_or_raise(ADAPTER_FOLDER, adapter_name) if fp is not None else adapter_name
        return (load_adapter(path, weight_dtype, double_blocks or None),)


def load_adapter(path: str | os.PathLike, weight_dtype: str = "default", num_double_blocks: int | None = None) -> Any:
    """The adapter at ``path`` in ``weight_dtype``, wrapped in a ComfyUI ``ModelPatcher`` when ComfyUI is
    importable (else the :class:`AdapterModule`); ``num_double_blocks`` for files not of FLUX.1's 19 + 38."""
    from ..model import WithAnyoneAdapter

    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    dtype = _dtype(weight_dtype)
    adapter = WithAnyoneAdapter.from_authors_checkpoint(str(path), torch_dtype=dtype, local_files_only=True,
                                                        num_double_blocks=num_double_blocks)
    adapter.eval().requires_grad_(False)
    fp8 = dtype is not None and dtype.itemsize == 1
    use_comfy_ops(adapter, manual_cast=fp8)
    module = AdapterModule(adapter)
    try:
        import comfy.model_management as mm
        import comfy.model_patcher
    except ImportError:
        return module
    offload = mm.unet_offload_device()
    module.to(offload)
    module.device = offload
    return comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(), offload_device=offload)


class WithAnyoneFaceAnalyzerLoader:
    """Face Analyzer Loader: insightface packs from ``models/insightface`` (ArcFace, what the adapter needs), or
    dlib (offline; boxes from layout photos only — its 128-d vectors are not ArcFace)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        packs = insightface_packs()
        return {"required": {
            "backend": (["insightface", "dlib"], {"default": "insightface"}),
            "pack": (packs or ["antelopev2"], {"tooltip": "insightface pack folder under models/insightface "
                     "(antelopev2: the release's)"}),
            "det_thresh": ("FLOAT", {"default": 0.4, "min": 0.05, "max": 0.95, "step": 0.01,
                                     "tooltip": "detection threshold (0.4: the release's reference extractor)"}),
        }}

    RETURN_TYPES = (FACE_ANALYZER,)
    RETURN_NAMES = ("face_analyzer",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, backend: str, pack: str = "antelopev2", det_thresh: float = 0.4) -> tuple[Any]:
        from ..faces import FaceAnalyzer

        if backend == "dlib":
            return (FaceAnalyzer("dlib"),)
        try:
            folder = _resolve_folder(INSIGHTFACE_FOLDER, pack)
        except FileNotFoundError:
            folder = pack  # a pack name / path the backend resolves itself (e.g. ~/.insightface/models)
        return (FaceAnalyzer("insightface", pack=folder, det_thresh=float(det_thresh)),)


class WithAnyoneSiglipLoader:
    """Load WithAnyone SigLIP: ``google/siglip-base-patch16-256-i18n`` as a Hugging Face folder under
    ``models/clip_vision`` (ComfyUI's CLIP Vision loader has no config for this SigLIP size)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "siglip_folder": (siglip_folders(), {"tooltip": "models/clip_vision/<folder> with config.json, "
                              "preprocessor_config.json and model.safetensors"}),
        }}

    RETURN_TYPES = (SIGLIP,)
    RETURN_NAMES = ("siglip",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, siglip_folder: str) -> tuple[Any]:
        from ..pipeline.loading import load_siglip

        folder = _resolve_folder(SIGLIP_FOLDER, siglip_folder)
        model, processor = load_siglip(folder, local_files_only=True)
        return (SiglipEncoder(model.eval().requires_grad_(False), processor),)


# ---------------------------------------------------------------------- people
def person_from_images(images: list[np.ndarray], analyzer: Any, reference_face: str = "score",
                       siglip: SiglipEncoder | None = None) -> Person:
    """One person from one or several photos, as the pipeline (one photo) and the app (several) build it."""
    from ..app.people import analyse_photo, best_photo, merge_identity
    from ..errors import FaceCountError
    from ..pipeline.references import check_analyzer, face_arcface, raw_box, square_crop

    check_analyzer(analyzer)
    photos = [analyse_photo(img, analyzer, name=f"photo {i + 1}", reference_face=reference_face)
              for i, img in enumerate(images)]
    warnings = [w for p in photos for w in p.warnings]
    good = [p for p in photos if p.ok]
    if not good:
        raise FaceCountError("WithAnyone Person: no usable face in the " + (f"{len(photos)} photos" if len(photos) > 1
                             else "photo") + (": " + "; ".join(warnings) if warnings else ""))
    if len(good) == 1:  # exactly the pipeline's reference: raw ArcFace vector, square crop of the raw box
        p = good[0]
        vec = face_arcface(p.face)
        crop = square_crop(p.image, raw_box(p.face))
    else:
        ref = merge_identity(good, need_crop=True)
        vec, crop = ref.arcface, ref.crop
        best = best_photo(good)
        warnings.append(f"{len(good)} photos merged; SigLIP crop from {best.name} (the most frontal)")
    person = Person(vec, crop, source=" + ".join(p.name for p in good), warnings=warnings)
    if siglip is not None:
        person.siglip = siglip.encode(crop)
    return person


class WithAnyonePerson:
    """WithAnyone Person: an IMAGE of one or several photos of one person → a PERSON (ArcFace at the raw norm,
    SigLIP crop chosen as the pipeline chooses, SigLIP features when a SigLIP loader is connected)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "one photo, or a batch of photos of the same person"}),
            "face_analyzer": (FACE_ANALYZER,),
            "reference_face": (["score", "largest"], {"default": "score", "tooltip": "face used when a photo "
                               "holds several: the detector's best score (the release's) or the largest"}),
        }, "optional": {"siglip": (SIGLIP,)}}

    RETURN_TYPES = (PERSON, "IMAGE", "STRING")
    RETURN_NAMES = ("person", "face_crop", "report")
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, image: torch.Tensor, face_analyzer: Any, reference_face: str = "score",
              siglip: SiglipEncoder | None = None) -> dict:
        person = person_from_images(image_batch_to_arrays(image), face_analyzer, reference_face, siglip)
        norm = float(np.linalg.norm(person.arcface))
        lines = [f"{person.source}: ArcFace norm {norm:.2f}" + (", SigLIP features" if person.siglip is not None
                                                               else ", no SigLIP (siglip_weight must stay 0)")]
        lines += [f"warning: {w}" for w in person.warnings]
        for w in person.warnings:
            logger.warning("WithAnyone Person: %s", w)
        report = "\n".join(lines)
        return {"ui": {"text": [report]}, "result": (person, arrays_to_image([person.crop]), report)}


# ---------------------------------------------------------------------- boxes
def draw_boxes(boxes: FaceBoxes, background: np.ndarray | None = None) -> np.ndarray:
    """The boxes drawn (numbered in the people's order) over ``background`` or a dark canvas."""
    from PIL import Image, ImageDraw

    if background is None:
        canvas = Image.new("RGB", (boxes.width, boxes.height), (40, 40, 40))
    else:
        canvas = Image.fromarray(background).convert("RGB").resize((boxes.width, boxes.height))
    draw = ImageDraw.Draw(canvas)
    colours = [(230, 80, 80), (80, 160, 230), (90, 200, 110), (230, 190, 60)]
    for i, (x1, y1, x2, y2) in enumerate(boxes.boxes):
        c = colours[i % len(colours)]
        draw.rectangle([x1, y1, x2, y2], outline=c, width=max(2, boxes.width // 256))
        draw.text((x1 + 4, y1 + 2), str(i + 1), fill=c)
    return np.asarray(canvas)


def make_boxes(people: int, width: int, height: int, boxes_text: str = "", bbox: Any = None,
               layout_image: np.ndarray | None = None, face_analyzer: Any = None,
               persons: list[Person] | None = None) -> FaceBoxes:
    """Boxes for ``people`` in ``width × height``: ``bbox`` (core BBOX) or typed text when given, else the faces
    of a layout image (assigned by identity when ``persons`` are given, as the app does), else the presets."""
    if bbox is not None:
        boxes = boxes_from_bbox(bbox)
        method = "bbox"
    elif boxes_text and boxes_text.strip():
        boxes = parse_boxes_text(boxes_text)
        method = "typed"
    elif layout_image is not None:
        if face_analyzer is None:
            raise ValueError("WithAnyone Boxes: a layout image needs a face_analyzer to find its faces")
        from ..app.people import assign_layout
        from ..pipeline.references import Reference

        refs = [Reference(p.arcface) for p in persons] if persons and len(persons) == people else [None] * people
        if any(r is not None and r.arcface.size != face_analyzer.embedding_dim for r in refs):
            refs = [None] * people  # a different embedding space (e.g. dlib layout, ArcFace people): by position
        got = assign_layout(layout_image, refs, height, width, face_analyzer)
        boxes, method = got.boxes, f"layout ({got.method})"
    else:
        boxes, method = auto_boxes(people, height, width), "preset"
    if len(boxes) != people:
        raise ValueError(f"WithAnyone Boxes: {len(boxes)} box(es) for {people} people; give one box per person")
    return FaceBoxes(boxes, width, height, method)


class WithAnyoneBoxes:
    """WithAnyone Boxes: one face box per person — presets by people count and aspect, typed boxes, core BBOX
    input, or the faces of a layout IMAGE (assigned to the connected people by identity, as the app does)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        size = {"min": 16, "max": MAX_RESOLUTION, "step": 16}
        optional = {
            "boxes_text": ("STRING", {"multiline": True, "default": "", "tooltip": "x1,y1,x2,y2 per person in "
                           "pixels of width×height, separated by ';' or new lines (overrides the presets)"}),
            "layout_image": ("IMAGE", {"tooltip": "a photo whose faces give the boxes"}),
            "face_analyzer": (FACE_ANALYZER,),
            "bbox": ("BBOX", {"tooltip": "boxes from another node: x, y, width, height dicts or x1,y1,x2,y2"}),
        }
        for i in range(1, MAX_PEOPLE + 1):
            optional[f"person_{i}"] = (PERSON, {"tooltip": "to assign layout faces by identity"})
        return {"required": {
            "people": ("INT", {"default": 2, "min": 1, "max": MAX_PEOPLE}),
            "width": ("INT", {"default": 1024, **size}),
            "height": ("INT", {"default": 1024, **size}),
        }, "optional": optional}

    RETURN_TYPES = (BOXES, "IMAGE")
    RETURN_NAMES = ("boxes", "preview")
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, people: int, width: int, height: int, boxes_text: str = "", layout_image: Any = None,
              face_analyzer: Any = None, bbox: Any = None, **persons: Any) -> tuple[Any, ...]:
        layout = image_batch_to_arrays(layout_image)[0] if layout_image is not None else None
        given = [persons[f"person_{i}"] for i in range(1, MAX_PEOPLE + 1) if persons.get(f"person_{i}") is not None]
        boxes = make_boxes(people, width, height, boxes_text, bbox, layout, face_analyzer, given)
        return boxes, arrays_to_image([draw_boxes(boxes, layout)])


# ---------------------------------------------------------------------- apply + sampling
class ApplyWithAnyone:
    """Apply WithAnyone: MODEL + adapter + people + boxes → a patched MODEL (a clone; the input is unchanged)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        optional = {f"person_{i}": (PERSON,) for i in range(2, MAX_PEOPLE + 1)}
        return {"required": {
            "model": ("MODEL",),
            "withanyone": (ADAPTER,),
            "boxes": (BOXES,),
            "person_1": (PERSON,),
            "id_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.01,
                                    "tooltip": "ArcFace branch (the demo's slider: 1 − siglip_weight)"}),
            "siglip_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 5.0, "step": 0.01,
                                        "tooltip": "SigLIP branch: keeps hair, make-up, expression"}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        }, "optional": optional}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model: Any, withanyone: Any, boxes: FaceBoxes, person_1: Person, id_weight: float = 1.0,
              siglip_weight: float = 0.0, start_percent: float = 0.0, end_percent: float = 1.0,
              **more: Any) -> tuple[Any]:
        people = [person_1] + [more[f"person_{i}"] for i in range(2, MAX_PEOPLE + 1)
                               if more.get(f"person_{i}") is not None]
        return (apply_withanyone(model, withanyone, people, boxes, id_weight, siglip_weight, start_percent,
                                 end_percent),)


def flux_shift(width: int, height: int, mode: str = "release") -> float:
    """ComfyUI ``ModelSamplingFlux`` shift (FLUX's μ) for ``mode``: the release's token count or FLUX's."""
    if mode == "release":
        return release_mu(height, width)
    if mode == "flux":  # core ModelSamplingFlux's defaults: (W·H/256) tokens on (256, 0.5) → (4096, 1.15)
        return 0.5 + (1.15 - 0.5) / (4096 - 256) * (width * height / 256 - 256)
    raise ValueError(f"mode must be 'release' or 'flux', got {mode!r}")


class WithAnyoneSamplingShift:
    """WithAnyone Sampling Shift: FLUX's time shift as the release's inference computes it (μ ≈ 0.4675 at 1024²,
    core ModelSamplingFlux gives 1.15 there), on a clone of the model."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        size = {"min": 16, "max": MAX_RESOLUTION, "step": 16}
        return {"required": {
            "model": ("MODEL",),
            "width": ("INT", {"default": 1024, **size}),
            "height": ("INT", {"default": 1024, **size}),
            "mode": (["release", "flux"], {"default": "release"}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model: Any, width: int, height: int, mode: str = "release") -> tuple[Any]:
        import comfy.model_sampling

        m = model.clone()

        class ModelSamplingAdvanced(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
            pass

        sampling = ModelSamplingAdvanced(model.model.model_config)
        sampling.set_parameters(shift=flux_shift(width, height, mode))
        m.add_object_patch("model_sampling", sampling)
        return (m,)


NODE_CLASS_MAPPINGS = {
    "WithAnyoneLoader": WithAnyoneLoader,
    "WithAnyoneFaceAnalyzerLoader": WithAnyoneFaceAnalyzerLoader,
    "WithAnyoneSiglipLoader": WithAnyoneSiglipLoader,
    "WithAnyonePerson": WithAnyonePerson,
    "WithAnyoneBoxes": WithAnyoneBoxes,
    "ApplyWithAnyone": ApplyWithAnyone,
    "WithAnyoneSamplingShift": WithAnyoneSamplingShift,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "WithAnyoneLoader": "Load WithAnyone",
    "WithAnyoneFaceAnalyzerLoader": "Face Analyzer Loader (WithAnyone)",
    "WithAnyoneSiglipLoader": "Load WithAnyone SigLIP",
    "WithAnyonePerson": "WithAnyone Person",
    "WithAnyoneBoxes": "WithAnyone Boxes",
    "ApplyWithAnyone": "Apply WithAnyone",
    "WithAnyoneSamplingShift": "WithAnyone Sampling Shift (release)",
}
