"""`histoseek data synth --slides N`: synthetic whole slides that OpenSlide opens as real ones.

Each slide is a pyramidal tiled TIFF (tifffile: 256 px tiles, zlib, resolution tags in
pixels per centimetre, reduced levels marked as such), which OpenSlide reads as a
`generic-tiff` slide with `openslide.mpp-x` = the written µm/px. On grey-white glass lie a
few elliptical pieces of tissue of the slide's label (a class of training/data/synthetic.py)
and one smaller piece of another class, as a real section holds more than its diagnosis.

The tissue is a mosaic of `BLOCK`-px texture tiles rendered by synthetic.render_tile with
the slide's own stain, on a level-0 grid: a tile cut at level 0 on that grid is exactly one
rendered tile, so an encoder trained on synthetic tiles sees what it knows. Which class
(or glass) a pixel shows comes from a class map at 1/`CELL` of level 0, which is also the
ground truth the tests check tissue masks against. Every level is rendered from the same
class map and texture bank (reduced), tile by tile, so a 40,000 x 40,000 px slide is
written in constant memory.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from histoseek import atomic
from histoseek.errors import HistoseekError
from training.data.folders import check_output_folder
from training.data.synthetic import CLASS_NAMES, render_tile, sample_stain

BLOCK = 128  # level-0 px of one rendered texture tile
CELL = 16  # level-0 px of one class-map cell
TIFF_TILE = 256
BANK = 6  # texture tiles per class and slide
LEVEL_FACTOR = 4  # each level 4x smaller, as in most scanners' files
GLASS = np.array([242.0, 240.0, 243.0])
# Classes whose tissue is pale (fat, mucus) are left out of slides: fat is mostly glass to
# any saturation-based tissue detector, real or synthetic (a known limit, see the README).
SLIDE_CLASSES = tuple(name for name in CLASS_NAMES if name not in ("adipose", "mucus"))
LABELS_FILE = "labels.csv"


@dataclass(frozen=True)
class SyntheticSlide:
    label: str
    other: str  # the class of the smaller second piece
    width: int
    height: int
    mpp: float
    class_map: np.ndarray  # uint8 [height/CELL, width/CELL]: 0 glass, 1 label, 2 other
    choice: np.ndarray  # int [height/BLOCK, width/BLOCK]: bank tile of each block
    banks: np.ndarray  # uint8 [3, BANK, BLOCK, BLOCK, 3]: glass, label, other

    @property
    def levels(self) -> list[tuple[int, int, int]]:
        """(downsample, width, height) per level: down to ~64 px or 2 px texture blocks."""
        levels, downsample = [(1, self.width, self.height)], LEVEL_FACTOR
        while min(self.width, self.height) // downsample >= 64 and BLOCK // downsample >= 2:
            levels.append((downsample, self.width // downsample, self.height // downsample))
            downsample *= LEVEL_FACTOR
        return levels

    def tissue(self, scale: int = CELL) -> np.ndarray:
        """Ground-truth tissue mask at 1/`scale` of level 0 (a multiple of CELL)."""
        step = scale // CELL
        return self.class_map[::step, ::step] > 0

    def render(self, downsample: int, x: int, y: int, width: int, height: int,
               banks: np.ndarray | None = None) -> np.ndarray:
        """RGB of the region (x, y, width, height) in pixels of the level `downsample`."""
        banks = self.reduced_banks(downsample) if banks is None else banks
        block = banks.shape[2]
        rows, cols = np.arange(y, y + height) * downsample, np.arange(x, x + width) * downsample
        rows, cols = np.minimum(rows, self.height - 1), np.minimum(cols, self.width - 1)  # edge tiles: repeat
        kind = self.class_map[(rows // CELL)[:, None], (cols // CELL)[None, :]]
        pick = self.choice[(rows // BLOCK)[:, None], (cols // BLOCK)[None, :]]
        inner_r, inner_c = (rows // downsample) % block, (cols // downsample) % block
        return banks[kind, pick, inner_r[:, None], inner_c[None, :]]

    def reduced_banks(self, downsample: int) -> np.ndarray:
        if downsample == 1:
            return self.banks
        size = BLOCK // downsample
        reduce = lambda tile: np.asarray(Image.fromarray(tile).resize((size, size), Image.Resampling.BOX))  # noqa: E731
        return np.stack([np.stack([reduce(t) for t in bank]) for bank in self.banks])


def make_slide(label: str, other: str, width: int, height: int, mpp: float, seed: int) -> SyntheticSlide:
    """The slide (class map, texture bank) for one seed; pixels are rendered on demand."""
    rng = np.random.default_rng([seed, 7])
    stain = sample_stain(rng)
    glass = np.clip(GLASS + rng.normal(0, 2.0, (BANK, BLOCK, BLOCK, 3)), 0, 255).astype(np.uint8)
    banks = np.stack([glass] + [np.stack([render_tile(kind, BLOCK, rng, stain) for _ in range(BANK)])
                                for kind in (label, other)])
    rows, cols = -(-height // CELL), -(-width // CELL)
    yy, xx = np.mgrid[0:rows, 0:cols] / max(rows, cols)
    class_map = np.zeros((rows, cols), np.uint8)
    aspect = (rows / max(rows, cols), cols / max(rows, cols))
    for _ in range(rng.integers(1, 4)):  # pieces of the labelled tissue
        class_map[_ellipse(rng, yy, xx, aspect, (0.12, 0.28))] = 1
    class_map[_ellipse(rng, yy, xx, aspect, (0.06, 0.12))] = 2  # one smaller piece of another tissue
    choice = rng.integers(0, BANK, (-(-height // BLOCK), -(-width // BLOCK)))
    return SyntheticSlide(label, other, width, height, mpp, class_map, choice, banks)


def _ellipse(rng, yy, xx, aspect, radii) -> np.ndarray:
    cy, cx = rng.uniform(0.25, 0.75) * aspect[0], rng.uniform(0.25, 0.75) * aspect[1]
    ry, rx = rng.uniform(*radii, 2)
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def write_slide(path: Path, slide: SyntheticSlide) -> None:
    """A pyramidal tiled TIFF of `slide`, written tile by tile (constant memory)."""
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=slide.width * slide.height > 1.5e9) as tiff:
        for number, (downsample, width, height) in enumerate(slide.levels):
            banks = slide.reduced_banks(downsample)
            pixels_per_cm = 1e4 / (slide.mpp * downsample)
            tiff.write(_tiles(slide, downsample, width, height, banks), shape=(height, width, 3), dtype=np.uint8,
                       tile=(TIFF_TILE, TIFF_TILE), photometric="rgb", compression="zlib",
                       compressionargs={"level": 1}, resolution=(pixels_per_cm, pixels_per_cm),
                       resolutionunit="CENTIMETER", subfiletype=1 if number else 0, metadata=None)


def _tiles(slide: SyntheticSlide, downsample: int, width: int, height: int, banks: np.ndarray) -> Iterator[np.ndarray]:
    for y in range(0, height, TIFF_TILE):
        for x in range(0, width, TIFF_TILE):
            yield slide.render(downsample, x, y, TIFF_TILE, TIFF_TILE, banks)


def slide_spec(index: int, classes: int, seed: int) -> tuple[str, str, int]:
    """(label, other class, seed) of slide `index`: labels in turn, so each has its share."""
    if not 2 <= classes <= len(SLIDE_CLASSES):
        raise HistoseekError(f"--classes must be between 2 and {len(SLIDE_CLASSES)} for slides "
                             f"({', '.join(SLIDE_CLASSES)}), got {classes}")
    names = SLIDE_CLASSES[:classes]
    label = names[index % classes]
    rng = np.random.default_rng([seed, 3, index])
    other = SLIDE_CLASSES[int(rng.integers(len(SLIDE_CLASSES)))]
    while other == label:
        other = SLIDE_CLASSES[int(rng.integers(len(SLIDE_CLASSES)))]
    return label, other, int(rng.integers(2**31))


def synthesize_slides(out: Path, slides: int, classes: int = 4, size: int = 2048, mpp: float = 0.5,
                      seed: int = 0) -> list[Path]:
    """Write `out/<label>/slide_<i>.tiff` and `out/labels.csv` (slide file, label)."""
    if slides < 1:
        raise HistoseekError(f"--slides must be at least 1, got {slides}")
    if size < 4 * BLOCK:
        raise HistoseekError(f"--size must be at least {4 * BLOCK} px for a slide, got {size}")
    out = Path(out)
    check_output_folder(out)
    written, rows = [], []
    with atomic.staged_directory(out) as staging:
        for index in range(slides):
            label, other, slide_seed = slide_spec(index, classes, seed)
            relative = f"{label}/slide_{index:04d}.tiff"
            (staging / label).mkdir(exist_ok=True)
            write_slide(staging / relative, make_slide(label, other, size, size, mpp, slide_seed))
            rows.append((relative, label))
            written.append(out / relative)
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([("slide", "label"), *rows])
        atomic.write_text(staging / LABELS_FILE, buffer.getvalue())
    return written
