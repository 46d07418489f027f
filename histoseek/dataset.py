"""Dataset folders: the files that `data synth` / `data prepare` write and later stages read.

A dataset folder is either
- a prepared folder with `manifest.csv` (columns: path, label, group, split, x, y, source,
  and for tiles of whole slides mpp and mosaic; `path` relative to the folder), or
- any folder-per-class tree (`<root>/<label>/*.png|jpg|tif`), read as if it had a
  manifest where every image is its own group.

`group` is what must never be split between query and database (source image, slide or
patient): evaluation excludes results from the query's own group.
"""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from histoseek import atomic
from histoseek.errors import HistoseekError
from histoseek.imaging import load_model_input

MANIFEST_NAME = "manifest.csv"
SLIDES_NAME = "slides.csv"  # whole slides the tiles were cut from (data prepare --format slides)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@dataclass(frozen=True)
class DatasetItem:
    path: str  # relative to the dataset folder
    label: str
    group: str
    split: str = ""
    x: int = 0
    y: int = 0
    source: str = ""
    # Tiles of whole slides (`data prepare --format slides`): x, y are level-0 pixels of the
    # slide `group`, `mpp` the µm/px the tile was cut at, `mosaic` 1 for the slide's mosaic
    # tiles. Older manifests lack these columns and read as 0.
    mpp: float = 0.0
    mosaic: int = 0


MANIFEST_COLUMNS = [f.name for f in fields(DatasetItem)]
SLIDE_COLUMNS = ["mpp", "mosaic"]  # written only by manifests that hold slide tiles


@dataclass(frozen=True)
class Dataset:
    root: Path
    items: list[DatasetItem]

    def absolute(self, item: DatasetItem) -> Path:
        return self.root / item.path

    @property
    def labels(self) -> list[str]:
        return sorted({item.label for item in self.items})

    def subset(self, split: str) -> "Dataset":
        return Dataset(self.root, [i for i in self.items if i.split == split])

    def __len__(self) -> int:
        return len(self.items)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_dataset(root: Path | str) -> Dataset:
    """Read a prepared folder (manifest.csv) or a folder-per-class tree."""
    root = Path(root)
    if not root.is_dir():
        raise HistoseekError(f"dataset folder {root} does not exist")
    manifest = root / MANIFEST_NAME
    items = _read_manifest(manifest) if manifest.is_file() else _scan_class_folders(root)
    if not items:
        raise HistoseekError(
            f"no images found in {root}: expected {MANIFEST_NAME} or one sub-folder per class "
            f"holding {', '.join(sorted(IMAGE_SUFFIXES))} files"
        )
    return Dataset(root, items)


def read_split(root: Path | str, split: str | None) -> Dataset:
    """The dataset, or only its items of one split (an error when that split is empty)."""
    dataset = read_dataset(root)
    if split is None:
        return dataset
    subset = dataset.subset(split)
    if not len(subset):
        found = sorted({item.split for item in dataset.items})
        raise HistoseekError(f"{root} has no items in split {split!r}; its splits are {found}")
    return subset


def _read_manifest(path: Path) -> list[DatasetItem]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label", "group"} - set(reader.fieldnames or [])
        if missing:
            raise HistoseekError(f"{path} lacks the columns {sorted(missing)}")
        return [
            DatasetItem(
                path=row["path"], label=row["label"], group=row["group"], split=row.get("split") or "",
                x=int(row.get("x") or 0), y=int(row.get("y") or 0), source=row.get("source") or "",
                mpp=float(row.get("mpp") or 0.0), mosaic=int(row.get("mosaic") or 0),
            )
            for row in reader
        ]


def _scan_class_folders(root: Path) -> list[DatasetItem]:
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for image in sorted(p for p in class_dir.rglob("*") if is_image_file(p)):
            relative = image.relative_to(root).as_posix()
            # Without a manifest every image is its own group; the absolute path keeps groups
            # distinct between two folders (e.g. test/ queried against train/).
            group = str(image.resolve())
            items.append(DatasetItem(path=relative, label=class_dir.name, group=group, source=relative))
    return items


def write_manifest(root: Path | str, items: list[DatasetItem]) -> Path:
    buffer = io.StringIO()
    # Manifests of plain images keep the columns they always had.
    slides = any(item.mpp or item.mosaic for item in items)
    columns = MANIFEST_COLUMNS if slides else [c for c in MANIFEST_COLUMNS if c not in SLIDE_COLUMNS]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for item in items:
        writer.writerow(asdict(item))
    path = Path(root) / MANIFEST_NAME
    atomic.write_text(path, buffer.getvalue())
    return path


def read_slides_table(root: Path | str) -> list[dict]:
    """The rows of a dataset folder's slides.csv ([] for a folder of plain images)."""
    path = Path(root) / SLIDES_NAME
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def sample_images(data: Path | Dataset, size: int, count: int = 32) -> np.ndarray:
    """Up to `count` tiles spread over the dataset's classes, as uint8 `[N, S, S, 3]`."""
    dataset = data if isinstance(data, Dataset) else read_dataset(data)
    by_label: dict[str, list] = {}
    for item in dataset.items:
        by_label.setdefault(item.label, []).append(item)
    picked = []
    while len(picked) < count and any(by_label.values()):
        for items in by_label.values():
            if items and len(picked) < count:
                picked.append(items.pop(0))
    return np.stack([load_model_input(dataset.absolute(item), size) for item in picked])
