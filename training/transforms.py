"""Histology augmentations shared by all encoders.

Tissue has no canonical orientation, so views are rotated by multiples of 90° and
flipped (the full dihedral group); stain varies between labs and scanners, so colour is
perturbed in H&E optical-density space (Tellez et al., 2018) rather than only with RGB
jitter. Crops, rotation and blur come from lightly/torchvision; only the HED jitter,
which no library provides for PIL pipelines, is written here.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torchvision.transforms as T
from lightly.transforms import GaussianBlur, RandomRotate
from lightly.transforms.multi_view_transform import MultiViewTransform
from PIL import Image

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in optical density.
_HED_FROM_RGB_OD = np.linalg.inv(
    np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
)
_RGB_OD_FROM_HED = np.linalg.inv(_HED_FROM_RGB_OD)


class HEDJitter:
    """Scale and shift each stain's optical density by a random factor per image."""

    def __init__(self, scale: float = 0.05, shift: float = 0.05) -> None:
        self.scale, self.shift = scale, shift

    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = np.asarray(image, dtype=np.float32) / 255.0
        od = -np.log(np.clip(rgb, 1e-3, 1.0))
        hed = od @ _HED_FROM_RGB_OD
        alpha = np.random.uniform(1 - self.scale, 1 + self.scale, size=3).astype(np.float32)
        beta = np.random.uniform(-self.shift, self.shift, size=3).astype(np.float32)
        od = (hed * alpha + beta) @ _RGB_OD_FROM_HED
        out = np.clip(np.exp(-od) * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(out)


def histology_view(
    size: int,
    scale: tuple[float, float],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    *,
    hed_strength: float = 0.05,
    color_jitter: float = 0.2,
    blur_prob: float = 0.5,
) -> Callable[[Image.Image], "object"]:
    """One augmented view: crop, D4 symmetry, stain and colour jitter, blur, normalise."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=scale, antialias=True),
            RandomRotate(prob=0.5, angle=90),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            HEDJitter(hed_strength, hed_strength),
            T.RandomApply([T.ColorJitter(color_jitter, color_jitter, color_jitter / 2, color_jitter / 10)], p=0.8),
            GaussianBlur(prob=blur_prob, sigmas=(0.1, 1.5)),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def multi_crop(
    global_size: int,
    local_size: int,
    n_local: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.1, 0.4),
    hed_strength: float = 0.05,
    color_jitter: float = 0.2,
) -> MultiViewTransform:
    """Two global views then `n_local` small local views, as in DINO and SwAV."""
    colour = dict(hed_strength=hed_strength, color_jitter=color_jitter)
    views = [histology_view(global_size, global_scale, mean, std, **colour) for _ in range(2)]
    views += [histology_view(local_size, local_scale, mean, std, blur_prob=0.2, **colour) for _ in range(n_local)]
    return MultiViewTransform(views)


def two_views(size: int, mean, std, scale=(0.2, 1.0), hed_strength: float = 0.05,
              color_jitter: float = 0.2) -> MultiViewTransform:
    """Two global views, as in SimCLR, Barlow Twins and NNCLR."""
    colour = dict(hed_strength=hed_strength, color_jitter=color_jitter)
    return MultiViewTransform([histology_view(size, scale, mean, std, **colour) for _ in range(2)])


def view_size(preset) -> int:
    """The size of a preset's training views (smaller than the served input when it says so)."""
    return preset.train_size or preset.input_size


def preset_two_views(preset, scale: tuple[float, float] = (0.2, 1.0)) -> MultiViewTransform:
    """`two_views` at a preset's view size, statistics and augmentation options (its own
    `crop_scale`, when it has one, over `scale`)."""
    o = preset.options
    return two_views(view_size(preset), preset.mean, preset.std, scale=tuple(o.get("crop_scale", scale)),
                     hed_strength=o["hed_strength"], color_jitter=o["color_jitter"])
