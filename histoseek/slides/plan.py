"""Which tiles of a slide to cut, and which of them form its mosaic, from its low level only.

Both `data prepare --format slides` and slide search (a query slide becomes its mosaic)
plan a slide the same way: tissue mask at ~8 µm/px, a grid of tiles of `tile` px at the
target µm/px whose footprint the mask covers enough, and the Yottixel mosaic chosen from
the tiles' mean colours in that same low level. No full-resolution pixel is read to plan,
so planning a 100,000 x 100,000 px slide costs one small image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histoseek.slides.mosaic import MINIMUM, SHARE, select_mosaic
from histoseek.slides.reader import Slide, TileReading
from histoseek.slides.tissue_mask import MASK_MPP, tissue_mask

MASK_FRACTION = 0.5  # share of a tile's footprint the tissue mask must cover


@dataclass(frozen=True)
class SlidePlan:
    tile: int  # px of a written tile
    mpp: float  # µm per px of a written tile
    reading: TileReading  # level, pixels read there, level-0 footprint
    positions: np.ndarray  # int64 [N, 2]: level-0 (x, y) of each tile's top-left corner
    mosaic: np.ndarray  # int64 [M]: indices into positions
    mask: np.ndarray  # the tissue mask
    mask_scale: float  # level-0 px per mask pixel

    def in_mosaic(self) -> np.ndarray:
        flags = np.zeros(len(self.positions), bool)
        flags[self.mosaic] = True
        return flags


def plan_slide(slide: Slide, tile: int, mpp: float, *, mask_fraction: float = MASK_FRACTION,
               share: float = SHARE, minimum: int = MINIMUM, max_overview_pixels: int | None = None) -> SlidePlan:
    reading = slide.tiling(tile, mpp)
    overview, scale = slide.level_at(MASK_MPP, max_overview_pixels)
    mask = tissue_mask(overview, slide.mpp * scale)
    width, height = slide.dimensions
    step = reading.footprint
    xs, ys = np.arange(0, width - step + 1, step), np.arange(0, height - step + 1, step)
    # Mask coverage and mean colour of every grid cell, from box sums over the low level.
    cover = _box_means(mask, xs, ys, step, scale)
    colours = np.stack([_box_means(overview[..., c], xs, ys, step, scale) for c in range(3)], -1)
    keep = cover >= mask_fraction
    rows, cols = np.nonzero(keep)
    positions = np.stack([xs[cols], ys[rows]], axis=1).astype(np.int64)
    mosaic = select_mosaic(colours[rows, cols], positions, share=share, minimum=minimum)
    return SlidePlan(tile, mpp, reading, positions, mosaic, mask, scale)


def _box_means(values: np.ndarray, xs: np.ndarray, ys: np.ndarray, step: int, scale: float) -> np.ndarray:
    """Mean of `values` (a low-level image) over each level-0 square (x, y, step) -> [len(ys), len(xs)]."""
    # float64: a float32 running sum over millions of pixels loses whole units.
    h, w = values.shape
    integral = np.zeros((h + 1, w + 1), np.float64)
    np.cumsum(values, axis=0, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])

    def edges(starts: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        low = np.clip((starts / scale).astype(np.int64), 0, limit - 1)
        high = np.clip(np.round((starts + step) / scale).astype(np.int64), low + 1, limit)
        return low, high

    x0, x1 = edges(xs, w)
    y0, y1 = edges(ys, h)
    total = (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0])
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return total / area
