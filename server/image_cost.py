"""What decoding an upload will cost, from its header, before any of it is paid.

Memory: the bytes Pillow allocates for the decoded image and for the conversions that
follow (see histoseek/imaging.py for their order), as an upper bound, so that the decode
budget (server/api/admission.py) can hold N concurrent decodes under the configured total.
CPU: a progressive JPEG is decoded once per scan over the whole image; encoders write
10 or so, a crafted file a thousand (14 s for 162 KB), so the scans are counted first.
"""
from __future__ import annotations

import re

from histoseek.errors import HistoseekError
from histoseek.imaging import JPEG_FORMATS, REDUCE_ABOVE_PIXELS, Header, keep_side

# Pillow keeps 8-bit single-band images in 1 byte a pixel, 16-bit in 2, everything else
# (RGB included) in 4.
_ONE_BYTE, _TWO_BYTES = {"1", "L", "P"}, {"I;16", "I;16B", "I;16L", "I;16N"}
_HIGH_RANGE = _TWO_BYTES | {"I", "F"}
# Decoders that hold a second copy while decoding: libtiff's strip or tile buffers (a
# strip may be the whole image), libwebp's own output buffer.
_DOUBLE_BUFFERED = {"TIFF", "WEBP"}
_SLACK = 4_000_000  # decoder state, the model input, the thumbnail, a band of rows

MAX_JPEG_SCANS = 64
# After a scan's header, the next marker: 0xFF followed by anything but a stuffed zero,
# a restart marker (they stay inside the scan) or another fill 0xFF.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _bytes_per_pixel(mode: str) -> int:
    return 1 if mode in _ONE_BYTE else 2 if mode in _TWO_BYTES else 4


def decode_bytes(header: Header, model_size: int) -> int:
    """An upper bound of the memory `decode_image(..., model_size=)` plus the resize allocate."""
    width, height = header.size
    pixels = width * height
    keep = keep_side(model_size)
    reduces = pixels > REDUCE_ABOVE_PIXELS and min(width, height) >= 2 * keep
    scale = 1  # libjpeg's DCT scaling (Image.draft)
    if reduces and header.format in JPEG_FORMATS:
        scale = next(s for s in (8, 4, 2, 1) if min(width, height) // s >= keep)
    decoded_w, decoded_h = -(-width // scale), -(-height // scale)
    decoded = decoded_w * decoded_h
    cost = decoded * _bytes_per_pixel(header.mode) * (2 if header.format in _DOUBLE_BUFFERED else 1)
    if header.progressive:  # every DCT coefficient (2 bytes) of every component, kept until the end
        cost += 2 * pixels * (1 if header.mode == "L" else 3)
    # Conversions before the reduce, at full size: a stretched range to 1 byte a pixel
    # (bands of float64 on top, in _SLACK), palette and bilevel images to 4 or 1.
    if header.mode in _HIGH_RANGE:
        cost += decoded
    elif header.mode in ("P", "PA"):
        cost += 4 * decoded
    elif header.mode == "1":
        cost += decoded
    # After it, on what is left: up to four RGBA-sized copies (alpha compositing) and a transposition.
    left = decoded
    if reduces:
        factor = max(1, min(decoded_w, decoded_h) // keep)
        left = -(-decoded_w // factor) * -(-decoded_h // factor)
    return cost + 5 * 4 * left + _SLACK


def jpeg_scans(data: bytes, stop_after: int = MAX_JPEG_SCANS) -> int:
    """Scans of the first image of a JPEG file (counting stops once past `stop_after`)."""
    pos, scans = 2, 0
    while pos + 4 <= len(data) and scans <= stop_after:
        if data[pos] != 0xFF:
            break  # not a marker where one must be: the decoder will say the file is corrupt
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:  # start of scan: its entropy-coded data runs to the next marker
            scans += 1
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return scans


def check_scans(data: bytes, name: str) -> None:
    """Refuse a JPEG of more than MAX_JPEG_SCANS scans (anything else passes)."""
    if data[:2] == b"\xff\xd8" and jpeg_scans(data) > MAX_JPEG_SCANS:
        raise HistoseekError(
            f"{name} is a JPEG of more than {MAX_JPEG_SCANS} scans, each of which costs a pass over the whole "
            "image; encoders write about 10. Re-save it as a baseline JPEG or a PNG")
