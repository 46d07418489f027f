"""Pictures of indexed slides for the API: a thumbnail, and a region at any pyramid level.

Only slides recorded in an index (its `slides` table, written at build time) are opened,
by the file path recorded there: a slide id from a URL is looked up as a value and never
joined to a path, so no request can make the server open a file of its choice. Sizes are
bounded (THUMBNAIL_MAX, REGION_MAX) and coordinates checked against the slide, so a request
costs at most one bounded read; slides without a pyramid are refused rather than decoded
whole.
"""
from __future__ import annotations

import io

from PIL import Image

from histoseek.errors import HistoseekError
from server.index.fields import InvalidField
from server.index.store import SlideRecord

THUMBNAIL_DEFAULT, THUMBNAIL_MAX = 512, 1024
REGION_DEFAULT, REGION_MAX = 256, 1024
MAX_LEVEL_READ_PIXELS = 16_000_000  # a thumbnail is reduced from a level no larger than this


def _open(record: SlideRecord):
    from histoseek.slides.reader import Slide

    try:
        return Slide(record.file, record.slide_mpp, name=record.slide)  # messages name the slide, not its file
    except HistoseekError as exc:
        # The message names a server path: say what happened without it.
        raise SlideUnavailable(f"slide {record.slide!r} cannot be read on the server now "
                               "(moved or damaged since the index was built)") from exc


class SlideUnavailable(HistoseekError):
    """An indexed slide whose file is gone or unreadable (503 at the API)."""


def _jpeg(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def thumbnail(record: SlideRecord, size: int | None) -> tuple[bytes, dict]:
    """JPEG of the whole slide, its long side at most `size` px, and its geometry."""
    size = THUMBNAIL_DEFAULT if size is None else size
    if not 16 <= size <= THUMBNAIL_MAX:
        raise InvalidField(f"size must be between 16 and {THUMBNAIL_MAX} pixels, got {size}")
    with _open(record) as slide:
        level = _level_for_side(slide, size)
        width, height = slide.level_dimensions[level]
        if width * height > MAX_LEVEL_READ_PIXELS:
            raise InvalidField(f"slide {record.slide!r} has no pyramid level small enough for a thumbnail")
        rgb, _ = slide.level_reduced(level, size)  # in strips: memory of the thumbnail, not the level
    image = Image.fromarray(rgb)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    # Level-0 px per thumbnail px, so boxes in level-0 coordinates can be drawn on it.
    return buffer.getvalue(), {"X-Slide-Width": str(record.width), "X-Slide-Height": str(record.height),
                               "X-Thumbnail-Scale": f"{record.width / image.width:.6g}"}


def _level_for_side(slide, side: int) -> int:
    """The coarsest level whose long side is still at least `side` (else level 0... the finest)."""
    for level in range(slide.level_count - 1, -1, -1):
        if max(slide.level_dimensions[level]) >= side:
            return level
    return 0


def region(record: SlideRecord, x: int, y: int, level: int, size: int | None) -> bytes:
    """JPEG of the `size` x `size` px square at `level` whose top-left is level-0 (x, y)."""
    size = REGION_DEFAULT if size is None else size
    if not 1 <= size <= REGION_MAX:
        raise InvalidField(f"size must be between 1 and {REGION_MAX} pixels, got {size}")
    if not (0 <= x < record.width and 0 <= y < record.height):
        raise InvalidField(f"x, y must lie inside the slide (0-{record.width - 1}, 0-{record.height - 1}), "
                           f"got {x}, {y}")
    with _open(record) as slide:
        if not 0 <= level < slide.level_count:
            raise InvalidField(f"level must be between 0 and {slide.level_count - 1}, got {level}")
        return _jpeg(slide.read(x, y, level, (size, size)))
