"""The `folder` format: any folder-per-class tree, `<src>/<label>/**/<image>`.

When the top level holds only split folders (`train/`, `val/`, `test/`), each holding class
folders, the split is kept. Every source image is its own group (nothing finer is known).
Also holds what the other formats share: SourceRecord (what every format module returns),
folder listing, and the safety check on an output folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histoseek.dataset import IMAGE_SUFFIXES, MANIFEST_NAME, is_image_file
from histoseek.errors import HistoseekError

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class SourceRecord:
    path: Path  # the source image
    label: str
    group: str  # what must never be split between query and database: image, slide, patient
    split: str = ""  # "" when the dataset has no official split


def list_sources(src: Path) -> list[SourceRecord]:
    src = Path(src)
    top = subfolders(src)
    splits = [d for d in top if d.name in SPLIT_NAMES]
    if splits and len(splits) < len(top):
        others = ", ".join(d.name for d in top if d.name not in SPLIT_NAMES)
        raise HistoseekError(
            f"{src} mixes split folders ({', '.join(d.name for d in splits)}) with other folders ({others}); "
            f"expected either <src>/<label>/<images> or <src>/{{{','.join(SPLIT_NAMES)}}}/<label>/<images>"
        )
    roots = [(d, d.name) for d in splits] if splits else [(src, "")]
    records = [
        SourceRecord(image, class_dir.name, image.relative_to(src).as_posix(), split)
        for root, split in roots
        for class_dir in subfolders(root)
        for image in images_under(class_dir)
    ]
    if not records:
        raise HistoseekError(
            f"no images found in {src}: expected one folder per class, <src>/<label>/**/*"
            f"{{{','.join(sorted(IMAGE_SUFFIXES))}}}, optionally under <src>/{{{','.join(SPLIT_NAMES)}}}/"
        )
    return records


def subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders, sorted (so that every run lists sources in the same order)."""
    if not folder.is_dir():
        raise HistoseekError(f"source folder {folder} does not exist or is not a folder")
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def images_under(folder: Path, recursive: bool = True) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if is_image_file(p))


def check_output_folder(out: Path, src: Path | None = None) -> None:
    """Refuse an output folder whose replacement would destroy data.

    The output is written whole and then swapped in (atomic), so an existing `out` is
    deleted: allow that only for a folder we wrote before (it has a manifest) or an empty one.
    """
    out = Path(out).resolve()
    if src is not None:
        src = Path(src).resolve()
        if out == src or out.is_relative_to(src) or src.is_relative_to(out):
            raise HistoseekError(f"--out {out} must be outside --src {src} (and not contain it)")
    if out.exists() and not out.is_dir():
        raise HistoseekError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise HistoseekError(
            f"--out {out} already holds files and is not a dataset folder (no {MANIFEST_NAME}); "
            "it would be replaced: choose a new folder or empty it first"
        )
