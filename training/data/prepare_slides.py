"""`histoseek data prepare --format slides`: whole-slide images -> a dataset folder of tiles.

Slides are found as `<src>/<label>/<slide file>` or, with `--labels CSV` (columns `slide`,
`label`; `slide` is the file's path under src, its name or its stem), anywhere under src.
Each slide is planned from its low level (histoseek/slides/plan.py), then its tiles are
read one at a time, written as PNG and forgotten, so memory stays flat whatever the slide's
size. A slide that cannot be opened or read to the end (unsupported, truncated, no
resolution) is reported and skipped; its tiles already written are removed.

Besides `manifest.csv` (slide id = group; level-0 x, y; mpp; mosaic flag) the folder gets
`slides.csv`: each slide's id, label, file (absolute path), level-0 size and µm/px, so the
index can later show the slide and read regions of it — and only those slides.
"""
from __future__ import annotations

import csv
import io
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from histoseek import atomic
from histoseek.dataset import SLIDES_NAME, DatasetItem, write_manifest
from histoseek.errors import HistoseekError
from training.data.folders import check_output_folder, subfolders
from histoseek.slides.plan import MASK_FRACTION, plan_slide
from histoseek.slides.reader import Slide, SlideError, is_slide_file
from histoseek.slides.mosaic import MINIMUM, SHARE
from training.data.tiling import StainNormalizer, tissue_fraction

log = logging.getLogger(__name__)

SLIDES_COLUMNS = ["slide", "label", "file", "width", "height", "slide_mpp", "tile", "mpp", "tiles", "mosaic_tiles"]


@dataclass(frozen=True)
class SlideSource:
    path: Path
    label: str
    slide_id: str


@dataclass
class SlidesReport:
    out: Path
    slides_read: int = 0
    tiles_written: int = 0
    mosaic_tiles: int = 0
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        rate = f"{self.slides_read / self.seconds:.2f} slides/s, {self.tiles_written / self.seconds:.0f} tiles/s" \
            if self.seconds > 0 else ""
        lines = [f"{self.slides_read} slides read, {self.tiles_written} tiles ({self.mosaic_tiles} in mosaics) "
                 f"written to {self.out} in {self.seconds:.1f} s ({rate}), {len(self.skipped)} slides skipped"]
        return "\n".join(lines + [f"  skipped {path}: {reason}" for path, reason in self.skipped])


def list_slides(src: Path, labels_csv: Path | None = None) -> list[SlideSource]:
    """The slides under `src` with their labels and unique, URL-safe ids."""
    if labels_csv is not None:
        labels = _read_labels(labels_csv)
        found = sorted(p for p in src.rglob("*") if is_slide_file(p))
        pairs = []
        for path in found:
            relative = path.relative_to(src).as_posix()
            label = labels.get(relative) or labels.get(path.name) or labels.get(path.stem)
            if label is None:
                log.warning("%s has no label in %s; skipped", relative, labels_csv)
                continue
            pairs.append((path, label))
    else:
        pairs = [(path, folder.name) for folder in subfolders(src)
                 for path in sorted(folder.rglob("*")) if is_slide_file(path)]
    if not pairs:
        raise HistoseekError(f"no slides found in {src}: expected <src>/<label>/<slide> (.svs, .ndpi, .tiff, …), "
                             "or slides anywhere under src with --labels CSV (columns slide,label)")
    sources, taken = [], set()
    for path, label in pairs:
        slide_id = _safe_id(path.stem)
        if slide_id in taken:  # the same file name in two folders
            slide_id = _safe_id(path.relative_to(src).with_suffix("").as_posix().replace("/", "__"))
        taken.add(slide_id)
        sources.append(SlideSource(path, label, slide_id))
    return sources


def _read_labels(path: Path) -> dict[str, str]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"slide", "label"} <= set(reader.fieldnames or []):
                raise HistoseekError(f"{path} needs the columns slide,label (got {reader.fieldnames})")
            return {row["slide"].strip(): row["label"].strip() for row in reader if row["slide"] and row["label"]}
    except OSError as exc:
        raise HistoseekError(f"cannot read the labels file {path}: {exc.strerror}") from exc


def _safe_id(text: str) -> str:
    """Slide ids go into URLs and file names: letters, digits, `.`, `_` and `-` only."""
    return re.sub(r"[^\w.-]+", "_", text, flags=re.ASCII).strip("._")[:120] or "slide"


def prepare_slides(src: Path, out: Path, *, tile: int, mpp: float, labels_csv: Path | None = None,
                   slide_mpp: float | None = None, mask_fraction: float = MASK_FRACTION, min_tissue: float = 0.0,
                   mosaic_share: float = SHARE, mosaic_minimum: int = MINIMUM,
                   stain_norm: Path | None = None) -> SlidesReport:
    if tile < 16:
        raise HistoseekError(f"--tile must be at least 16 px, got {tile}")
    if not 0 < mask_fraction <= 1 or not 0 < mosaic_share <= 1:
        raise HistoseekError("--mask-fraction and --mosaic-share are fractions in (0, 1]")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise HistoseekError(f"source folder {src} does not exist or is not a folder")
    check_output_folder(out, src)
    sources = list_slides(src, labels_csv)
    normalizer = StainNormalizer(stain_norm) if stain_norm is not None else None
    report, items, slide_rows = SlidesReport(out=out), [], []
    start = time.perf_counter()
    with atomic.staged_directory(out) as staging, logging_redirect_tqdm(), \
            tqdm(unit="tile", desc=f"prepare {len(sources)} slides") as progress:
        for number, source in enumerate(sources):
            try:
                row, written = _write_slide(source, src, staging, tile, mpp, slide_mpp, mask_fraction, min_tissue,
                                            mosaic_share, mosaic_minimum, normalizer, progress)
            except SlideError as exc:
                log.warning("skipping %s: %s", source.path, exc)
                report.skipped.append((str(source.path), str(exc)))
                continue
            items += written
            slide_rows.append(row)
            report.slides_read += 1
            report.tiles_written += len(written)
            report.mosaic_tiles += sum(item.mosaic for item in written)
            elapsed = time.perf_counter() - start
            progress.set_postfix(slides=f"{number + 1}/{len(sources)}", slides_per_s=f"{(number + 1) / elapsed:.2f}",
                                 skipped=len(report.skipped), refresh=False)
        if not items:
            raise HistoseekError(f"nothing to write: {report.slides_read} slides read, {len(report.skipped)} skipped; "
                                 "check the slides, or lower --mask-fraction")
        write_manifest(staging, items)
        _write_slides_table(staging / SLIDES_NAME, slide_rows)
    report.seconds = time.perf_counter() - start
    return report


def _write_slide(source: SlideSource, src: Path, staging: Path, tile: int, mpp: float, slide_mpp: float | None,
                 mask_fraction: float, min_tissue: float, share: float, minimum: int,
                 normalizer: StainNormalizer | None, progress: tqdm) -> tuple[dict, list[DatasetItem]]:
    folder = staging / _safe_id(source.label)
    folder.mkdir(exist_ok=True)
    written: list[DatasetItem] = []
    relative_source = source.path.relative_to(src).as_posix()
    try:
        with Slide(source.path, slide_mpp) as slide:
            plan = plan_slide(slide, tile, mpp, mask_fraction=mask_fraction, share=share, minimum=minimum)
            flags = plan.in_mosaic()
            for (x, y), in_mosaic in zip(plan.positions.tolist(), flags.tolist()):
                pixels = slide.read_tile(x, y, tile, plan.reading)
                progress.update(1)
                if min_tissue > 0 and tissue_fraction(pixels) < min_tissue:
                    continue
                if normalizer is not None:
                    try:
                        pixels = normalizer(pixels)
                    except ValueError:
                        pass  # little tissue: kept as it is, as for plain images
                path = f"{folder.name}/{source.slide_id}_x{x}_y{y}.png"
                Image.fromarray(pixels).save(staging / path, compress_level=1)
                written.append(DatasetItem(path, source.label, source.slide_id, "", x, y, relative_source,
                                           mpp, int(in_mosaic)))
            row = {"slide": source.slide_id, "label": source.label, "file": str(source.path.resolve()),
                   "width": slide.dimensions[0], "height": slide.dimensions[1], "slide_mpp": slide.mpp,
                   "tile": tile, "mpp": mpp, "tiles": len(written), "mosaic_tiles": sum(i.mosaic for i in written)}
    except SlideError:
        for item in written:  # a slide is all in or all out
            (staging / item.path).unlink(missing_ok=True)
        raise
    if not written:
        raise SlideError("no tissue found (the mask is empty or no tile covers enough of it)")
    return row, written


def _write_slides_table(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SLIDES_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, buffer.getvalue())

