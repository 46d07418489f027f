"""items.sqlite: what an index knows about each vector (source, label, group, thumbnail).

The store is the truth about which items exist: a vector in the backend (index.faiss or a
Milvus collection) without a row here is never returned (see server/index/folder.py for why such
vectors can exist).

Each thread keeps its own connection (sqlite connections cannot be shared between the
API's worker threads, and opening one costs ~0.4 ms, more than a small search), and
reopens it when the file was replaced by a rebuild. It is closed when its thread ends: a
connection is part of a reference cycle, so dropping it would leave the file open until
the next garbage collection. The journal stays the default
rollback one, not WAL: writes are rare and short, and the folder then holds only its own
files, so it can be copied whenever no write is running.

The `meta` table holds `build_id` (new for every build) and `generation` (bumped by every
commit), so a reader learns with one tiny query whether what it holds in memory (a FAISS
index, filter tables) is stale.
"""
from __future__ import annotations

import io
import os
import sqlite3
import threading
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

THUMBNAIL_PX = 128

_SCHEMA = """
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    label TEXT NOT NULL,
    "group" TEXT NOT NULL,
    split TEXT NOT NULL DEFAULT '',
    x INTEGER NOT NULL DEFAULT 0,
    y INTEGER NOT NULL DEFAULT 0,
    source TEXT NOT NULL DEFAULT '',
    thumbnail BLOB NOT NULL,
    mpp REAL NOT NULL DEFAULT 0,
    mosaic INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX items_group ON items("group");
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_SLIDES_TABLE = """CREATE TABLE slides (
    slide TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    file TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    slide_mpp REAL NOT NULL,
    tile INTEGER NOT NULL,
    mpp REAL NOT NULL
)"""
_BASE_COLUMNS = 'id, path, label, "group", split, x, y, source'
# Indexes built before whole slides lack these columns (and the slides table): their items
# read as mpp 0, mosaic 0, and they hold no slides.
_SLIDE_COLUMNS = ", mpp, mosaic"


@dataclass(frozen=True)
class Item:
    id: int
    path: str  # where the image was read from when it was indexed
    label: str
    group: str  # source image, slide or patient: never matched against itself
    split: str = ""
    x: int = 0
    y: int = 0
    source: str = ""
    mpp: float = 0.0  # tiles of whole slides: µm/px they were cut at (x, y: level-0 px of slide `group`)
    mosaic: int = 0  # 1: one of its slide's mosaic tiles

    @property
    def shown_source(self) -> str:
        """The source results show and source filters match: the one named when the item was
        indexed, else the path it was read from (Store.filter_columns says the same in SQL)."""
        return self.source or self.path


@dataclass(frozen=True)
class SlideRecord:
    """A slide an index holds tiles of: the only slides the API ever opens."""
    slide: str
    label: str
    file: str  # absolute path of the slide file when the index was built
    width: int  # level-0 px
    height: int
    slide_mpp: float  # µm per level-0 px
    tile: int  # px of its indexed tiles
    mpp: float  # µm/px of its indexed tiles


def thumbnail_jpeg(image: Image.Image, size: int = THUMBNAIL_PX) -> bytes:
    """A small JPEG kept in the store, so item images are served even if originals move."""
    small = image.convert("RGB")
    small.thumbnail((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()
        self._columns, self._has_slides = _BASE_COLUMNS + _SLIDE_COLUMNS, True  # set per file on connecting

    @classmethod
    def create(cls, path: Path) -> "Store":
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.executescript(_SCHEMA + _SLIDES_TABLE + ";")
            conn.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("build_id", uuid.uuid4().hex), ("generation", "0"), ("next_id", "0")],
            )
        return cls(path)

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, reopened if the file was replaced since (an open file
        keeps its inode, so a new file never has the old one's)."""
        inode = os.stat(self.path).st_ino
        cached = getattr(self._local, "connection", None)
        if cached is None or cached[0] != inode:
            if cached is not None:
                cached[1].close()
            # mode=rw: a missing file is an error, never silently a new empty database.
            # check_same_thread=False only so that the closer below may run wherever the
            # thread's locals are torn down; the connection is still used by its thread alone.
            conn = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=30, check_same_thread=False)
            names = {row[1] for row in conn.execute("PRAGMA table_info(items)")}
            self._columns = _BASE_COLUMNS + (_SLIDE_COLUMNS if "mosaic" in names else "")
            self._has_slides = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'slides'").fetchone() is not None
            cached = (inode, conn, _Closer(conn))
            self._local.connection = cached
        return cached[1]

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic commit that also bumps the generation readers watch."""
        conn = self._connection()
        with conn:  # commits, or rolls back on an exception
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def signature(self) -> tuple[str, int]:
        """(build_id, generation): changes whenever the folder's content may have changed."""
        meta = dict(self._connection().execute(
            "SELECT key, value FROM meta WHERE key IN ('build_id', 'generation')"))
        return meta["build_id"], int(meta["generation"])

    def next_id(self) -> int:
        """The first id never handed out (ids of removed items are not reused)."""
        conn = self._connection()
        stored = int(conn.execute("SELECT value FROM meta WHERE key = 'next_id'").fetchone()[0])
        highest = conn.execute("SELECT MAX(id) FROM items").fetchone()[0]
        return max(stored, -1 if highest is None else highest + 1)

    def insert(self, items: list[Item], thumbnails: list[bytes]) -> None:
        with self._transaction() as conn:
            if self._columns == _BASE_COLUMNS:  # an index built before whole slides
                rows = [(i.id, i.path, i.label, i.group, i.split, i.x, i.y, i.source, t)
                        for i, t in zip(items, thumbnails)]
                conn.executemany(f"INSERT INTO items ({_BASE_COLUMNS}, thumbnail) VALUES (?,?,?,?,?,?,?,?,?)", rows)
            else:
                rows = [(i.id, i.path, i.label, i.group, i.split, i.x, i.y, i.source, i.mpp, i.mosaic, t)
                        for i, t in zip(items, thumbnails)]
                conn.executemany(f"INSERT INTO items ({self._columns}, thumbnail) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                                 rows)
            if items:
                _raise_next_id(conn, max(i.id for i in items) + 1)

    def reserve_ids(self, end: int) -> None:
        """Never hand out ids below `end`."""
        with self._transaction() as conn:
            _raise_next_id(conn, end)

    def delete(self, ids: Iterable[int]) -> int:
        """Remove rows; returns how many existed."""
        with self._transaction() as conn:
            before = conn.total_changes
            conn.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])
            return conn.total_changes - before

    def lookup(self, ids: Iterable[int]) -> dict[int, Item]:
        ids = sorted({int(i) for i in ids})
        conn, found = self._connection(), {}
        # SQLite allows 32766 parameters per statement; stay well below.
        for start in range(0, len(ids), 5000):
            chunk = ids[start:start + 5000]
            query = f"SELECT {self._columns} FROM items WHERE id IN ({','.join('?' * len(chunk))})"
            found.update((row[0], Item(*row)) for row in conn.execute(query, chunk))
        return found

    def slide_items(self, slide: str, mosaic_only: bool = False) -> list[Item]:
        """The items of one slide (its group), or only its mosaic tiles, in id order."""
        conn = self._connection()
        where = ' AND mosaic = 1' if mosaic_only and self._columns != _BASE_COLUMNS else ''
        rows = conn.execute(f'SELECT {self._columns} FROM items WHERE "group" = ?{where} ORDER BY id', (slide,))
        return [Item(*row) for row in rows]

    def add_slides(self, slides: list[SlideRecord]) -> None:
        if not slides:
            return
        with self._transaction() as conn:
            if not self._has_slides:  # an index built before whole slides gets the table now
                conn.execute(_SLIDES_TABLE)
                self._has_slides = True
            conn.executemany("INSERT OR REPLACE INTO slides VALUES (?,?,?,?,?,?,?,?)",
                             [(s.slide, s.label, s.file, s.width, s.height, s.slide_mpp, s.tile, s.mpp) for s in slides])

    def slides(self) -> list[SlideRecord]:
        conn = self._connection()
        if not self._has_slides:
            return []
        return [SlideRecord(*row) for row in conn.execute("SELECT * FROM slides ORDER BY slide")]

    def slide(self, slide: str) -> SlideRecord | None:
        """The slide named `slide` (looked up as a value, never used as a path), or None."""
        conn = self._connection()
        if not self._has_slides:
            return None
        row = conn.execute("SELECT * FROM slides WHERE slide = ?", (slide,)).fetchone()
        return None if row is None else SlideRecord(*row)

    def thumbnail(self, item_id: int) -> bytes | None:
        row = self._connection().execute("SELECT thumbnail FROM items WHERE id = ?", (int(item_id),)).fetchone()
        return None if row is None else bytes(row[0])

    def ids(self) -> np.ndarray:
        rows = self._connection().execute("SELECT id FROM items")
        return np.array([row[0] for row in rows], dtype=np.int64)

    def filter_columns(self) -> list[tuple[int, str, str, str]]:
        """(id, label, group, source) of every row: what search filters look at. The source is
        the one results show: the path an item was read from when it names none."""
        return self._connection().execute(
            "SELECT id, label, \"group\", CASE WHEN source != '' THEN source ELSE path END FROM items").fetchall()

    def count(self) -> int:
        return int(self._connection().execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def labels(self) -> list[str]:
        return [row[0] for row in self._connection().execute("SELECT DISTINCT label FROM items ORDER BY label")]


class _Closer:
    """Held only by a thread's locals, and in no cycle: freed, closing the connection, as
    soon as the thread ends (or the connection is replaced)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __del__(self) -> None:
        self.conn.close()


def _raise_next_id(conn: sqlite3.Connection, end: int) -> None:
    conn.execute("UPDATE meta SET value = MAX(CAST(value AS INTEGER), ?) WHERE key = 'next_id'", (end,))
