"""The `bracs` format: BRACS regions of interest (Brancati et al., 2022).

Layout of the RoI release (`BRACS_RoI/latest_version/`):
`<src>/{train,val,test}/<k>_<CLASS>/BRACS_<slide>_<CLASS>_<n>.png`, e.g.
`train/0_N/BRACS_1003_N_1.png`, classes N, PB, UDH, FEA, ADH, DCIS, IC. The official split
is kept, and the group is the slide (`BRACS_1003`): RoIs of one slide come from one patient
and must not be matched against each other.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from histoseek.errors import HistoseekError
from training.data.folders import SPLIT_NAMES, SourceRecord, images_under, subfolders

log = logging.getLogger(__name__)

_CLASS_DIR = re.compile(r"^\d+_(?P<label>[A-Za-z]+)$")
_SLIDE = re.compile(r"^(?P<slide>BRACS_\d+)_")


def list_sources(src: Path) -> list[SourceRecord]:
    src = Path(src)
    split_dirs = [d for d in subfolders(src) if d.name in SPLIT_NAMES]
    if not split_dirs:
        raise HistoseekError(
            f"{src} is not a BRACS RoI folder: expected <src>/{{{','.join(SPLIT_NAMES)}}}/<k>_<CLASS>/"
            "BRACS_<slide>_<CLASS>_<n>.png (point --src at BRACS_RoI/latest_version)"
        )
    records = []
    for split_dir in split_dirs:
        for class_dir in subfolders(split_dir):
            match = _CLASS_DIR.match(class_dir.name)
            if match is None:
                raise HistoseekError(
                    f"unexpected folder {class_dir}: BRACS class folders are named <k>_<CLASS>, e.g. 0_N or 5_DCIS"
                )
            for image in images_under(class_dir, recursive=False):
                records.append(SourceRecord(image, match["label"], _slide(image, src), split_dir.name))
    if not records:
        raise HistoseekError(f"no images found under {', '.join(str(d) for d in split_dirs)}")
    return records


def _slide(image: Path, src: Path) -> str:
    match = _SLIDE.match(image.name)
    if match is None:
        # Still usable, but then only the image itself can be kept out of its own results.
        log.warning("%s: no slide id in the name (expected BRACS_<slide>_...); grouped on its own", image)
        return image.relative_to(src).as_posix()
    return match["slide"]
