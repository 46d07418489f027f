"""Image decoding and the client-side preprocessing of the model contract.

The exported models take UINT8 `[N, S, S, 3]` RGB; everything before that (decoding,
conversion to RGB, resize of the shorter side to S and a centre crop) happens here, in
one place, so that training-time evaluation, export verification, index building and the
search server feed the encoders identical pixels.

Memory is bounded by the image, not by what is done to it: conversions that need the
whole image (the range of a 16-bit or float image) run in bands of rows, images much
larger than the model input are reduced by an integer factor first (JPEG while decoding,
through libjpeg's DCT scaling), and the crop is taken while resizing, so that a
1 x 100,000 strip never becomes 64 x 6,400,000 pixels.
"""
from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from histoseek.errors import HistoseekError

# Decompression-bomb guard: an H&E patch is a few megapixels at most; whole-slide
# images must be tiled with `histoseek data prepare`, not uploaded.
DEFAULT_MAX_PIXELS = 64_000_000
# The formats patches come in. Pillow opens some forty more, several through rarely
# audited decoders (EPS even runs Ghostscript): untrusted uploads never reach them.
FORMATS = ("PNG", "JPEG", "TIFF", "GIF", "BMP", "WEBP")  # JPEG covers MPO (multi-picture camera JPEGs)
_SEND = "send a PNG, JPEG or TIFF file"
JPEG_FORMATS = ("JPEG", "MPO")  # what Pillow reports for the JPEG decoder's files

# Images up to this size keep every pixel until the final resize (patches are far
# smaller, so their model input is what it always was). Larger ones, when decoded for a
# model, are first reduced by an integer factor that leaves at least twice the
# model's input (and the 128 px thumbnail) on the short side, so the resize still averages.
REDUCE_ABOVE_PIXELS = 4_000_000
_KEEP_SIDE = 256
_BAND_PIXELS = 1 << 18  # rows converted at once: a few MB of float64, whatever the image
_ORIENTATION = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the turn that makes it upright (as ImageOps)


class ImageTooLarge(HistoseekError):
    """More pixels than the caller accepts (decided from the header, before decoding)."""


class ImageShapeRefused(HistoseekError):
    """Sides so unequal that the image cannot be a patch (decided from the header)."""


class TooManyChunks(HistoseekError):
    """A PNG made of more chunks than any image needs (decided before Pillow reads them)."""


# Pillow reads every chunk of a PNG before its pixels (text, and each checked for its CRC),
# however many there are: 80,000 text chunks cost seconds before the first pixel. Real PNGs
# carry a handful of metadata chunks and image data in chunks of 8 KB or more, so a file of
# more than these is refused, by walking the chunk lengths alone (seeks, no CRC, no text).
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_META_CHUNKS = 1_000  # chunks other than IDAT
MAX_PNG_CHUNKS = 20_000  # all of them (20 MB in IDATs of 1 KB)


@dataclass(frozen=True)
class Header:
    format: str
    mode: str
    size: tuple[int, int]
    progressive: bool  # a JPEG whose decoder keeps every DCT coefficient of the image in memory


def keep_side(model_size: int | None) -> int:
    """The short side a large image is reduced to (at least) when decoded for a model of that input size."""
    return max(_KEEP_SIDE, 2 * (model_size or 0))


def _open(data: bytes | io.BufferedIOBase, *, trusted: bool, read_check: Callable[[], None] | None = None):
    """Open (header only) with the allow-listed decoders. `read_check` is called before
    each block the decoder reads, so that it can stop a decode (by raising)."""
    stream = _CheckedStream(data, read_check) if isinstance(data, bytes) else data
    if not trusted:
        return Image.open(stream, formats=FORMATS)
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # process-wide in Pillow; restored at once
    try:
        return Image.open(stream, formats=FORMATS)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


class _CheckedStream(io.BytesIO):
    """The bytes of an image, handed to Pillow's decoders with a check before each block."""

    def __init__(self, data: bytes, check: Callable[[], None] | None):
        super().__init__(data)
        self.check = check

    def read(self, size: int | None = -1) -> bytes:
        # Decoders take their input in blocks (64 KB) and do work in proportion to each, so
        # a stop is honoured within a block. (Returning less than asked for is not an
        # option: Pillow's PNG reader then loses the rest of the chunk.)
        if self.check is not None:
            self.check()
        return super().read(size)


def read_header(data: bytes | io.BufferedIOBase, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                max_aspect: float | None = None, name: str = "image") -> Header:
    """Format, mode and size from the header alone, with the limits checked; a clear error otherwise."""
    if max_pixels is not None:  # untrusted: bound what Pillow's PNG reader may be made to do
        _check_png_chunks(data, name)
    with _decoding_errors(name, max_pixels):
        with _open(data, trusted=max_pixels is None) as image:
            _check_shape(image, max_pixels, max_aspect, name)
            progressive = image.format in JPEG_FORMATS and bool(image.info.get("progressive"))
            return Header(image.format, image.mode, image.size, progressive)


def _check_png_chunks(data: bytes | io.BufferedIOBase, name: str) -> None:
    """Refuse a PNG of more chunks than an image needs (TooManyChunks), from their lengths;
    its cost is bounded by MAX_PNG_CHUNKS seeks whatever the file. Other formats pass."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    start = stream.tell()
    try:
        if stream.read(8) != PNG_SIGNATURE:
            return
        chunks = meta = 0
        while True:
            head = stream.read(8)
            if len(head) < 8:
                return  # truncated: Pillow says so
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            chunks += 1
            meta += kind != b"IDAT"
            if meta > MAX_PNG_META_CHUNKS or chunks > MAX_PNG_CHUNKS:
                raise TooManyChunks(
                    f"{name} is a PNG of more than {MAX_PNG_META_CHUNKS:,} metadata chunks or {MAX_PNG_CHUNKS:,} "
                    "chunks in all, which no image needs (text stuffed into it?); save it again without the "
                    "metadata, e.g. re-export it as a plain PNG or a JPEG")
            if kind == b"IEND":
                return
            stream.seek(length + 4, io.SEEK_CUR)  # data and CRC
    finally:
        stream.seek(start)


def _check_shape(image: Image.Image, max_pixels: int | None, max_aspect: float | None, name: str) -> None:
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"{name} is {width}x{height} pixels, more than the limit of {max_pixels:,}; "
                            "tile large images first (histoseek data prepare)")
    if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
        raise ImageShapeRefused(
            f"{name} is {width}x{height} pixels: one side is more than {max_aspect:g} times the other, which no "
            "tissue patch is; crop the region to search for (the search looks at a square from its centre)")


@contextmanager
def _decoding_errors(name: str, max_pixels: int | None) -> Iterator[None]:
    """Pillow's many failure types turned into one clear HistoseekError each."""
    try:
        with warnings.catch_warnings():
            # Our own limit replaces Pillow's warning; its hard error stays for untrusted
            # input and is lifted only for trusted files.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except HistoseekError:
        raise
    except UnidentifiedImageError as exc:
        raise HistoseekError(f"{name} is not a readable image (not {', '.join(FORMATS)}); {_SEND}") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name} has more than {max_pixels or 0:,} pixels; tile large images first "
                            "(histoseek data prepare)") from exc
    except MemoryError as exc:
        raise ImageTooLarge(f"{name} needs more memory to decode than is free; send a smaller image") from exc
    except Exception as exc:
        # Pillow's decoders fail on damaged files with many exception types (OSError,
        # SyntaxError, struct.error, EOFError, IndexError, ...): all mean the same here.
        raise HistoseekError(f"{name} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                             "re-export it and try again") from exc


def decode_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str = "image",
                 max_aspect: float | None = None, model_size: int | None = None,
                 check: Callable[[], None] | None = None) -> Image.Image:
    """Decode bytes to an upright RGB image, with a clear error for anything unusable.

    `max_pixels=None` is for trusted local sources (large BACH/BRACS/CRC images being
    tiled by `data prepare`): no pixel limit, Pillow's own bomb guard included.
    `model_size`: the image is only needed as that model's input (and a thumbnail), so
    one larger than REDUCE_ABOVE_PIXELS may be reduced (see keep_side). `check` is
    called between blocks of the decode and may raise to stop it.
    """
    if not data:
        raise HistoseekError(f"{name} is empty: {_SEND}")
    with _decoding_errors(name, max_pixels):
        image = _open(data, trusted=max_pixels is None, read_check=check)
        _check_shape(image, max_pixels, max_aspect, name)
        reduce_to = keep_side(model_size) if model_size and _pixels(image) > REDUCE_ABOVE_PIXELS else None
        if reduce_to and image.format in JPEG_FORMATS:
            image.draft(image.mode, (reduce_to, reduce_to))  # decode at 1/2, 1/4 or 1/8 scale
        image.load()
        orientation = image.getexif().get(_ORIENTATION, 1)
        image = _before_reduce(image, check or _go_on)
        if reduce_to:
            factor = min(image.size) // reduce_to
            if factor >= 2:
                image = _reduce(image, factor, check or _go_on)
        if orientation in _TRANSPOSE:
            image = image.transpose(_TRANSPOSE[orientation])
        return to_rgb(image)


def _pixels(image: Image.Image) -> int:
    return image.size[0] * image.size[1]


def _go_on() -> None:
    pass


def _reduce(image: Image.Image, factor: int, check: Callable[[], None]) -> Image.Image:
    """Image.reduce in bands of rows (a multiple of `factor` each, so the same pixels):
    reducing RGBA or LA converts it to premultiplied alpha, whole, first, which for a
    25-megapixel image would be another 100 MB."""
    width, height = image.size
    out = Image.new(image.mode, (-(-width // factor), -(-height // factor)))
    rows = factor * max(1, _BAND_PIXELS // (width * factor))
    for top in range(0, height, rows):
        check()
        out.paste(image.crop((0, top, width, min(top + rows, height))).reduce(factor), (0, top // factor))
    return out


def _before_reduce(image: Image.Image, check: Callable[[], None]) -> Image.Image:
    """Modes whose pixel values cannot be averaged (palette indices, 16-bit and float ranges
    still to be stretched, bilevel) turned into ones that can, at the least memory."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _stretch_to_l(image, check)
    if image.mode in ("P", "PA"):
        return image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    if image.mode == "1":
        return image.convert("L")
    return image


def _stretch_to_l(image: Image.Image, check: Callable[[], None] = _go_on) -> Image.Image:
    """High bit-depth microscopy exports: the actual (finite) range rescaled to 0..255, in
    bands of rows, so that the float64 arithmetic never holds more than a band."""
    # float64: a float32 image's range can be anything from a denormal (1e-45, whose
    # 255/range overflows float32) to 6.8e38 (which overflows float32 when shifted).
    width, height = image.size
    rows = max(1, _BAND_PIXELS // max(width, 1))
    bands = [(top, min(top + rows, height)) for top in range(0, height, rows)]

    def band(top: int, bottom: int) -> np.ndarray:
        return np.asarray(image.crop((0, top, width, bottom)), dtype=np.float64)

    lo, hi = np.inf, -np.inf
    for top, bottom in bands:
        check()
        values = band(top, bottom)
        finite = values[np.isfinite(values)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if lo > hi:  # nothing finite at all
        lo = hi = 0.0
    scale = 255 / (hi - lo) if hi > lo else 0.0
    out = np.empty((height, width), np.uint8)
    for top, bottom in bands:
        check()
        values = band(top, bottom)
        np.nan_to_num(values, copy=False, nan=lo, posinf=hi, neginf=lo)
        scaled = np.clip((values - lo) * scale, 0, 255)
        out[top:bottom] = np.rint(scaled, out=scaled)
    return Image.fromarray(out, "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (greyscale, 16-bit, float, RGBA, CMYK, palette) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _stretch_to_l(image).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent regions become white, the colour of empty glass in brightfield.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path | str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               model_size: int | None = None) -> Image.Image:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HistoseekError(f"cannot read {path}: {exc.strerror}") from exc
    return decode_image(data, max_pixels=max_pixels, name=str(path), model_size=model_size)


def resize_and_crop(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size`, centre-crop to a square: uint8 `[size, size, 3]`.

    The resized whole is kept to at most 16 model inputs: a longer image (a strip) is
    cropped by the resize itself (its `box`), which samples the same source positions as
    resizing the whole and cropping (within a rounding step), without ever holding the whole."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if new_w * new_h > 16 * size * size:
        # Output pixel x samples the source at (x + left + 0.5) * width / new_w - 0.5, as the full resize would.
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    else:
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).reshape(size, size, 3)


def load_model_input(path: Path | str, size: int) -> np.ndarray:
    return resize_and_crop(load_image(path, model_size=size), size)
