"""Reference people → what the adapter consumes: a 512-d ArcFace vector and a SigLIP face crop each.

A reference is a photo (path, bytes, PIL image, ``HxWx3`` array), a precomputed ArcFace embedding
(1-D array/tensor, or a ``.npy`` file holding one), a :class:`~withanyone.faces.Face` carrying an
embedding, or a ready :class:`Reference`. Photos go through the face analyzer; as in the release, the face
used is the detector's highest-scoring one (``reference_face="largest"``: the largest), and the SigLIP crop
is the square around the detector's *raw* box (the shorter side grown to the longer, then clipped to the
photo, so a face cut by the border keeps its centre), resized to 512 × 512.

ArcFace vectors are passed *unnormalised* when the backend recorded the raw norm (``Face.extra
["embedding_norm"]``): the release feeds insightface's raw ``face.embedding`` to the adapter's MLP, which is
not scale-invariant.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FaceCountError

#: Side of the SigLIP face crop, as in the release (SigLIP's processor then resizes to its own input).
CROP_SIZE = 512
#: Length of the embeddings the released adapter was trained on (insightface antelopev2, glintr100).
ARCFACE_DIM = 512
#: dlib's ResNet face descriptor length, refused with an explanation.
DLIB_DIM = 128
#: Detection threshold of the release's reference face extractor (insightface ``det_thresh``).
REFERENCE_DET_THRESH = 0.4
#: Which face of a reference photo is used: the release's (highest detector score) or the largest.
REFERENCE_FACES = ("score", "largest")


class ReferenceError(ValueError):
    """A reference cannot be used; the message names the reference and the problem."""


DLIB_REFUSAL = (
    "{what} is a 128-d embedding, i.e. dlib's ResNet face descriptor. The WithAnyone adapter was trained on "
    "512-d ArcFace embeddings (insightface antelopev2, recogniser glintr100); dlib's space is a different, "
    "unrelated space, so its vectors would steer the generator towards a meaningless identity. Use "
    "FaceAnalyzer('insightface', pack='antelopev2') (CLI: --face-pack) or pass 512-d ArcFace embeddings."
)


@dataclass
class Reference:
    """One person: ``arcface`` (float32, ArcFace space) and, for the SigLIP branch, a face ``crop``."""

    arcface: np.ndarray
    crop: np.ndarray | None = None
    source: str = "<embedding>"
    bbox: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.arcface = np.asarray(self.arcface, dtype=np.float32).reshape(-1)


def square_crop(image: np.ndarray, bbox: Sequence[float], size: int = CROP_SIZE) -> np.ndarray:
    """The square around ``bbox`` (coordinates truncated to int, shorter side grown symmetrically), *then*
    clipped to the image, resized to ``size`` × ``size`` with Lanczos (RGB uint8) — the release's crop when
    ``bbox`` is the detector's raw box (see :func:`raw_box`)."""
    from PIL import Image

    x1, y1, x2, y2 = (int(v) for v in bbox)
    w, h = x2 - x1, y2 - y1
    if w > h:
        d = w - h
        y1, y2 = y1 - d // 2, y2 + d - d // 2
    elif h > w:
        d = h - w
        x1, x2 = x1 - d // 2, x2 + d - d // 2
    H, W = image.shape[:2]
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(W, x2), min(H, y2)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"face box {tuple(bbox)} lies outside the {W}x{H} image")
    crop = Image.fromarray(np.ascontiguousarray(image[y1:y2, x1:x2]))
    return np.asarray(crop.resize((size, size), Image.LANCZOS))


def _check_dim(vec: np.ndarray, what: str, dim: int) -> np.ndarray:
    vec = np.asarray(vec, dtype=np.float32).reshape(-1)
    if vec.size == DLIB_DIM and dim != DLIB_DIM:
        raise ReferenceError(DLIB_REFUSAL.format(what=what))
    if vec.size != dim:
        raise ReferenceError(f"{what} is a {vec.size}-d vector; the adapter needs a {dim}-d ArcFace embedding")
    if not np.isfinite(vec).all():
        raise ReferenceError(f"{what} holds NaN or infinity")
    if not np.any(vec):
        raise ReferenceError(f"{what} is all zeros")
    return vec


def face_arcface(face: Any) -> np.ndarray:
    """A face's ArcFace vector at the scale the release uses (raw norm restored when recorded)."""
    emb = np.asarray(face.embedding, dtype=np.float32)
    norm = face.extra.get("embedding_norm") if getattr(face, "extra", None) else None
    return emb * float(norm) if norm else emb


def check_analyzer(analyzer: Any, dim: int = ARCFACE_DIM) -> None:
    """Refuse a face analyzer whose embeddings are not the adapter's ArcFace space (dlib, 128-d)."""
    got = int(analyzer.embedding_dim)
    if got == DLIB_DIM and dim != DLIB_DIM:
        raise ReferenceError(DLIB_REFUSAL.format(what=f"the face analyzer's output ({analyzer.backend_name})"))
    if got != dim:
        raise ReferenceError(f"the face analyzer ({analyzer.backend_name}) gives {got}-d embeddings; the adapter "
                             f"needs {dim}-d ArcFace embeddings")


def _is_embedding(ref: Any) -> bool:
    if isinstance(ref, np.ndarray):
        return ref.ndim == 1 or (ref.ndim == 2 and 1 in ref.shape and ref.dtype != np.uint8)
    try:
        import torch

        if isinstance(ref, torch.Tensor):
            return ref.ndim <= 2
    except ImportError:  # pragma: no cover
        pass
    return False


def _needs_analyzer(ref: Any) -> bool:
    """True when ``ref`` is a photo (not an embedding, a Face, a Reference or a ``.npy`` file)."""
    from ..faces.types import Face

    if isinstance(ref, (Reference, Face)) or _is_embedding(ref):
        return False
    return not (isinstance(ref, (str, os.PathLike)) and str(ref).endswith(".npy"))


def choose_face(faces: Sequence[Any], reference_face: str = "score") -> Any:
    """The face of a reference photo to use: ``"score"`` — the highest detector score (the release takes the
    detector's first face, its best-scoring one); ``"largest"`` — the largest box. Ties keep the first."""
    if reference_face not in REFERENCE_FACES:
        raise ValueError(f"`reference_face` must be one of {', '.join(REFERENCE_FACES)}, got {reference_face!r}")
    if reference_face == "largest":
        return max(faces, key=lambda f: f.area)
    return max(faces, key=lambda f: f.score)


def raw_box(face: Any) -> np.ndarray:
    """The detector's unclipped box (``Face.extra["raw_bbox"]`` when the backend recorded it, else ``bbox``)."""
    extra = getattr(face, "extra", None) or {}
    return np.asarray(extra.get("raw_bbox", face.bbox), dtype=np.float32)


def prepare_reference(ref: Any, analyzer: Any = None, *, need_crop: bool = False, dim: int = ARCFACE_DIM,
                      index: int = 0, reference_face: str = "score") -> Reference:
    """Turn one reference (see the module docstring) into a :class:`Reference`; errors name it. A photo holding
    several faces gives a warning naming the face used (``reference_face``: ``"score"`` or ``"largest"``)."""
    from ..faces.image import describe_source, load_image
    from ..faces.types import Face

    what = f"reference {index + 1}"
    if isinstance(ref, Reference):
        _check_dim(ref.arcface, f"{what} ({ref.source})", dim)
        if need_crop and ref.crop is None:
            raise ReferenceError(f"{what} ({ref.source}) has no face crop, which the SigLIP branch needs; "
                                 "pass a photo or set siglip_weight=0")
        return ref
    if isinstance(ref, (str, os.PathLike)) and str(ref).endswith(".npy"):
        path = Path(ref)
        if not path.is_file():
            raise ReferenceError(f"{what}: embedding file {path} does not exist")
        arr = np.load(path, allow_pickle=False)
        ref = arr
        what = f"{what} ({path})"
    if isinstance(ref, Face):
        if ref.embedding is None:
            raise ReferenceError(f"{what} is a Face without an embedding")
        if ref.backend == "dlib" or ref.embedding.size == DLIB_DIM:
            raise ReferenceError(DLIB_REFUSAL.format(what=f"{what} (a {ref.backend or 'dlib'} face)"))
        vec = _check_dim(face_arcface(ref), what, dim)
        if need_crop:
            raise ReferenceError(f"{what} is a precomputed face, but the SigLIP branch needs the face photo; "
                                 "pass the photo or set siglip_weight=0")
        return Reference(vec, None, source=f"<face from {ref.backend}>", bbox=ref.bbox)
    if _is_embedding(ref):
        vec = _check_dim(np.asarray(ref.detach().float().cpu() if hasattr(ref, "detach") else ref), what, dim)
        if need_crop:
            raise ReferenceError(f"{what} is a precomputed embedding, but the SigLIP branch needs the face photo; "
                                 "pass the photo (or a Reference with a crop) or set siglip_weight=0")
        return Reference(vec, None)
    if analyzer is None:
        raise ReferenceError(f"{what} is a photo but no face analyzer is available to embed it")
    name = describe_source(ref)
    image = load_image(ref)
    faces = analyzer.detect(image)
    if not faces:
        raise FaceCountError(f"{what}: no face found in {name}; use a photo where the face is clearly visible")
    face = choose_face(faces, reference_face)
    if len(faces) > 1:
        other = "largest" if reference_face == "score" else "score"
        x1, y1, x2, y2 = (int(round(float(v))) for v in face.bbox)
        warnings.warn(f"{what}: {name} holds {len(faces)} faces; using the one at ({x1}, {y1}, {x2}, {y2}) "
                      f"(reference_face={reference_face!r}, score {face.score:.2f}, {face.width:.0f}x"
                      f"{face.height:.0f} px). Crop the photo to one person or try reference_face={other!r}.",
                      UserWarning, stacklevel=3)
    vec = _check_dim(face_arcface(face), f"{what} ({name})", dim)
    crop = square_crop(image, raw_box(face)) if need_crop else None
    return Reference(vec, crop, source=name, bbox=face.bbox)


def prepare_references(refs: Sequence[Any], analyzer: Any = None, *, need_crop: bool = False,
                       dim: int = ARCFACE_DIM, reference_face: str = "score") -> list[Reference]:
    """:func:`prepare_reference` for each, in order; photos need an ArcFace-space analyzer."""
    if reference_face not in REFERENCE_FACES:
        raise ValueError(f"`reference_face` must be one of {', '.join(REFERENCE_FACES)}, got {reference_face!r}")
    if analyzer is not None and any(_needs_analyzer(r) for r in refs):
        check_analyzer(analyzer, dim)
    return [prepare_reference(r, analyzer, need_crop=need_crop, dim=dim, index=i, reference_face=reference_face)
            for i, r in enumerate(refs)]


def encode_siglip(crops: Sequence[np.ndarray], model: Any, processor: Any) -> Any:
    """SigLIP vision tower's last hidden state for each face crop: ``Tensor[N, tokens, width]``."""
    import torch

    param = next(model.parameters())
    pixels = processor(images=[np.asarray(c) for c in crops], return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model(pixel_values=pixels.to(param.device, param.dtype)).last_hidden_state
    return out
