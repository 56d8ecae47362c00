"""The one image loader: every odd input gives a correct RGB image or an ImageLoadError naming the file."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from withanyone.errors import ImageLoadError
from withanyone.faces import load_image


def _jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _gradient(h: int = 40, w: int = 60) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 77)], -1).astype(np.uint8)


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny valid-header PNG that declares a huge size (IDAT holds only a few bytes)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_zero_byte_file_names_the_file(tmp_path: Path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageLoadError) as err:
        load_image(p)
    assert err.value.source == str(p) and "empty" in err.value.reason
    assert str(p) in str(err.value)


def test_truncated_jpeg(tmp_path: Path):
    data = _jpeg_bytes(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as err:
        load_image(p)
    assert "truncated" in err.value.reason and err.value.source == str(p)


def test_corrupt_and_non_image_files(tmp_path: Path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture")
    for p in (garbage, text):
        with pytest.raises(ImageLoadError) as err:
            load_image(p)
        assert err.value.source == str(p)
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_decompression_bomb_is_refused_quickly(tmp_path: Path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_bomb(60_000, 60_000))
    assert p.stat().st_size < 200
    with pytest.raises(ImageLoadError) as err:
        load_image(p)
    assert "3600000000" in err.value.reason and "decompression bomb" in err.value.reason
    # A size over our own limit but under PIL's is refused by ours, naming the declared size.
    p2 = tmp_path / "big.png"
    p2.write_bytes(_png_bomb(9000, 9000))
    with pytest.raises(ImageLoadError, match="9000x9000"):
        load_image(p2)


def test_one_pixel_image_loads_and_has_no_face(dlib_analyzer):
    arr = load_image(np.array([[[10, 20, 30]]], dtype=np.uint8))
    assert arr.shape == (1, 1, 3)
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (1, 2, 3)).save(buf, format="PNG")
    assert load_image(buf.getvalue()).tolist() == [[[1, 2, 3]]]
    assert dlib_analyzer.detect(arr) == []


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path):
    rgb = Image.fromarray(_gradient())
    p = tmp_path / "cmyk.jpg"
    rgb.convert("CMYK").save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    out = load_image(p)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - np.asarray(rgb).astype(int)).mean() < 8


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path):
    ramp = (np.linspace(0, 65535, 64).reshape(1, 64).repeat(8, 0)).astype(np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(ramp).save(p)
    assert Image.open(p).mode.startswith("I")
    out = load_image(p)
    assert out.shape == (8, 64, 3)
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and 120 <= out[0, 32, 0] <= 135
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)


def test_modes_rgba_la_p_grayscale(tmp_path: Path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent → white
    out = load_image(Image.fromarray(rgba, "RGBA"))
    assert out[0, 0].tolist() == [200, 0, 0] and out[3, 3].tolist() == [255, 255, 255]
    la = Image.fromarray(np.full((3, 3), 50, np.uint8), "L").convert("LA")
    assert load_image(la)[1, 1].tolist() == [50, 50, 50]
    pal = Image.fromarray(_gradient()).convert("P")
    assert load_image(pal).shape == (40, 60, 3)
    gray = np.full((5, 6), 9, np.uint8)
    assert load_image(gray)[0, 0].tolist() == [9, 9, 9]
    assert load_image(np.full((2, 2), 0.5, np.float32))[0, 0, 0] == 128
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(np.full((2, 2, 3), np.nan, np.float32))
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((2, 2, 5), np.uint8))


def test_exif_rotation_is_applied(tmp_path: Path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    p = tmp_path / "rotated.jpg"
    im.save(p, exif=exif, quality=95)
    out = load_image(p)
    assert out.shape == (40, 20, 3)  # portrait after applying the orientation
    assert out[5, 10, 0] > 200 and out[35, 10, 0] < 60  # red half is now on top


def test_exif_rotated_face_photo_still_finds_the_face(tmp_path: Path, samples_dir: Path, dlib_analyzer):
    im = Image.open(samples_dir / "obama" / "1.jpg")
    im.thumbnail((400, 400))
    sideways = im.transpose(Image.Transpose.ROTATE_90)  # stored sideways…
    exif = sideways.getexif()
    exif[0x0112] = 6  # …with a tag saying "turn me back"
    p = tmp_path / "sideways.jpg"
    sideways.save(p, exif=exif)
    assert len(dlib_analyzer.detect(p)) == 1
    assert load_image(p).shape[:2] == (im.height, im.width)


def test_bytes_and_pil_and_path_agree(samples_dir: Path):
    p = samples_dir / "biden" / "1.jpg"
    a = load_image(p)
    b = load_image(p.read_bytes())
    c = load_image(Image.open(p))
    assert a.shape == b.shape == c.shape and np.array_equal(a, b) and np.array_equal(a, c)


def test_image_extension_sniffs_the_format_from_the_bytes():
    from withanyone.faces.image import image_extension

    arr = _gradient()
    found = {}
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        found[fmt] = image_extension(buf.getvalue())
    assert found == {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}
    assert image_extension(b"not an image") == "jpg"
