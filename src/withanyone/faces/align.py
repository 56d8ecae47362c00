"""5-point similarity alignment to the ArcFace 112×112 template."""

from __future__ import annotations

import numpy as np
from PIL import Image

#: ArcFace / insightface 112×112 template: left eye, right eye, nose tip, left and right mouth corner.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama, no reflection) mapping ``src`` points onto ``dst``.

    Returns the 2×3 matrix M with ``dst ≈ M @ [x, y, 1]``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two matching (N, 2) point sets with N ≥ 2, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    if var_s < 1e-12:
        raise ValueError("source points coincide; no similarity transform exists")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    r = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / var_s
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]]).astype(np.float64)


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a 2×3 affine matrix."""
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def apply_affine(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a 2×3 affine matrix to (N, 2) points."""
    pts = np.asarray(pts, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def warp_affine(image: np.ndarray, m: np.ndarray, size: tuple[int, int], border: int = 0) -> np.ndarray:
    """Warp an RGB uint8 image with the 2×3 matrix ``m`` (source → destination) to ``size`` = (w, h)."""
    inv = invert_affine(m)
    coeffs = (inv[0, 0], inv[0, 1], inv[0, 2], inv[1, 0], inv[1, 1], inv[1, 2])
    im = Image.fromarray(np.ascontiguousarray(image))
    out = im.transform(size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=(border,) * 3)
    return np.asarray(out)


def arcface_matrix(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The similarity matrix taking ArcFace-order 5 points into the ``size``×``size`` ArcFace frame."""
    dst = ARCFACE_TEMPLATE * (size / 112.0)
    return estimate_similarity(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), dst)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Crop and align one face to the ArcFace ``size``×``size`` frame from its ArcFace-order landmarks."""
    return warp_affine(image, arcface_matrix(landmarks, size), (size, size))
