"""Robust image decoding for feature extraction.

``load_image`` turns any file Pillow can read into an upright uint8 RGB array whose long side
is at most ``max_image_size``, plus the scale factor (resized pixels per original pixel) so that
keypoints found on the resized image map back to ORIGINAL pixels as ``xy / scale``.  "Original"
means the full-resolution image after its EXIF orientation has been applied.

Decoding is by content (the extension is ignored).  Every mode is handled: L/1/P/CMYK/YCbCr are
converted to RGB, images with alpha (RGBA, LA, PA, P with transparency) are composited on white,
16-bit grayscale (I;16 / I) is scaled to 8 bits, animated GIF/WebP use their first frame.

Guards: the pixel count is checked from the header before any pixel is decoded; big JPEGs are
decoded at 1/2, 1/4 or 1/8 resolution with ``Image.draft`` (the decoder downsamples, so memory
stays at the reduced size), and the guard applies to the pixel count actually decoded.  Images
whose short side is below ``min_size`` are refused as "too small (WxH)" rather than fed to the
model (a few pixels carry no landmark and break strided backbones).

Failures raise ``ImageError`` whose ``reason`` is one short phrase: "missing file" (with a hint
when X.JPG stands where X.jpg is expected), "broken symlink", "a directory / a FIFO / a device,
not an image file", "empty file", "not an image", "truncated", "too large (WxH)",
"too small (WxH)", "decode error".
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import warnings
from pathlib import Path

import numpy as np

from landmarks.utils import LandmarksError


class ImageError(LandmarksError):
    """An image that cannot be used; ``reason`` is a short phrase for the failures list."""

    def __init__(self, reason: str, path: str | Path = ""):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.reason = reason
        self.path = str(path)


@contextlib.contextmanager
def _own_bomb_guard():
    """Switch off Pillow's global bomb check while we apply our own (configurable) one."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _to_rgb(img) -> np.ndarray:
    """Any Pillow mode -> uint8 [H, W, 3]; alpha is composited on white."""
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float32)
        if mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0  # 16-bit range -> 8-bit
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    elif mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header only, upright (EXIF orientation applied)."""
    from PIL import Image

    with _own_bomb_guard(), Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_image(
    path: str | Path, max_image_size: int = 1024, max_pixels: int = 120_000_000, min_size: int = 16
) -> tuple[np.ndarray, float]:
    """Decode `path` to an upright uint8 RGB array (long side <= max_image_size; 0 = no limit).

    Returns ``(image, scale)``: ``scale`` = resized pixels per original pixel (<= 1), so an
    (x, y) found on ``image`` is at ``(x / scale, y / scale)`` in the original upright image.
    Raises ImageError with a short ``reason`` for anything unusable.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _check_file(path)
    with _own_bomb_guard():
        try:
            img = Image.open(path)
        except UnidentifiedImageError:
            raise ImageError("not an image", path) from None
        except OSError as e:
            raise ImageError(_reason(e), path) from None
        with img:
            w, h = img.size  # header only; no pixel decoded yet
            scale, decoded = _plan_decode(img, path, max_image_size, max_pixels, min_size)
            try:
                img.seek(0)  # first frame of GIF / WebP / APNG
                img.load()
            except (UnidentifiedImageError, SyntaxError):
                raise ImageError("not an image", path) from None
            except (OSError, ValueError) as e:
                raise ImageError(_reason(e), path) from None
            arr = _upright_rgb(img, (w, h), decoded, scale)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError("decode error", path)
    return np.ascontiguousarray(arr), float(scale)


def _check_file(path: Path) -> None:
    """ImageError unless `path` is a readable, non-empty regular file (see file_problem)."""
    why = file_problem(path)
    if why:
        raise ImageError(why, path)


def file_problem(path: str | Path) -> str | None:
    """Why `path` cannot be an image file, in a short phrase, or None: "missing file" (with a hint
    when the same name exists in another case, e.g. X.JPG for X.jpg), "broken symlink", "a
    directory", "a FIFO", "a device", "a socket", "empty file", "unreadable (...)".  Only stat is
    used, so a FIFO is never opened (opening one would block)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            return "broken symlink"
        other = _other_case(path)
        if other:
            return f"missing file (found {other}: ids and the .jpg extension are case-sensitive; rename it {path.name})"
        return "missing file"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind:
        return f"{kind}, not an image file"
    if st.st_size == 0:
        return "empty file"
    return None


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a device",
    stat.S_IFSOCK: "a socket",
}


def _other_case(path: Path) -> str | None:
    """A file beside `path` whose name differs only in case or in .jpg/.jpeg spelling, or None."""
    want = {path.name.lower(), (path.stem + ".jpeg").lower()} if path.suffix.lower() == ".jpg" else {path.name.lower()}
    try:
        with os.scandir(path.parent) as it:
            return next((e.name for e in it if e.name.lower() in want and e.name != path.name), None)
    except OSError:
        return None


def _plan_decode(img, path: Path, max_image_size: int, max_pixels: int, min_size: int) -> tuple[float, tuple[int, int]]:
    """From the header alone: refuse too small or too large images, let libjpeg decode big JPEGs
    at 1/2..1/8 (``draft``: the result stays >= the wanted size).  Returns the final scale and
    the (w, h) that will be decoded."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError("not an image", path)
    if min(w, h) < min_size:
        raise ImageError(f"too small ({w}x{h})", path)
    scale = min(1.0, max_image_size / max(w, h)) if max_image_size > 0 else 1.0
    if img.format == "JPEG" and scale < 1.0:
        img.draft("RGB" if img.mode in ("RGB", "YCbCr") else img.mode, (math.ceil(w * scale), math.ceil(h * scale)))
    dw, dh = img.size
    if dw * dh > max_pixels:
        raise ImageError(f"too large ({w}x{h})", path)
    return scale, (dw, dh)


def _upright_rgb(img, size: tuple[int, int], decoded: tuple[int, int], scale: float) -> np.ndarray:
    """The decoded `img` turned upright by its EXIF orientation (kept as stored when the EXIF is
    malformed), as RGB, resized to `scale` x its original upright `size` (stored w, h; `decoded`:
    the w, h decoded, smaller after a JPEG draft)."""
    from PIL import Image, ImageOps

    w, h = size
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF: keep the stored orientation
        upright = img
    ow, oh = (h, w) if (upright.size != decoded) else (w, h)  # original, upright
    arr = _to_rgb(upright)  # RGB first: palette/16-bit images resize properly
    tw = max(1, int(round(ow * scale)))
    th = max(1, int(round(oh * scale)))
    if (arr.shape[1], arr.shape[0]) != (tw, th):
        arr = np.asarray(Image.fromarray(arr).resize((tw, th), Image.BILINEAR), dtype=np.uint8)
    return arr


def _reason(e: BaseException) -> str:
    """Short failure reason from a Pillow decode error's message."""
    msg = str(e).lower()
    if "truncated" in msg or "premature end" in msg or "broken data stream" in msg or "unexpected end" in msg:
        return "truncated"
    if "cannot identify" in msg:
        return "not an image"
    return "decode error"


def describe_failure(e: BaseException) -> str:
    """Short failure reason for any exception raised while loading/extracting one image."""
    if isinstance(e, ImageError):
        return e.reason
    if isinstance(e, MemoryError):
        return "out of memory"
    return f"model error ({type(e).__name__})"


__all__ = ["ImageError", "load_image", "image_size", "describe_failure", "file_problem"]
