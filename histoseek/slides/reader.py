"""Reading whole-slide images through OpenSlide at a requested resolution (µm per pixel).

A slide is a pyramid: level 0 at the scanner's resolution (its `mpp`, e.g. 0.25 µm/px at
40x), then levels downsampled by 2-4 each. A tile of `tile` px at `target_mpp` covers
`tile * target_mpp / mpp` level-0 pixels; it is read from the coarsest level that is
still at least as sharp as the target (never upsampled from a blurrier level) and
resized to exactly `tile` px. Coordinates are always level-0 pixels, as in every viewer,
so a tile can be found again in the slide whatever level it was read from.

Only OpenSlide ever parses a slide file (every format it reads: SVS, NDPI, MRXS, tiled
TIFF, …); plain images go through histoseek.imaging as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histoseek.errors import HistoseekError

# Suffixes of the single-file formats OpenSlide reads (MRXS keeps a folder next to it).
SLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".bif", ".vms", ".vmu", ".svslide",
                  ".dcm", ".czi"}
# 10x objective ~ 1 µm/px: the usual rule that turns a magnification into a resolution.
MICRONS_AT_1X = 10.0
# A slide's overview (tissue mask, thumbnails) is at most this long, read this many rows at
# a time: memory does not grow with the slide (a 100,000 px slide's mask is ~20 µm/px).
OVERVIEW_MAX_SIDE = 2048
OVERVIEW_STRIP_ROWS = 64


# Level-0 resolutions a scanner records: 100x oil is ~0.1 µm/px, a 1x overview ~10. Outside
# these bounds the slide's resolution is mislabelled (a TIFF's resolution in inches read as
# cm, a default of 1 px/unit), and tiling it would read nonsense at the wrong scale.
MIN_SLIDE_MPP, MAX_SLIDE_MPP = 0.05, 20.0


class SlideError(HistoseekError):
    """A slide that cannot be read, or read at the requested resolution."""


def _without(exc: Exception, path: Path, name: str) -> str:
    """OpenSlide's message with the file's path replaced by the slide's name."""
    return str(exc).replace(str(path), name)


def mpp_for(mpp: float | None, magnification: float | None) -> float:
    """The target µm/px from --mpp or --magnification (20x -> 0.5 µm/px)."""
    if (mpp is None) == (magnification is None):
        raise HistoseekError("give either --mpp (µm per pixel, e.g. 0.5) or --magnification (e.g. 20)")
    value = mpp if mpp is not None else MICRONS_AT_1X / magnification
    if not 0 < value < 1000:
        raise HistoseekError(f"the target resolution must be a positive number of µm per pixel, got {value}")
    return float(value)


@dataclass(frozen=True)
class TileReading:
    level: int  # pyramid level read
    read_px: int  # pixels read at that level (then resized to the tile size)
    footprint: int  # level-0 pixels one tile covers


class Slide:
    """An open slide: its size, resolution and levels, and reads at a target µm/px."""

    def __init__(self, path: Path | str, slide_mpp: float | None = None, *, name: str | None = None):
        """`name`: what messages call the slide (an upload's own file name: the temporary file
        it was saved to is the server's business, never the client's); default its path."""
        import openslide  # the native library loads only when slides are used

        self.path = Path(path)
        self.name = name or str(self.path)
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(f"{self.name} is not a slide OpenSlide can read (SVS, NDPI, MRXS, tiled TIFF, …)") from None
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(f"cannot open slide {self.name}: {_without(exc, self.path, self.name)}") from None
        self._error = openslide.OpenSlideError
        self.mpp = slide_mpp if slide_mpp is not None else self._own_mpp()
        if not MIN_SLIDE_MPP <= self.mpp <= MAX_SLIDE_MPP:
            self.close()
            raise SlideError(f"{self.name} records {self.mpp:g} µm per level-0 pixel, which no scanner gives "
                             f"(they scan at {MIN_SLIDE_MPP:g}-{MAX_SLIDE_MPP:g} µm/px; 0.25 at 40x, 0.5 at 20x): its "
                             "resolution is mislabelled; give the right one with --slide-mpp")

    def _own_mpp(self) -> float:
        props = self._slide.properties
        try:
            x, y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
        except (KeyError, ValueError):
            self.close()
            raise SlideError(f"{self.name} records no resolution (openslide.mpp-x); give it with --slide-mpp "
                             "(µm per level-0 pixel, e.g. 0.25 for a 40x scan)") from None
        if not (x > 0 and y > 0) or abs(x - y) > 0.05 * x:
            self.close()
            raise SlideError(f"{self.name} has non-square or invalid pixels ({x} x {y} µm); give --slide-mpp")
        return x

    # -- geometry -------------------------------------------------------------------------

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._slide.dimensions

    @property
    def level_count(self) -> int:
        return self._slide.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._slide.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._slide.level_downsamples

    def level_for(self, target_mpp: float) -> int:
        """The coarsest level whose pixels are no larger than `target_mpp` (1 % slack for
        rounding in the recorded downsamples); level 0 when the target is sharper than the scan."""
        best = 0
        for level, downsample in enumerate(self.level_downsamples):
            if self.mpp * downsample <= target_mpp * 1.01:
                best = level
        return best

    def tiling(self, tile: int, target_mpp: float) -> TileReading:
        if target_mpp < self.mpp * 0.99:
            raise SlideError(f"{self.name} is scanned at {self.mpp:.3g} µm/px; it cannot give {target_mpp:g} µm/px "
                             "without inventing detail: choose a coarser --mpp")
        level = self.level_for(target_mpp)
        footprint = max(1, round(tile * target_mpp / self.mpp))
        read_px = max(1, round(footprint / self.level_downsamples[level]))
        return TileReading(level, read_px, footprint)

    # -- pixels ---------------------------------------------------------------------------

    def read(self, x: int, y: int, level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 [h, w, 3] of `size` (w, h) pixels at `level`, top-left at level-0 (x, y).
        Outside the slide and transparent areas read as white (glass), not black."""
        try:
            region = self._slide.read_region((int(x), int(y)), int(level), (int(size[0]), int(size[1])))
        except self._error as exc:
            raise SlideError(f"{self.name} is damaged or truncated: cannot read ({x}, {y}) at level {level} "
                             f"({_without(exc, self.path, self.name)}); upload the whole file again") from None
        white = Image.new("RGB", region.size, (255, 255, 255))
        white.paste(region, mask=region.getchannel("A"))
        return np.asarray(white)

    def read_tile(self, x: int, y: int, tile: int, reading: TileReading) -> np.ndarray:
        """The `tile` x `tile` px tile at the target resolution whose level-0 top-left is (x, y)."""
        rgb = self.read(x, y, reading.level, (reading.read_px, reading.read_px))
        if reading.read_px != tile:
            rgb = np.asarray(Image.fromarray(rgb).resize((tile, tile), Image.Resampling.BOX if reading.read_px > tile
                                                         else Image.Resampling.BILINEAR))
        return rgb

    def level_reduced(self, level: int, max_side: int) -> tuple[np.ndarray, float]:
        """The whole of `level`, reduced to at most `max_side` px on its long side: (RGB,
        level-0 px per pixel). Read in strips of rows, each reduced at once, so memory
        stays bounded by the output (plus one strip) whatever the level's size."""
        width, height = self.level_dimensions[level]
        downsample = self.level_downsamples[level]
        scale = min(1.0, max_side / max(width, height))
        out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
        strips = []
        for top in range(0, out_h, OVERVIEW_STRIP_ROWS):
            bottom = min(out_h, top + OVERVIEW_STRIP_ROWS)
            y0, y1 = round(top * height / out_h), round(bottom * height / out_h)
            strip = self.read(0, round(y0 * downsample), level, (width, max(1, y1 - y0)))
            if strip.shape[:2] != (bottom - top, out_w):
                strip = np.asarray(Image.fromarray(strip).resize((out_w, bottom - top), Image.Resampling.BOX))
            strips.append(strip)
        return np.concatenate(strips), self.dimensions[0] / out_w

    def level_at(self, target_mpp: float, max_pixels: int | None = None,
                 max_side: int = OVERVIEW_MAX_SIDE) -> tuple[np.ndarray, float]:
        """The whole slide near `target_mpp` (for the tissue mask), at most `max_side` px long
        (coarser than the target for very large slides): (RGB, level-0 px per pixel). Refused
        when the level to read is huge (a slide without a pyramid, read whole): such a slide
        has to be converted to a pyramidal TIFF first."""
        level = self.level_for(target_mpp)
        width, height = self.level_dimensions[level]
        if width * height > (max_pixels or 64_000_000):
            raise SlideError(f"{self.name} has no level near {target_mpp:g} µm/px (its closest is {width}x{height} px); "
                             "convert it to a pyramidal TIFF first, e.g. with `vips tiffsave --tile --pyramid`")
        return self.level_reduced(level, max_side)

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_slide_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SLIDE_SUFFIXES and not path.name.startswith(".")
