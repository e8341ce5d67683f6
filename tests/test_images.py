"""landmarks.datasets.images.load_image: every bad or unusual input is its own test, with generated files."""

from __future__ import annotations

import resource
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, features

from landmarks.datasets.images import ImageError, image_size, load_image


def _noise(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _reason(path, **kw):
    with pytest.raises(ImageError) as ei:
        load_image(path, **kw)
    return ei.value.reason


def test_plain_jpeg_keeps_size_and_scale_one(tmp_path):
    p = tmp_path / "a.jpg"
    Image.fromarray(_noise(60, 80)).save(p, quality=95)
    img, scale = load_image(p, max_image_size=1024)
    assert img.shape == (60, 80, 3) and img.dtype == np.uint8 and scale == 1.0


def test_resize_long_side_and_scale(tmp_path):
    p = tmp_path / "wide.png"
    Image.fromarray(_noise(500, 1000)).save(p)
    img, scale = load_image(p, max_image_size=256)
    assert img.shape == (128, 256, 3)
    assert scale == pytest.approx(0.256)


def test_missing_file(tmp_path):
    assert _reason(tmp_path / "nope.jpg") == "missing file"


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert _reason(p) == "empty file"


def test_truncated_jpeg(tmp_path):
    p = tmp_path / "cut.jpg"
    Image.fromarray(_noise(200, 200)).save(p, quality=90)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert _reason(p) == "truncated"


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "text.jpg"
    p.write_text("this is not an image\n" * 20)
    assert _reason(p) == "not an image"


def test_png_content_with_jpg_name_decodes_by_content(tmp_path):
    p = tmp_path / "really_png.jpg"
    Image.fromarray(_noise(40, 50)).save(p, format="PNG")
    img, _ = load_image(p)
    assert img.shape == (40, 50, 3)


def test_png_with_alpha_composited_on_white(tmp_path):
    a = np.zeros((32, 64, 4), np.uint8)
    a[:, :32] = (255, 0, 0, 0)  # fully transparent red -> white
    a[:, 32:] = (0, 0, 255, 255)  # opaque blue
    p = tmp_path / "alpha.png"
    Image.fromarray(a, "RGBA").save(p)
    img, _ = load_image(p)
    assert img.shape == (32, 64, 3)
    assert (img[:, :32] == 255).all()
    assert (img[:, 32:] == (0, 0, 255)).all()


def test_grayscale(tmp_path):
    g = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (20, 1))
    p = tmp_path / "gray.png"
    Image.fromarray(g, "L").save(p)
    img, _ = load_image(p)
    assert img.shape == (20, 50, 3)
    assert (img[..., 0] == g).all() and (img[..., 1] == g).all() and (img[..., 2] == g).all()


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (48, 32), (0, 255, 255, 0)).save(p, quality=95)  # pure red in CMYK
    with Image.open(p) as im:
        assert im.mode == "CMYK"
    img, _ = load_image(p)
    assert img.shape == (32, 48, 3)
    r, g, b = img.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_scaled_to_8bit(tmp_path):
    a = np.zeros((20, 30), np.uint16)
    a[:, :10] = 0
    a[:, 10:20] = 128 * 257
    a[:, 20:] = 65535
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    img, _ = load_image(p)
    assert img.dtype == np.uint8 and img.shape == (20, 30, 3)
    assert (img[:, :10] == 0).all() and (img[:, 10:20] == 128).all() and (img[:, 20:] == 255).all()


def test_exif_rotated_jpeg_decoded_upright(tmp_path):
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :40] = (255, 0, 0)  # stored: left half red
    a[:, 40:] = (0, 0, 255)  # stored: right half blue
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    p = tmp_path / "rot.jpg"
    im.save(p, quality=95, exif=exif.tobytes())
    assert image_size(p) == (40, 80)
    img, scale = load_image(p)
    assert img.shape == (80, 40, 3)  # upright: portrait
    top, bottom = img[:30].reshape(-1, 3).mean(0), img[50:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    assert scale == 1.0


def test_tiny_image_refused(tmp_path):
    p = tmp_path / "tiny.png"
    Image.fromarray(_noise(5, 5)).save(p)
    assert _reason(p, min_size=16) == "too small (5x5)"
    img, _ = load_image(p, min_size=1)  # allowed when the minimum is lowered
    assert img.shape == (5, 5, 3)


def _png_bomb(path, w, h):
    """A valid w x h grayscale PNG of zeros, written row-chunk by row-chunk (a few hundred KB)."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (w + 1)
    parts = [comp.compress(row * 1000) for _ in range(h // 1000)]
    parts.append(comp.compress(row * (h % 1000)))
    parts.append(comp.flush())
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)))
        f.write(chunk(b"IDAT", b"".join(parts)))
        f.write(chunk(b"IEND", b""))


def test_decompression_bomb_refused_from_header(tmp_path):
    p = tmp_path / "bomb.png"
    _png_bomb(p, 20000, 20000)
    assert p.stat().st_size < 2_000_000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    assert _reason(p, max_pixels=120_000_000) == "too large (20000x20000)"
    assert time.time() - t0 < 5.0  # header only (a full decode takes far longer)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grown_mb < 100  # nothing was decoded (a full decode would need 400 MB)


def test_big_jpeg_decoded_with_draft(tmp_path):
    p = tmp_path / "big.jpg"
    Image.fromarray(_noise(3000 // 8, 4000 // 8)).resize((4000, 3000)).save(p, quality=80)
    # 12 Mpx > 2 Mpx limit, but libjpeg decodes at 1/4 (1000x750) -> allowed and cheap.
    img, scale = load_image(p, max_image_size=512, max_pixels=2_000_000)
    assert img.shape == (384, 512, 3)
    assert scale == pytest.approx(512 / 4000)
    # Without downscaling the full image would be decoded: refused.
    assert _reason(p, max_image_size=4000, max_pixels=2_000_000) == "too large (4000x3000)"


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    img, _ = load_image(p)
    assert img.shape == (30, 40, 3)
    r, g, b = img.reshape(-1, 3).mean(0)
    assert r > 200 and b < 60


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp(tmp_path):
    a = _noise(30, 40)
    p = tmp_path / "x.webp"
    Image.fromarray(a).save(p, lossless=True)
    img, _ = load_image(p)
    assert img.shape == (30, 40, 3)
    assert np.array_equal(img, a)


def test_palette_image_resized_smoothly(tmp_path):
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, ::2] = 255  # 1-px black/white stripes: a smooth downscale gives grey
    p = tmp_path / "pal.gif"
    Image.fromarray(a).convert("P").save(p)
    img, scale = load_image(p, max_image_size=50)
    assert img.shape == (25, 50, 3) and scale == pytest.approx(0.25)
    assert 80 < img.mean() < 180 and img.std() < 40
