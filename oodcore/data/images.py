"""Robust image loading: every file either becomes a fully decoded RGB image or a BadImageError.

Real datasets contain zero-byte files, truncated downloads, HTML saved as .jpg,
CMYK/16-bit/palette images and the odd decompression bomb. Extraction must not
crash half-way through 50k images, and must not silently feed a half-decoded
image to a model, so all of that is funnelled into one exception with a short reason.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Lower-case suffixes (with the dot, as compared against Path.suffix.lower()).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"})

# PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS at import, ~179M px). We enforce it
# explicitly so the limit is not at the mercy of whatever some other library set globally.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
# JPEGs larger than this are decoded at reduced scale (libjpeg DCT scaling via Image.draft):
# far above any ImageNet photo, so ordinary images are always decoded exactly.
DEFAULT_DRAFT_ABOVE_PIXELS = 50_000_000
# ...keeping the shorter side at least this long, ample for 224-px models and thumbnails.
DEFAULT_DRAFT_MIN_SIDE = 1024
# An image whose decoded pixels would take more than this is decoded at a reduced DCT scale
# (JPEG) until it fits, or skipped with the reason (other formats cannot shrink while decoding).
DEFAULT_MAX_DECODED_BYTES = 256 * 2**20

_GLOBAL_LIMIT_LOCK = threading.Lock()

Source = Union[str, os.PathLike, BinaryIO]


class BadImageError(Exception):
    """A file that cannot be used as an image; ``reason`` is a short stable label.

    Reasons: "zero-byte file", "missing file", "not an image", "truncated",
    "corrupt", "decompression bomb", "over memory budget", "unsupported mode", "unreadable".
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)  # args kept so the error pickles across workers
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def is_image_file(name: Union[str, os.PathLike]) -> bool:
    """Extension check (case-insensitive) against IMAGE_EXTENSIONS."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _open_source(src: Source) -> BinaryIO:
    """Open a path (or rewind-check a file object) and reject empty input before PIL sees it."""
    if isinstance(src, (str, os.PathLike)):
        try:
            size = os.stat(src).st_size
        except FileNotFoundError:
            raise BadImageError("missing file", str(src)) from None
        except OSError as e:
            raise BadImageError("unreadable", f"{src}: {e}") from None
        if size == 0:
            raise BadImageError("zero-byte file", str(src))
        try:
            return open(src, "rb")
        except OSError as e:
            raise BadImageError("unreadable", f"{src}: {e}") from None
    f = src
    if not (hasattr(f, "seek") and hasattr(f, "tell")) or not _seekable(f):
        f = io.BytesIO(f.read())  # PIL needs to seek
    pos = f.tell()
    if not f.read(1):
        raise BadImageError("zero-byte file", "empty file object")
    f.seek(pos)
    return f


def _seekable(f) -> bool:
    try:
        return bool(f.seekable()) if hasattr(f, "seekable") else True
    except Exception:
        return False


def _pil_open(f: BinaryIO, max_pixels: int) -> Image.Image:
    """Image.open (header only) with PIL's global bomb check subordinated to ``max_pixels``."""
    try:
        with warnings.catch_warnings():
            # Our own explicit check below decides; PIL's warning would just be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            cur = Image.MAX_IMAGE_PIXELS
            if cur is not None and 2 * cur < max_pixels:
                # PIL raises DecompressionBombError above 2 x its global limit; lift that limit
                # for this header read only, so it never rejects what the caller allowed.
                # (Multi-frame GIF/TIFF decoding may still consult PIL's global limit.)
                with _GLOBAL_LIMIT_LOCK:
                    saved = Image.MAX_IMAGE_PIXELS
                    Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2
                    try:
                        img = Image.open(f)
                    finally:
                        Image.MAX_IMAGE_PIXELS = saved
            else:
                img = Image.open(f)
    except Image.DecompressionBombError as e:
        raise BadImageError("decompression bomb", str(e)) from None
    except UnidentifiedImageError:
        raise BadImageError("not an image", "PIL cannot identify the file format") from None
    except (EOFError, SyntaxError, ValueError, OSError, struct.error) as e:
        raise _classify(e) from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImageError("corrupt", f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise BadImageError("decompression bomb", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels")
    return img


def _classify(e: BaseException) -> BadImageError:
    msg = str(e) or type(e).__name__
    if isinstance(e, Image.DecompressionBombError):
        return BadImageError("decompression bomb", msg)
    if isinstance(e, EOFError) or "truncated" in msg.lower():
        return BadImageError("truncated", msg)
    return BadImageError("corrupt", f"{type(e).__name__}: {msg}")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited onto white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        mode = "RGBA" if "transparency" in img.info else "RGB"
        img = img.convert(mode)
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        # Convert via numpy: PIL's I;16 -> RGB path clips to 255 instead of rescaling.
        a = np.asarray(img)
        if mode.startswith("I;16"):
            a8 = (a.astype(np.float32) / 257.0).round()
        elif mode == "F":
            a = np.nan_to_num(a.astype(np.float32))
            a8 = a * 255.0 if a.size and a.max() <= 1.0 and a.min() >= 0.0 else a
        else:  # 32-bit ints: 8-bit or 16-bit data stored in "I" (older PNG path), else min-max
            amin, amax = (int(a.min()), int(a.max())) if a.size else (0, 0)
            if amin >= 0 and amax <= 255:
                a8 = a.astype(np.float32)
            elif amin >= 0 and amax <= 65535:
                a8 = a.astype(np.float32) / 257.0
            else:
                a8 = (a.astype(np.float64) - amin) * (255.0 / max(amax - amin, 1))
        a8 = np.clip(a8, 0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(a8), "L").convert("RGB")
    try:
        return img.convert("RGB")  # L, 1, CMYK, YCbCr, ...
    except (ValueError, OSError) as e:
        raise BadImageError("unsupported mode", f"{mode}: {e}") from None


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip per EXIF orientation; a damaged EXIF block is ignored, not fatal."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def decoded_bytes(img: Image.Image) -> int:
    """What decoding `img` (at its current, possibly drafted, size) and converting it to RGB allocates."""
    w, h = img.size
    try:
        bands = Image.getmodebands(img.mode)
    except (KeyError, ValueError):
        bands = 4
    per_band = 2 if img.mode.startswith("I;16") else 4 if img.mode in ("I", "F") else 1
    return w * h * max(3, bands * per_band)


def _draft(img: Image.Image, min_side: int) -> None:
    """Decode a JPEG at the coarsest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= `min_side`."""
    img.draft("RGB", (min_side, min_side))


def load_rgb(
    src: Source,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_above_pixels: int = DEFAULT_DRAFT_ABOVE_PIXELS,
    draft_min_side: int = DEFAULT_DRAFT_MIN_SIDE,
    target_side: int | None = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> Image.Image:
    """Open, fully decode and convert an image to RGB, or raise BadImageError.

    ``max_pixels``: images with more pixels (judged from the header, before decoding) are
    rejected as decompression bombs. JPEGs above ``draft_above_pixels`` are decoded at a
    reduced DCT scale (shorter side >= ``draft_min_side``) to bound memory. ``target_side``: the
    shorter side the caller will resize to; a JPEG at least twice that is decoded at the coarsest
    DCT scale that keeps its shorter side >= ``target_side`` (libjpeg's draft mode: far less decoding
    work and memory; the pixels then differ slightly from a full decode followed by the same resize).
    An image whose decoded pixels would exceed ``max_decoded_bytes`` is drafted down until it fits
    (JPEG) or rejected with reason "over memory budget". The full decode
    happens here (``img.load()``) so truncated files fail here and not inside a transform.
    Relies on PIL's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``.
    """
    if max_pixels <= 0:
        raise ValueError("max_pixels must be positive")
    f = _open_source(src)
    own = isinstance(src, (str, os.PathLike))
    try:
        img = _pil_open(f, max_pixels)
        try:
            w, h = img.size
            jpeg = img.format in ("JPEG", "MPO")
            if jpeg and target_side and min(w, h) >= 2 * target_side:
                _draft(img, target_side)
            elif jpeg and w * h > draft_above_pixels:
                _draft(img, draft_min_side)
            if jpeg and decoded_bytes(img) > max_decoded_bytes:
                img.draft("RGB", (1, 1))  # the coarsest scale libjpeg offers (1/8)
            if decoded_bytes(img) > max_decoded_bytes:
                mb = decoded_bytes(img) / 2**20
                raise BadImageError(
                    "over memory budget",
                    f"{w}x{h} {img.mode} needs ~{mb:.0f} MB decoded, over the {max_decoded_bytes / 2**20:.0f} MB budget",
                )
            img.load()
        except BadImageError:
            raise
        except Image.DecompressionBombError as e:
            raise BadImageError("decompression bomb", str(e)) from None
        except MemoryError:
            raise BadImageError("decompression bomb", f"out of memory decoding {w}x{h}") from None
        except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
            raise _classify(e) from None
        img = _apply_exif_orientation(img)
        return _to_rgb(img)
    finally:
        if own:
            f.close()


def make_thumbnail(img: Image.Image, size: int = 64) -> np.ndarray:
    """Shorter side -> ``size``, then center crop: a (size, size, 3) uint8 array for galleries."""
    if size <= 0:
        raise ValueError("thumbnail size must be positive")
    if img.mode != "RGB":
        img = _to_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    small = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    small = small.crop((left, top, left + size, top + size))
    return np.array(small, dtype=np.uint8).reshape(size, size, 3)  # a writable copy
