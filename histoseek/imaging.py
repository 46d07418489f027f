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


def decode_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """Decode bytes to an RGB image, with a clear error for anything unusable.

    `max_pixels=None` is for trusted local sources (large BACH/BRACS/CRC images being
    tiled by `data prepare`): no pixel limit, Pillow's own bomb guard included.
    """
    if not data:
        raise HistoseekError(f"{name} is empty: send a PNG, JPEG or TIFF file")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's warning; its hard error stays for
            # untrusted input and is lifted only for trusted files.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open_trusted(data) if max_pixels is None else Image.open(io.BytesIO(data))
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise HistoseekError(
                    f"{name} is {width}x{height} pixels, more than the limit of {max_pixels:,}; "
                    "tile large images first (histoseek data prepare)"
                )
            image.load()
    except HistoseekError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise HistoseekError(f"{name} is not a readable image ({exc}); send a PNG, JPEG or TIFF file") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise HistoseekError(f"{name} is corrupt or truncated ({exc}); re-export it and try again") from exc
    return to_rgb(ImageOps.exif_transpose(image))


def _open_trusted(data: bytes) -> Image.Image:
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # process-wide in Pillow; restored at once
    try:
        return Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (greyscale, 16-bit, float, RGBA, CMYK, palette) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit-depth microscopy exports: rescale the actual range to 0..255.
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
        scaled = np.zeros_like(array) if hi <= lo else (array - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.nan_to_num(scaled).astype(np.uint8)).convert("RGB")
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
