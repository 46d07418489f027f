"""Image files in memory, for uploads and decoding tests."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    """`image` saved in format `fmt` (Pillow's name, e.g. "PNG"), with Pillow's save `options`."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    """A PNG file of a uint8 pixel array."""
    return encode(Image.fromarray(pixels), "PNG")
