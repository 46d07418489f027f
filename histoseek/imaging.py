"""Image decoding and the client-side preprocessing of the model contract.

The exported models take UINT8 `[N, S, S, 3]` RGB; everything before that (decoding,
conversion to RGB, resize of the shorter side to S and a centre crop) happens here, in
one place, so that training-time evaluation, export verification, index building and the
search server feed the encoders identical pixels.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from histoseek.errors import HistoseekError

# Decompression-bomb guard: an H&E patch is a few megapixels at most; whole-slide
# images must be tiled with `histoseek data prepare`, not uploaded.
DEFAULT_MAX_PIXELS = 64_000_000
# The formats patches come in. Pillow opens some forty more, several through rarely
# audited decoders (EPS even runs Ghostscript): untrusted uploads never reach them.
FORMATS = ("PNG", "JPEG", "TIFF", "GIF", "BMP", "WEBP")  # JPEG covers MPO (multi-picture camera JPEGs)
_SEND = "send a PNG, JPEG or TIFF file"


def decode_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """Decode bytes to an RGB image, with a clear error for anything unusable.

    `max_pixels=None` is for trusted local sources (large BACH/BRACS/CRC images being
    tiled by `data prepare`): no pixel limit, Pillow's own bomb guard included.
    """
    if not data:
        raise HistoseekError(f"{name} is empty: {_SEND}")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's warning; its hard error stays for
            # untrusted input and is lifted only for trusted files.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open_trusted(data) if max_pixels is None else Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise HistoseekError(
                    f"{name} is {width}x{height} pixels, more than the limit of {max_pixels:,}; "
                    "tile large images first (histoseek data prepare)"
                )
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except HistoseekError:
        raise
    except UnidentifiedImageError as exc:
        raise HistoseekError(f"{name} is not a readable image (not {', '.join(FORMATS)}); {_SEND}") from exc
    except Image.DecompressionBombError as exc:
        raise HistoseekError(f"{name} is not a readable image ({exc}); {_SEND}") from exc
    except Exception as exc:
        # Pillow's decoders fail on damaged files with many exception types (OSError,
        # SyntaxError, struct.error, EOFError, IndexError, ...): all mean the same here.
        raise HistoseekError(f"{name} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                             "re-export it and try again") from exc


def _open_trusted(data: bytes) -> Image.Image:
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # process-wide in Pillow; restored at once
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (greyscale, 16-bit, float, RGBA, CMYK, palette) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # High bit-depth microscopy exports: rescale the actual (finite) range to 0..255.
        # float64: a float32 image's range can be anything from a denormal (1e-45, whose
        # 255/range overflows float32) to 6.8e38 (which overflows float32 when shifted).
        array = np.array(image, dtype=np.float64)
        finite = array[np.isfinite(array)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        np.nan_to_num(array, copy=False, nan=lo, posinf=hi, neginf=lo)
        scale = 255 / (hi - lo) if hi > lo else 0.0
        scaled = np.clip((array - lo) * scale, 0, 255)
        return Image.fromarray(np.rint(scaled, out=scaled).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent regions become white, the colour of empty glass in brightfield.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path | str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HistoseekError(f"cannot read {path}: {exc.strerror}") from exc
    return decode_image(data, max_pixels=max_pixels, name=str(path))


def resize_and_crop(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size`, centre-crop to a square: uint8 `[size, size, 3]`."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).reshape(size, size, 3)


def load_model_input(path: Path | str, size: int) -> np.ndarray:
    return resize_and_crop(load_image(path), size)
