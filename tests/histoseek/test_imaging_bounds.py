"""Decoding bounded by the image, not by what is done to it (histoseek/imaging.py), and the
server's estimate of what a decode costs (server/image_cost.py).

The pixels a patch feeds the model are those of before (resize of the whole, then crop);
only strips longer than 16:1 are cropped by the resize's box (within one grey level), and
only images over 4 megapixels are reduced first.
"""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from histoseek.errors import HistoseekError
from histoseek.imaging import (REDUCE_ABOVE_PIXELS, ImageShapeRefused, ImageTooLarge, _reduce, _stretch_to_l,
                               decode_image, read_header, resize_and_crop)
from server.index.fields import MAX_ID, InvalidField, NoSuchId, item_id, text_field, upload_name
from server.image_cost import MAX_JPEG_SCANS, check_scans, decode_bytes, jpeg_scans
from tests.images import encode


def whole_then_crop(image: Image.Image, size: int) -> np.ndarray:
    """The model input as it was always made: resize the whole, then crop."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rgba = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode)


@pytest.mark.parametrize("width, height, size", [(64, 64, 8), (300, 200, 64), (97, 1500, 64), (1024, 1024, 224),
                                                 (17, 16 * 17, 17), (48, 3, 8)])
def test_model_input_of_patches_is_unchanged(width, height, size):
    image = noise(width, height)
    assert np.array_equal(resize_and_crop(image, size), whole_then_crop(image, size))


@pytest.mark.parametrize("width, height, size", [(1, 1000, 8), (3, 5000, 64), (2000, 20, 224), (40, 1000, 64)])
def test_strips_are_cropped_by_the_resize_within_one_level(width, height, size):
    image = noise(width, height)
    difference = np.abs(resize_and_crop(image, size).astype(int) - whole_then_crop(image, size))
    assert difference.max() <= 1


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "CMYK"])
@pytest.mark.parametrize("width, height, factor", [(1001, 777, 3), (5000, 53, 2), (640, 4000, 7)])
def test_banded_reduce_is_pillows_reduce(mode, width, height, factor):
    image = noise(width, height, mode)
    assert np.array_equal(np.asarray(_reduce(image, factor, lambda: None)), np.asarray(image.reduce(factor)))


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_banded_range_stretch_is_the_whole_image_one(mode):
    values = np.random.default_rng(1).integers(0, 60000, (1100, 700)).astype(np.float32)
    values[3, 4], values[900, 10] = np.nan, np.inf
    array = values if mode == "F" else np.nan_to_num(values, posinf=60000).astype(np.uint16 if mode == "I;16" else np.int32)
    image = Image.fromarray(array) if mode != "I" else Image.fromarray(array, "I")
    whole = np.array(image, dtype=np.float64)
    finite = whole[np.isfinite(whole)]
    lo, hi = finite.min(), finite.max()
    expected = np.rint(np.clip((np.nan_to_num(whole, nan=lo, posinf=hi, neginf=lo) - lo) * (255 / (hi - lo)), 0, 255))
    assert np.array_equal(np.asarray(_stretch_to_l(image)), expected.astype(np.uint8))


def test_large_images_are_reduced_when_decoded_for_a_model():
    data = encode(noise(2500, 2000), "PNG")
    assert decode_image(data).size == (2500, 2000)  # for training: every pixel
    assert decode_image(data, model_size=64).size == (358, 286)  # reduced by 7: the short side stays >= 256
    small = encode(noise(1500, 1200), "PNG")  # under REDUCE_ABOVE_PIXELS: untouched
    assert 1500 * 1200 < REDUCE_ABOVE_PIXELS and decode_image(small, model_size=64).size == (1500, 1200)


def test_large_jpegs_are_decoded_at_a_smaller_scale():
    data = encode(Image.new("RGB", (4000, 3000), (120, 60, 90)), "JPEG")
    image = decode_image(data, model_size=224)  # keep 448 px: libjpeg's 1/4 scale gives 750 px, then reduce 1
    assert image.size == (1000, 750)


def test_exif_orientation_survives_the_reduce():
    upright = noise(2400, 1800)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to display
    data = encode(upright.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif.tobytes())
    assert decode_image(data, model_size=64).size[0] > decode_image(data, model_size=64).size[1]


def test_header_limits():
    with pytest.raises(ImageTooLarge, match="is 6000x5000 pixels, more than the limit of 25,000,000"):
        read_header(encode(Image.new("1", (6000, 5000)), "PNG"), max_pixels=25_000_000)
    with pytest.raises(ImageShapeRefused, match="is 2100x100 pixels: one side is more than 20 times the other"):
        read_header(encode(Image.new("L", (2100, 100)), "PNG"), max_aspect=20)
    assert read_header(encode(Image.new("L", (2000, 100)), "PNG"), max_aspect=20).size == (2000, 100)
    with pytest.raises(HistoseekError, match="not a readable image"):
        read_header(io.BytesIO(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n"))


def test_a_stop_request_stops_the_decode():
    calls = []

    def stop_at_second_block():
        calls.append(1)
        if len(calls) > 1:
            raise HistoseekError("stopped")

    data = encode(noise(2000, 1000), "PNG")  # ~8 MB: many 64 KB blocks
    with pytest.raises(HistoseekError, match="stopped"):
        decode_image(data, check=stop_at_second_block)


def progressive(mode: str = "L", extra_scans: int = 0) -> bytes:
    data = encode(Image.new(mode, (64, 64), 100 if mode == "L" else (100, 50, 20)), "JPEG", progressive=True)
    last, end = [m.start() for m in re.finditer(rb"\xff\xda", data)][-1], data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * extra_scans + data[end:]


def test_jpeg_scans_are_counted():
    assert jpeg_scans(encode(Image.new("RGB", (64, 64)), "JPEG")) == 1
    assert jpeg_scans(progressive("L")) == 6 and jpeg_scans(progressive("RGB")) == 10  # libjpeg's scripts
    exif = Image.Exif()
    exif[0x010E] = "\xff\xda" * 20  # marker bytes inside a segment are not scans
    assert jpeg_scans(encode(Image.new("RGB", (64, 64)), "JPEG", exif=exif.tobytes())) == 1
    check_scans(progressive("L", MAX_JPEG_SCANS - 6), "ok.jpg")
    with pytest.raises(HistoseekError, match=f"more than {MAX_JPEG_SCANS} scans"):
        check_scans(progressive("L", MAX_JPEG_SCANS - 5), "bomb.jpg")


@pytest.mark.parametrize("mode, fmt, low, high", [
    ("RGBA", "PNG", 100, 115), ("P", "PNG", 125, 140), ("I;16", "PNG", 75, 90), ("L", "PNG", 25, 40),
    ("RGB", "JPEG", 0, 15),  # drafted at 1/8: 625 x 625
])
def test_decode_cost_of_25_megapixels(mode, fmt, low, high):
    header = read_header(encode(Image.new(mode, (5000, 5000)), fmt), max_pixels=None)
    assert low * 1e6 <= decode_bytes(header, 224) <= high * 1e6


def test_item_ids_and_text_fields():
    assert item_id("0") == 0 and item_id(str(MAX_ID)) == MAX_ID
    for bad in ("1_0", "+3", " 5", "٣", "0x1", "", "1.0"):
        with pytest.raises(InvalidField):
            item_id(bad)
    for absent in (str(MAX_ID + 1), "-1"):
        with pytest.raises(NoSuchId):
            item_id(absent)
    assert text_field("label", "invasive carcinoma", "--label") == "invasive carcinoma"
    for bad in ("", "  ", "a\x00", "a\u2028b", "x" * 201):
        with pytest.raises(InvalidField):
            text_field("label", bad, "--label")
    assert upload_name("a\r\nb.png") == "a??b.png" and upload_name(None) == "image" and len(upload_name("n" * 999)) == 200
