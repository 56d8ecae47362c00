"""Face stack: load → detect (5 landmarks) → align to ArcFace 112×112 → embed → match."""

from .align import ARCFACE_TEMPLATE, align_face, estimate_similarity
from .analyzer import BACKENDS, FaceAnalyzer, ImageFaces, create_backend
from .identity import Gallery, Identity, cosine_matrix, hungarian_match
from .image import MAX_PIXELS, load_image
from .types import Face, l2_normalize

__all__ = [
    "ARCFACE_TEMPLATE", "BACKENDS", "Face", "FaceAnalyzer", "Gallery", "Identity", "ImageFaces", "MAX_PIXELS",
    "align_face", "cosine_matrix", "create_backend", "estimate_similarity", "hungarian_match", "l2_normalize",
    "load_image",
]
