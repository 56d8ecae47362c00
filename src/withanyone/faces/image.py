"""The one image loader of the project: any source → RGB uint8 ``numpy`` array, or a typed error."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageLoadError

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray

#: Largest image accepted, in pixels (≈ 8k × 8k); larger files are refused as possible decompression bombs.
MAX_PIXELS = 64_000_000


def describe_source(src: object) -> str:
    """A short human name for an image source, used in error messages."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.mode} {src.size[0]}x{src.size[1]}>"
    if isinstance(src, np.ndarray):
        return f"<array {src.dtype} {tuple(src.shape)}>"
    return f"<{type(src).__name__}>"


def _array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    """Convert a HxW, HxWx1, HxWx3 or HxWx4 array of any common dtype to RGB uint8."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageLoadError(name, f"array of shape {tuple(arr.shape)} is not an image (want HxW, HxWx3 or HxWx4)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageLoadError(name, "image has zero width or height")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.uint16:
        out = (arr.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    elif arr.dtype == bool:
        out = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageLoadError(name, "float image holds NaN or infinity")
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        out = np.clip(arr * scale, 0, 255).round().astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        out = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        raise ImageLoadError(name, f"unsupported array dtype {arr.dtype}")
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    elif out.shape[2] == 4:
        alpha = out[..., 3:4].astype(np.float32) / 255.0
        out = (out[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(out)


def _pil_to_rgb(im: Image.Image, name: str) -> np.ndarray:
    """Convert any PIL mode (RGBA, LA, P, CMYK, I;16, I, F, 1, L, YCbCr…) to RGB uint8, alpha over white."""
    if im.width == 0 or im.height == 0:
        raise ImageLoadError(name, "image has zero width or height")
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.int64)
        hi = 65535 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        arr = (np.clip(arr, 0, hi) * 255 // hi).astype(np.uint8)
        return _array_to_rgb(arr, name)
    if mode == "F":
        return _array_to_rgb(np.asarray(im, dtype=np.float32), name)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def load_image(src: ImageInput, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read ``src`` (path, bytes, PIL image or array) as an RGB ``uint8`` array of shape (H, W, 3).

    EXIF orientation is applied; palette, alpha, CMYK, 16-bit and grayscale images become RGB (alpha
    composited over white). Empty, truncated, corrupt, non-image and oversized files raise
    :class:`ImageLoadError` naming the file — never a silent garbage image.
    """
    name = describe_source(src)
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, name)
    if isinstance(src, Image.Image):
        return _pil_to_rgb(ImageOps.exif_transpose(src) or src, name)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise ImageLoadError(name, "no such file")
        if path.is_dir():
            raise ImageLoadError(name, "is a directory, not an image file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageLoadError(name, f"unreadable ({exc.strerror or exc})") from exc
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        raise ImageLoadError(name, "unsupported source type (want a path, bytes, PIL image or numpy array)")
    if len(data) == 0:
        raise ImageLoadError(name, "file is empty (0 bytes)")
    return decode_image_bytes(data, name, max_pixels=max_pixels)


def decode_image_bytes(data: bytes, name: str, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes; ``name`` is used in errors. See :func:`load_image`."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ImageLoadError(name, "image has zero width or height")
            if w * h > max_pixels:
                raise ImageLoadError(
                    name, f"declares {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} (decompression bomb?)"
                )
            im.load()
        except ImageLoadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageLoadError(
                name, f"refused as a decompression bomb: declares too many pixels to decode safely ({exc})"
            ) from exc
        except UnidentifiedImageError as exc:
            raise ImageLoadError(name, "not a recognised image format (corrupt or not an image)") from exc
        except (OSError, SyntaxError, ValueError, EOFError, struct_error()) as exc:
            msg = str(exc) or type(exc).__name__
            if "truncated" in msg.lower():
                raise ImageLoadError(name, f"file is truncated ({msg})") from exc
            raise ImageLoadError(name, f"corrupt image data ({msg})") from exc
        try:
            im = ImageOps.exif_transpose(im) or im
        except Exception:  # a broken EXIF block should not make a readable image unreadable
            pass
        return _pil_to_rgb(im, name)


def image_extension(data: bytes) -> str:
    """File extension (no dot) matching encoded image bytes by their magic number; ``jpg`` when unknown."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return "jpg"


def struct_error() -> type[Exception]:
    """``struct.error`` (raised by some PIL plugins on garbage headers)."""
    import struct

    return struct.error


def to_pil(image: np.ndarray) -> Image.Image:
    """An RGB uint8 array as a PIL image."""
    return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB")


def resize_max(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downscale so the longer side is at most ``max_side``; returns the image and the scale applied (≤ 1)."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return image, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(to_pil(image).resize(size, Image.BILINEAR)), scale
