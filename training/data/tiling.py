"""Cutting source images into tiles, measuring how much tissue a tile holds, and
Macenko stain normalisation (torchstain, numpy backend)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from histoseek.errors import HistoseekError
from histoseek.imaging import load_image

# A pixel is tissue when some channel has an optical density of at least 0.15, i.e. it is
# darker than 255*exp(-0.15) ~ 219 in some channel; bright, near-white glass is not.
# Macenko uses the same cut-off (beta = 0.15) to discard transparent pixels.
TISSUE_OD = 0.15
_TISSUE_MAX_CHANNEL_MIN = 255.0 * np.exp(-TISSUE_OD)
# Macenko estimates two stain vectors from the tissue pixels' OD covariance; with too
# few of them the estimate is noise (or numpy fails outright).
_MIN_STAIN_PIXELS = 500


@dataclass(frozen=True)
class Tile:
    x: int  # top-left corner in the source image, pixels
    y: int
    pixels: np.ndarray  # uint8 [tile, tile, 3]


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean [H, W]: pixels that are not background (see TISSUE_OD)."""
    return rgb.min(axis=-1) < _TISSUE_MAX_CHANNEL_MIN


def tissue_fraction(rgb: np.ndarray) -> float:
    return float(tissue_mask(rgb).mean()) if rgb.size else 0.0


def tile_positions(width: int, height: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of every full tile on a regular grid; a strip narrower than a tile at
    the right or bottom edge is left out (a padded tile would be mostly artificial border)."""
    return [(x, y) for y in range(0, height - tile + 1, stride) for x in range(0, width - tile + 1, stride)]


def iter_tiles(rgb: np.ndarray, tile: int, stride: int) -> Iterator[Tile]:
    height, width = rgb.shape[:2]
    for x, y in tile_positions(width, height, tile, stride):
        yield Tile(x, y, rgb[y : y + tile, x : x + tile])


def resize_shorter_side(rgb: np.ndarray, size: int) -> np.ndarray:
    """Scale so that the shorter side is `size` pixels, keeping the aspect ratio."""
    height, width = rgb.shape[:2]
    scale = size / min(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size == (width, height):
        return rgb
    # Bilinear, as histoseek.imaging uses for queries (Pillow antialiases when shrinking).
    return np.asarray(Image.fromarray(rgb).resize(new_size, Image.Resampling.BILINEAR))


class StainNormalizer:
    """Macenko normalisation to the stain appearance of one reference image."""

    def __init__(self, reference: Path):
        import torchstain  # imported here: only `--stain-norm` needs it

        self.reference = Path(reference)
        target = np.asarray(load_image(self.reference))
        self._normalizer = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        try:
            _checked(self._normalizer.fit, target)
        except ValueError as exc:
            raise HistoseekError(
                f"cannot estimate stain vectors from the reference {self.reference} ({exc}); "
                "choose a reference image that is mostly H&E-stained tissue"
            ) from exc

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """The normalised tile; raises ValueError when the tile's stains cannot be estimated."""
        normalized, _, _ = _checked(self._normalizer.normalize, rgb, stains=False)
        return normalized


def _checked(method, rgb: np.ndarray, **kwargs):
    """Run a torchstain call, turning its numeric failures (too little tissue, degenerate
    colours: NaNs, empty percentiles, singular matrices) into ValueError."""
    od = -np.log((rgb.reshape(-1, 3).astype(float) + 1) / 240)  # torchstain's Io=240
    stained = int(np.all(od >= TISSUE_OD, axis=1).sum())
    if stained < _MIN_STAIN_PIXELS:
        raise ValueError(f"only {stained} stained pixels, need {_MIN_STAIN_PIXELS}")
    try:
        with np.errstate(divide="raise", invalid="raise", over="raise", under="ignore"):
            result = method(rgb, **kwargs)
    except (FloatingPointError, np.linalg.LinAlgError, IndexError, ValueError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    return result
