"""One database image made ready for the index: the model's input and the stored thumbnail.

Shared by the single-process build and the Ray tasks, so that both decode an image exactly
as the server decodes a query of it and their vectors are identical.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from histoseek.imaging import load_image, resize_and_crop
from server.index.store import thumbnail_jpeg


def prepare_file(path: Path, size: int) -> tuple[np.ndarray, bytes]:
    """(UINT8 model input of `size`², JPEG thumbnail) of the image at `path`."""
    image = load_image(path, model_size=size)
    return resize_and_crop(image, size), thumbnail_jpeg(image)
