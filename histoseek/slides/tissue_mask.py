"""Tissue mask of a slide from one low-resolution level (as CLAM and Yottixel do).

Tissue is stained (saturated) and absorbs light (optical density above glass); glass is
bright and grey. A pixel is tissue when its HSV saturation is above Otsu's threshold of the
slide's own saturations (floored, so an empty slide stays empty) and its mean optical
density is above that of clean glass. Pen marks are saturated too; they are not removed.
Then small holes are filled (lumens and fat inside tissue stay tissue) and specks (dust,
debris) removed, both sized in µm² so the mask behaves alike at every level.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

MASK_MPP = 8.0  # µm/px of the level the mask is made on (~1.25x: Yottixel's choice)
MIN_SATURATION = 0.05  # floor of the Otsu threshold: below it, background by any measure
MIN_OD = 0.03  # mean optical density of clean glass stays below this
SPECK_UM2 = 20_000  # tissue pieces smaller than ~0.14 x 0.14 mm (dust, debris) are dropped
HOLE_UM2 = 50_000  # holes smaller than this inside tissue are filled


def tissue_mask(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Boolean [h, w] tissue mask of an RGB uint8 overview whose pixels are `mpp` µm wide."""
    # uint8 and float32 one channel at a time: a 2048 px overview stays ~100 MB of work.
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    saturation = (high - low).astype(np.float32)
    saturation /= np.maximum(high, 1)
    del low
    od = np.zeros(rgb.shape[:2], np.float32)
    for channel in range(3):
        od -= np.log((rgb[..., channel].astype(np.float32) + 1.0) / 256.0)
    od /= 3
    threshold = max(MIN_SATURATION, _otsu(saturation))
    mask = (saturation > threshold) & (od > MIN_OD)
    del saturation, od
    pixel_um2 = mpp * mpp
    mask = _remove_small(mask, SPECK_UM2 / pixel_um2)
    holes = ~mask
    return mask | ~_remove_small(holes, HOLE_UM2 / pixel_um2, keep_border=True)


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]: the cut that best separates two populations."""
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(counts)
    weight1 = weight0[-1] - weight0
    mean0 = np.cumsum(counts * centres) / np.maximum(weight0, 1)
    mean1 = (np.sum(counts * centres) - np.cumsum(counts * centres)) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[1:][np.argmax(between)])


def _remove_small(mask: np.ndarray, min_pixels: float, keep_border: bool = False) -> np.ndarray:
    """`mask` without its connected pieces smaller than `min_pixels` (with `keep_border`,
    pieces touching the border stay whatever their size: background around the tissue)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    if keep_border:
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        keep[border[border > 0]] = True
    return keep[labels]
