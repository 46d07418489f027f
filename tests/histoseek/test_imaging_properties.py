"""Properties of image decoding (hypothesis): whatever the bytes, the answer is an RGB
image or a HistoseekError, and the model input always has the contract's shape."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from PIL import Image

from histoseek.errors import HistoseekError
from histoseek.imaging import decode_image, resize_and_crop, to_rgb
from tests.images import encode

CHECKS = settings(max_examples=80, deadline=None)

# Modes an image file can hold, each with the formats that store it.
MODES = {
    "1": ["PNG", "TIFF", "BMP"], "L": ["PNG", "JPEG", "TIFF", "GIF", "BMP", "WEBP"], "LA": ["PNG", "TIFF"],
    "P": ["PNG", "GIF", "BMP", "TIFF"], "RGB": ["PNG", "JPEG", "TIFF", "BMP", "WEBP"], "RGBA": ["PNG", "TIFF", "WEBP"],
    "CMYK": ["JPEG", "TIFF"], "I;16": ["PNG", "TIFF"], "I": ["TIFF"], "F": ["TIFF"],
}


@st.composite
def images(draw) -> tuple[Image.Image, str]:
    mode = draw(st.sampled_from(sorted(MODES)))
    fmt = draw(st.sampled_from(MODES[mode]))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**32 - 1))
    rgba = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    if mode in ("I;16", "I", "F"):
        values = rgba[..., 0].astype(np.uint16) * 257 if mode != "F" else rgba[..., 0] / np.float32(255)
        image = Image.fromarray(values if mode != "I" else values.astype(np.int32))
    elif mode != "RGBA":
        image = image.convert(mode)
    return image, fmt


def assert_rgb(image: Image.Image, size: tuple[int, int]) -> None:
    assert image.mode == "RGB" and image.size == size
    assert np.asarray(image).dtype == np.uint8 and np.asarray(image).shape == (size[1], size[0], 3)


@CHECKS
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_raise_histoseek_error(data):
    try:
        image = decode_image(data, max_pixels=10_000)
    except HistoseekError as exc:
        assert str(exc)
    else:
        assert image.mode == "RGB" and image.size[0] * image.size[1] <= 10_000


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data", "ignore:Truncated File Read")  # Pillow, on damaged files
@CHECKS
@given(sample=images(), cut=st.floats(0, 1), flip=st.integers(0, 2**16))
def test_damaged_files_raise_histoseek_error(sample, cut, flip):
    """Valid files, truncated or with one byte changed: an image or a HistoseekError, nothing else."""
    data = bytearray(encode(*sample))
    data[flip % len(data)] ^= 0xFF
    for damaged in (bytes(data), bytes(data[: int(len(data) * cut)])):
        try:
            assert decode_image(damaged, max_pixels=10_000).mode == "RGB"
        except HistoseekError:
            pass


@CHECKS
@given(sample=images())
def test_valid_images_of_every_mode_decode_to_rgb_of_their_size(sample):
    image, fmt = sample
    assert_rgb(decode_image(encode(image, fmt)), image.size)


@CHECKS
@given(sample=images())
def test_to_rgb_keeps_the_size(sample):
    image, _ = sample
    assert_rgb(to_rgb(image), image.size)


@CHECKS
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=64))
@example(values=[0.0, -1.401298464324817e-45])  # a denormal range: 255/range overflowed float32
@example(values=[-3.4028234663852886e38, 3.4028234663852886e38])  # the widest range
def test_float_images_with_any_values_convert(values):
    array = np.array(values, np.float32).reshape(1, -1)
    rgb = np.asarray(to_rgb(Image.fromarray(array, "F")))
    finite = array[np.isfinite(array)]
    if finite.size and finite.max() > finite.min():  # the range is stretched to 0..255
        assert rgb.min() == 0 and rgb.max() == 255


@CHECKS
@given(width=st.integers(1, 300), height=st.integers(1, 300), size=st.integers(1, 64))
def test_resize_and_crop_always_gives_the_model_input_shape(width, height, size):
    model_input = resize_and_crop(Image.new("RGB", (width, height), (10, 20, 30)), size)
    assert model_input.shape == (size, size, 3) and model_input.dtype == np.uint8


def test_pixel_limit_is_checked_before_decoding():
    header_only = encode(Image.new("L", (4000, 3000)), "PNG")[:64]  # decoding it would fail: it is cut
    with pytest.raises(HistoseekError, match="4000x3000 pixels, more than the limit of 1,000,000"):
        decode_image(header_only, max_pixels=1_000_000)


def test_formats_outside_the_list_are_refused():
    for fmt in ("PPM", "ICO", "TGA"):
        with pytest.raises(HistoseekError, match="not a readable image.*send a PNG, JPEG or TIFF"):
            decode_image(encode(Image.new("RGB", (16, 16)), fmt))
