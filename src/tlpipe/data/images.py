"""Robust decoding of one image file into 8-bit RGB, and the bytes the image store keeps for it.

Policy (see docs/design.md, "data/images/"):
- Formats: JPEG (incl. camera MPO), PNG, GIF (first frame of an animation), BMP, TIFF, WebP.
  Anything else, and random bytes that some exotic Pillow plugin might accept, is "not an image".
- Every mode becomes RGB. Transparency (RGBA, LA, P/GIF with a transparent index) is composited on
  WHITE, so transparent backgrounds look like paper rather than black. 16-bit greyscale is scaled
  to 8 bits (not clipped).
- EXIF orientation is applied. Images larger than `max_side` are shrunk (Lanczos) to fit; big
  JPEGs are reduced while decoding (`Image.draft`), so a 12000x9000 photo never fills memory.
- A JPEG that is already plain (RGB, no EXIF rotation, within max_side) is stored byte-for-byte;
  everything else is re-encoded as PNG, whose bytes depend only on the pixels.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tlpipe.runtime.errors import ImageDecodeError

MAX_SIDE = 2048
# Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that. 180 MP lets a 12000x9000
# photo through without a warning; JPEGs are reduced while decoding so their size barely matters.
# Other formats must be decoded whole, so we refuse them ourselves above this many pixels.
MAX_PIXELS = 180_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# A truncated file is an error we report, never a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We reject or reduce oversized images ourselves, and damaged TIFF/EXIF tags end as a rejection
# reason: Pillow's own warnings about them would only flood the stage's output.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")

# Plugins we trust to identify a file by its signature (TGA, for one, would "decode" random bytes).
Image.init()  # register every plugin now: Image.open(formats=...) needs them loaded
FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP") if f in Image.OPEN)
SMALL_SIDE = 32  # below this on a side an image is counted as small in the summary
_ORIENTATION = 0x0112


class Normalised(NamedTuple):
    data: bytes  # bytes to store
    ext: str  # ".jpg" (source copied) or ".png" (re-encoded)
    width: int
    height: int


def read_file(path: Path) -> bytes:
    """A file's bytes, or ImageDecodeError saying why it cannot be read."""
    try:
        return path.read_bytes()
    except PermissionError:
        raise ImageDecodeError(path, "unreadable: permission denied") from None
    except IsADirectoryError:
        raise ImageDecodeError(path, "unreadable: is a folder") from None
    except FileNotFoundError:
        raise ImageDecodeError(path, "unreadable: missing (broken link?)") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"unreadable: {exc.strerror or exc}") from None


def _open(data: bytes, name) -> Image.Image:
    if not data:
        raise ImageDecodeError(name, "empty file")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not an image") from None
    except Image.DecompressionBombError:
        raise ImageDecodeError(name, f"too large (over {2 * MAX_PIXELS:,} pixels)") from None
    except Exception:  # a plugin choking on a damaged header
        raise ImageDecodeError(name, "truncated or corrupt image") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(name, "truncated or corrupt image")
    if im.format not in ("JPEG", "MPO") and w * h > MAX_PIXELS:
        raise ImageDecodeError(name, f"too large ({w}x{h} pixels, limit {MAX_PIXELS:,})")
    return im


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    if max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = a.max(initial=0)
        # 16-bit data (0..65535) is scaled, 8-bit data stored in a wide mode is kept as is.
        if top > 255:
            a = a * (255.0 / (65535.0 if top <= 65535 else top))
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode in ("LA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # damaged EXIF: ignore it rather than lose the picture
        return 1


def _decode(im: Image.Image, name, max_side: int) -> Image.Image:
    try:
        if im.format in ("JPEG", "MPO") and max(im.size) > max_side:
            # Let libjpeg scale by 1/2, 1/4 or 1/8 while decoding: memory stays bounded.
            scale = max_side / max(im.size)
            im.draft(None, (math.ceil(im.size[0] * scale), math.ceil(im.size[1] * scale)))
        im.seek(0)  # animated GIF/WebP/MPO: the first frame
        im.load()
        orientation = _orientation(im)
        if orientation != 1:
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:
                pass
        im = _to_rgb(im)
        size = _fit(im.size, max_side)
        if size != im.size:
            im = im.resize(size, Image.Resampling.LANCZOS)
        return im
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageDecodeError(name, "too large to decode in memory") from None
    except Exception:
        raise ImageDecodeError(name, "truncated or corrupt image") from None


def _is_plain_jpeg(im: Image.Image, max_side: int) -> bool:
    # Checked on the freshly opened file: Pillow reports YCbCr JPEGs as mode RGB;
    # greyscale and CMYK ones are not RGB and get re-encoded.
    # MPO (camera JPEGs with extra pictures appended) starts with an ordinary JPEG that both
    # Pillow and TensorFlow decode as the first frame, so it counts as plain too.
    return im.format in ("JPEG", "MPO") and im.mode == "RGB" and max(im.size) <= max_side and _orientation(im) == 1


def encode_png(im: Image.Image) -> bytes:
    """Deterministic PNG bytes of an RGB image (no metadata, fixed compression)."""
    clean = Image.frombytes("RGB", im.size, im.tobytes())  # drops info such as ICC profiles
    buf = io.BytesIO()
    clean.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def normalise_bytes(data: bytes, name="<bytes>", max_side: int = MAX_SIDE) -> Normalised:
    """What the image store keeps for a file with these bytes (see the module docstring)."""
    with _open(data, name) as im:
        plain = _is_plain_jpeg(im, max_side)
        out = _decode(im, name, max_side)
        if plain:
            return Normalised(data, ".jpg", out.width, out.height)
        return Normalised(encode_png(out), ".png", out.width, out.height)


def normalise(path, max_side: int = MAX_SIDE) -> Normalised:
    """Decode `path` once: (bytes_to_store, ext, width, height); ImageDecodeError with a short reason."""
    path = Path(os.fspath(path))
    return normalise_bytes(read_file(path), path, max_side)
