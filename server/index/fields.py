"""Values clients give the API and the CLI for items: ids, labels, groups, upload names.

Python's int() reads "1_0" as 10 and "٣" as 3, and SQLite's integers stop at 2**63 - 1:
an id is accepted only as plain ASCII digits within that range. Labels and groups are
returned by every search and listed by /v1/indexes, so they are kept short, visible
and on one line.
"""
from __future__ import annotations

import re
import unicodedata

from histoseek.errors import HistoseekError

MAX_ID = 2**63 - 1  # SQLite INTEGER PRIMARY KEY
MAX_TEXT_CHARS = 200
_DIGITS = re.compile(r"-?[0-9]+", re.ASCII)


class InvalidField(HistoseekError):
    """A label, group or id that cannot be stored (422 at the API)."""


class NoSuchId(HistoseekError):
    """A well-formed id that no item can have (404 at the API)."""


def item_id(text: str) -> int:
    """An item id from a URL: plain decimal digits, else InvalidField; outside SQLite's range, NoSuchId."""
    if not _DIGITS.fullmatch(text):
        raise InvalidField(f"item id must be a whole number written with the digits 0-9, got {text[:40]!r}")
    value = int(text)
    if not 0 <= value <= MAX_ID:
        raise NoSuchId(f"no item has id {text[:40]}: ids run from 0 to {MAX_ID}")
    return value


def _unprintable(char: str) -> bool:
    # Cc: control characters (NUL, CR, LF, ESC, ...); Zl/Zp: Unicode line and paragraph separators.
    return unicodedata.category(char) in ("Cc", "Zl", "Zp")


def text_field(field: str, value: str, where: str) -> str:
    """`value` if it may be stored as an item's `field` (given as `where`), else InvalidField saying why."""
    if not value.strip():
        raise InvalidField(f"{field} ({where}) is blank; give one with visible characters")
    if len(value) > MAX_TEXT_CHARS:
        raise InvalidField(f"{field} ({where}) is {len(value):,} characters long, more than {MAX_TEXT_CHARS}; "
                           "give a shorter one")
    bad = next((char for char in value if _unprintable(char)), None)
    if bad is not None:
        raise InvalidField(f"{field} ({where}) contains the control character {bad!r}; give one on a single line, "
                           "without control characters")
    return value


def upload_name(filename: str | None) -> str:
    """A client's file name as echoed in messages and stored as the item's source: short, one line."""
    name = "".join("?" if _unprintable(char) else char for char in (filename or "image"))
    return name[:MAX_TEXT_CHARS] or "image"
