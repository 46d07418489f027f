"""`histoseek data prepare`: a public dataset's own layout -> a dataset folder of tiles.

For each source image listed by the format module: decode it (a broken file is skipped and
reported, never fatal), cut it into `tile`x`tile` patches every `stride` pixels, drop the
patches with less than `min_tissue` tissue, resize (`resize`), Macenko-normalise to a
reference (`stain_norm`), and write `<out>/<label>/<name>.png` plus `manifest.csv`.

`resize` (pixels) is the shorter side of every written image: a tile is cut at `tile`
pixels from the full-resolution source and saved at `resize`x`resize`, so every tile covers
the same tissue area whatever the source's size (e.g. `--tile 512 --resize 224` covers
512 px of tissue at 224 px); without `--tile` the whole image is scaled to that shorter
side. The manifest's x, y are the tile's top-left corner in the *original* source pixels,
so a tile can always be found again in its source.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from histoseek import atomic
from histoseek.dataset import DatasetItem, write_manifest
from histoseek.errors import HistoseekError
from histoseek.imaging import load_image
from training.data import bach, bracs, crc, folders
from training.data.folders import SourceRecord, check_output_folder
from training.data.tiling import StainNormalizer, Tile, iter_tiles, resize_shorter_side, tissue_fraction

log = logging.getLogger(__name__)

FORMATS = {
    "folder": folders.list_sources,
    "bach": bach.list_sources,
    "bracs": bracs.list_sources,
    "crc": crc.list_sources,
}


@dataclass
class PrepareReport:
    out: Path
    images_read: int = 0
    tiles_written: int = 0
    tiles_dropped_background: int = 0
    stain_norm_failed: int = 0  # tiles written un-normalised
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source file, reason)

    def summary(self) -> str:
        lines = [
            f"{self.images_read} images read, {self.tiles_written} tiles written to {self.out}, "
            f"{self.tiles_dropped_background} dropped as background, "
            f"{self.stain_norm_failed} left un-normalised, {len(self.skipped)} files skipped"
        ]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def prepare_dataset(
    fmt: str,
    src: Path,
    out: Path,
    *,
    tile: int | None = None,
    stride: int | None = None,
    resize: int | None = None,
    min_tissue: float = 0.0,
    stain_norm: Path | None = None,
) -> PrepareReport:
    """Write a dataset folder (tiles + manifest.csv) at `out` from `src` in format `fmt`."""
    if fmt not in FORMATS:
        raise HistoseekError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_options(tile, stride, resize, min_tissue)
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise HistoseekError(f"source folder {src} does not exist or is not a folder")
    check_output_folder(out, src)
    records = FORMATS[fmt](src)
    normalizer = StainNormalizer(stain_norm) if stain_norm is not None else None
    report = PrepareReport(out=out)
    with atomic.staged_directory(out) as staging, logging_redirect_tqdm():
        writer = _TileWriter(src=src, staging=staging, report=report, tile=tile, stride=stride or tile,
                             resize=resize, min_tissue=min_tissue, normalizer=normalizer)
        with tqdm(records, desc=f"prepare {fmt}", unit="image") as progress:
            for record in progress:
                writer.write_source(record)
                progress.set_postfix(tiles=report.tiles_written, background=report.tiles_dropped_background,
                                     skipped=len(report.skipped), refresh=False)
        if not writer.items:
            raise HistoseekError(
                f"nothing to write: {report.images_read} images read, {report.tiles_dropped_background} tiles "
                f"dropped as background, {len(report.skipped)} files skipped; "
                "lower --min-tissue or --tile, or check the source folder"
            )
        write_manifest(staging, writer.items)
    return report


def _check_options(tile: int | None, stride: int | None, resize: int | None, min_tissue: float) -> None:
    if tile is not None and tile < 1:
        raise HistoseekError(f"--tile must be a positive number of pixels, got {tile}")
    if stride is not None and tile is None:
        raise HistoseekError("--stride needs --tile: without tiling each image is written whole")
    if stride is not None and stride < 1:
        raise HistoseekError(f"--stride must be a positive number of pixels, got {stride}")
    if resize is not None and resize < 1:
        raise HistoseekError(f"--resize must be a positive number of pixels, got {resize}")
    if not 0.0 <= min_tissue <= 1.0:
        raise HistoseekError(f"--min-tissue is a fraction between 0 and 1, got {min_tissue}")


class _FileNames:
    """Output names `<label>/<source path with / as __>[_x<x>_y<y>].png`, unique.

    The source's relative path (not just its stem) goes into the name because different
    splits or folds often reuse file names.
    """

    def __init__(self) -> None:
        self._stems: dict[tuple[str, str], str] = {}  # (label, source) -> stem
        self._taken: set[tuple[str, str]] = set()  # (label, stem)

    def new(self, label: str, source: str, xy: tuple[int, int] | None) -> str:
        key = (label, source)
        if key not in self._stems:
            stem = source.rsplit(".", 1)[0].replace("/", "__")
            if (label, stem) in self._taken:
                stem = source.replace("/", "__").replace(".", "_")  # a.png next to a.tif
            self._stems[key] = stem
            self._taken.add((label, stem))
        return f"{_safe(label)}/{self._stems[key]}" + (f"_x{xy[0]}_y{xy[1]}" if xy else "") + ".png"


@dataclass
class _TileWriter:
    src: Path
    staging: Path
    report: PrepareReport
    tile: int | None
    stride: int | None
    resize: int | None
    min_tissue: float
    normalizer: StainNormalizer | None
    items: list[DatasetItem] = field(default_factory=list)
    names: _FileNames = field(default_factory=_FileNames)

    def write_source(self, record: SourceRecord) -> None:
        source = record.path.relative_to(self.src).as_posix()
        failures: list[str] = []
        for piece in self._pieces(record, source):
            if self.min_tissue > 0 and tissue_fraction(piece.pixels) < self.min_tissue:
                self.report.tiles_dropped_background += 1
                continue
            pixels = piece.pixels if self.resize is None else resize_shorter_side(piece.pixels, self.resize)
            if self.normalizer is not None:
                try:
                    pixels = self.normalizer(pixels)
                except ValueError as exc:
                    # Mostly tiles with little tissue: keeping them as they are beats losing them.
                    failures.append(f"x={piece.x}, y={piece.y}: {exc}")
            path = self.names.new(record.label, source, (piece.x, piece.y) if self.tile else None)
            (self.staging / path).parent.mkdir(exist_ok=True)
            Image.fromarray(pixels).save(self.staging / path, compress_level=1)  # fast; tiles barely compress
            self.items.append(DatasetItem(path, record.label, record.group, record.split, piece.x, piece.y, source))
            self.report.tiles_written += 1
        if failures:
            # One line per image, not per tile: a large image can have thousands of tiles.
            log.warning("%s: stain normalisation failed for %d tiles, kept un-normalised (first: %s)",
                        source, len(failures), failures[0])
            self.report.stain_norm_failed += len(failures)

    def _pieces(self, record: SourceRecord, source: str) -> list[Tile]:
        """The source image whole, or its tiles; [] (and a reported skip) when it cannot be used."""
        try:
            rgb = np.asarray(load_image(record.path, max_pixels=None))  # trusted local slides may be huge
        except HistoseekError as exc:
            self._skip(source, str(exc))
            return []
        self.report.images_read += 1
        if self.tile is None:
            return [Tile(0, 0, rgb)]
        height, width = rgb.shape[:2]
        if width < self.tile or height < self.tile:
            self._skip(source, f"{width}x{height} pixels is smaller than one {self.tile}x{self.tile} tile")
            return []
        return list(iter_tiles(rgb, self.tile, self.stride))

    def _skip(self, source: str, reason: str) -> None:
        log.warning("skipping %s: %s", source, reason)
        self.report.skipped.append((source, reason))


def _safe(label: str) -> str:
    """A folder name for a label (labels from a CSV may hold any character)."""
    return re.sub(r"[^\w.-]+", "_", label).strip(".") or "_"
