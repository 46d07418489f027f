"""The `crc` format: Warwick extended colorectal cancer grading dataset (Shaban et al., 2020).

Large images (about 5000x7300 px at 20x) in one folder per grade, `<src>/<grade>/*.png`
(`Normal/`, `Low/`, `High/`). Some releases nest the grades under cross-validation fold
folders, `<src>/<fold>/<grade>/*.png` (e.g. `CRC_fold1/Low/`); the fold name is kept as the
split. Each image is its own group (the release has no patient id); they are meant to be
tiled (`--tile`).
"""
from __future__ import annotations

from pathlib import Path

from histoseek.errors import HistoseekError
from training.data.folders import SourceRecord, images_under, subfolders


def list_sources(src: Path) -> list[SourceRecord]:
    src = Path(src)
    records = []
    for top in subfolders(src):
        if images_under(top, recursive=False):  # a grade folder
            grades, split = [top], ""
        else:  # a fold folder holding grade folders
            grades, split = subfolders(top), top.name
        for grade in grades:
            records.extend(
                SourceRecord(image, grade.name, image.relative_to(src).as_posix(), split)
                for image in images_under(grade, recursive=False)
            )
    if not records:
        raise HistoseekError(
            f"no images found in {src}: expected the CRC grading layout <src>/<grade>/*.png "
            "(grades such as Normal, Low, High), optionally under fold folders <src>/<fold>/<grade>/*.png"
        )
    return records
