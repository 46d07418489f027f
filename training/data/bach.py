"""The `bach` format: ICIAR 2018 BACH microscopy images (Aresta et al., 2019).

Layout of the release: `<src>/Photos/{Normal,Benign,InSitu,Invasive}/*.tif` (2048x1536 RGB)
with `Photos/microscopy_ground_truth.csv`, two columns and no header (`b001.tif,Benign`).
The CSV is the official label source, so it wins over the folder name when both exist.
There is no patient id and no official split: each image is its own group, split "".
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from histoseek.errors import HistoseekError
from training.data.folders import SourceRecord, images_under, subfolders

log = logging.getLogger(__name__)

CLASSES = ("Normal", "Benign", "InSitu", "Invasive")
GROUND_TRUTH = "microscopy_ground_truth.csv"


def list_sources(src: Path) -> list[SourceRecord]:
    src = Path(src)
    # Accept the dataset root or its Photos/ folder itself.
    photos = src / "Photos" if (src / "Photos").is_dir() else src
    class_dirs = [d for d in subfolders(photos) if d.name in CLASSES]
    if not class_dirs:
        raise HistoseekError(
            f"{src} is not a BACH folder: expected <src>/Photos/{{{','.join(CLASSES)}}}/*.tif "
            f"(with the optional labels file <src>/Photos/{GROUND_TRUTH})"
        )
    truth = _read_ground_truth(photos / GROUND_TRUTH)
    records = []
    for class_dir in class_dirs:
        for image in images_under(class_dir, recursive=False):
            label = truth.get(image.name, class_dir.name)
            if label != class_dir.name:
                log.warning("%s: label %s from %s overrides its folder %s", image, label, GROUND_TRUTH, class_dir.name)
            records.append(SourceRecord(image, label, image.relative_to(src).as_posix()))
    if not records:
        raise HistoseekError(f"no images in {', '.join(str(d) for d in class_dirs)}: expected *.tif files")
    return records


def _read_ground_truth(path: Path) -> dict[str, str]:
    """File name -> label; a header row, if a copy has one, is harmless (no file has its name)."""
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        return {row[0].strip(): row[1].strip() for row in csv.reader(f) if len(row) >= 2 and row[0].strip()}
