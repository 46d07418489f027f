"""The hand-written H&E stain jitter and the multi-crop views built on lightly/torchvision."""
import numpy as np
import torch
from PIL import Image

from training.transforms import HEDJitter, multi_crop


def _tile() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(60, 250, size=(48, 48, 3), dtype=np.uint8))


def test_zero_strength_stain_jitter_is_the_identity():
    tile = _tile()
    out = np.asarray(HEDJitter(0.0, 0.0)(tile)).astype(int)
    assert np.abs(out - np.asarray(tile).astype(int)).max() <= 1  # only rounding


def test_stain_jitter_changes_colour_not_structure():
    tile = _tile()
    np.random.seed(1)
    out = np.asarray(HEDJitter(0.3, 0.3)(tile)).astype(float)
    original = np.asarray(tile).astype(float)
    assert out.shape == original.shape
    assert np.abs(out - original).mean() > 2  # the colour moved …
    # … but pixel order (the texture) is kept: intensities stay strongly correlated.
    assert np.corrcoef(out.mean(axis=2).ravel(), original.mean(axis=2).ravel())[0, 1] > 0.8


def test_multi_crop_gives_two_global_then_local_views():
    views = multi_crop(64, 32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(_tile())
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    assert all(v.dtype == torch.float32 for v in views)
