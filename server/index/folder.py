"""Index folders: `manifest.json` + `items.sqlite` + the vectors in a backend (server/index/backends/:
FAISS's `index.faiss` in the folder, or a Milvus collection), searched and edited in place.

Consistency of add and remove (one writer at a time: an fcntl lock on `.write.lock`):
- invariant: every item in the store has its vector in the backend; the backend may hold
  extra vectors, which are never returned: FAISS restricts its searches to the store's
  rows, and every result is looked up in the store; a search that finds a rowless vector
  (Milvus after a crashed edit) repairs the folder and searches again, so it still
  returns k results whenever k items match;
- add: vectors go into the backend first, then the rows are committed to the store in one
  transaction;
- remove: the rows are deleted from the store first, then the vectors from the backend
  (FAISS HNSW cannot remove vectors: there they stay as tombstones);
- so a crash between the two writes leaves at worst rowless vectors. Opening a folder
  checks the invariant; under the lock, rowless vectors are removed from the backend,
  rows without a vector, which only outside tampering can cause, are dropped. New ids
  start above every id the store ever handed out and every vector the backend holds or
  held, so a tombstone or a stale snapshot's vector is never mistaken for a new item.
manifest.json's `count` is refreshed last (and by a repair) and only informs; the
store's rows decide.

A rebuild replaces the whole folder (a new items.sqlite with a new build id): an open
folder notices at its next call and reopens its manifest and backend, so a long-running
API follows rebuilds made by the CLI.
"""
from __future__ import annotations

import fcntl
import json
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from histoseek.atomic import write_json
from histoseek.errors import HistoseekError
from server.index.backends import BackendUnavailable, VectorBackend, open_backend
from server.index.filters import ItemFilter
from server.index.store import Item, Store

log = logging.getLogger(__name__)

STORE_FILE, MANIFEST_FILE, LOCK_FILE = "items.sqlite", "manifest.json", ".write.lock"


class ModelMismatch(HistoseekError):
    """The served model is not the one the index was built with."""


class UnknownItems(HistoseekError):
    """Item ids a request names that the index does not hold (422 at the API)."""


@dataclass(frozen=True)
class Hit:
    id: int
    score: float
    item: Item


def check_model(manifest: dict, name: str, served_sha256: str | None, served_dim: int) -> None:
    """Refuse a served model other than the one the index was built with."""
    encoder = manifest["encoder"]
    if served_dim != manifest["dimension"]:
        raise ModelMismatch(
            f"index {name!r} holds {manifest['dimension']}-dimensional embeddings of encoder {encoder!r}, "
            f"but Triton's model {encoder!r} returns {served_dim}-dimensional ones; rebuild the index "
            "(histoseek index build) or serve the model version it was built with"
        )
    if served_sha256 != manifest["model_sha256"]:
        version = f" (version {manifest['model_version']})" if manifest.get("model_version") else ""
        raise ModelMismatch(
            f"index {name!r} was built with model {encoder!r}{version} sha256 {manifest['model_sha256']}, but Triton "
            f"serves {encoder!r} with sha256 {served_sha256}; rebuild the index with the served model "
            "(histoseek index build) or serve the model version the index was built with"
        )


class IndexFolder:
    """An index folder opened for searching and editing; safe to share between threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        missing = [f for f in (STORE_FILE, MANIFEST_FILE) if not (self.path / f).is_file()]
        if missing:
            raise HistoseekError(f"{self.path} is not an index folder (it lacks {', '.join(missing)}); "
                                 "build one with `histoseek index build`")
        self.store = Store(self.path / STORE_FILE)
        self._reopen_lock = threading.Lock()
        self._retired: list[VectorBackend] = []  # replaced by a rebuild; searches may still hold them
        self._open()
        try:
            needs_repair = self._differs(self.store.ids())
        except BackendUnavailable as exc:
            # Searches answer 503 until it is back; the check runs again before every write.
            log.warning("%s: cannot check the vectors now: %s", self.path, exc)
            needs_repair = False
        if needs_repair:  # the lock only then: opening a folder to read it must not need write access
            with self._write_lock():
                self._repair_if_needed()

    def _open(self) -> None:
        # The build id first: state read after it is never older than the build it names.
        self._build = self.store.signature()[0]
        self._manifest = _read_manifest(self.path)
        self._backend: VectorBackend = open_backend(self.path, self._manifest, self.store)

    def _current(self) -> None:
        """Reopen manifest and backend if the folder was rebuilt since they were read."""
        if self.store.signature()[0] != self._build:
            with self._reopen_lock:
                if self.store.signature()[0] != self._build:
                    log.info("%s was rebuilt: reopening it", self.path)
                    self._retired.append(self._backend)
                    self._open()

    @property
    def manifest(self) -> dict:
        self._current()
        return self._manifest

    @property
    def backend(self) -> VectorBackend:
        self._current()
        return self._backend

    def check_available(self) -> None:
        """Raise BackendUnavailable when the vectors' store cannot be reached."""
        self.backend.check_available()

    def close(self) -> None:
        for backend in [*self._retired, self._backend]:
            backend.close()
        self._retired.clear()

    def search(self, vectors: np.ndarray, k: int,
               where: ItemFilter | Sequence[ItemFilter | None] | None = None) -> list[list[Hit]]:
        """The k best items per query vector among those `where` admits (one filter for all
        queries, or one per query), best first."""
        if k < 1:
            raise HistoseekError(f"k must be at least 1, got {k}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        filters = list(where) if isinstance(where, (list, tuple)) else [where] * len(vectors)
        if len(filters) != len(vectors):
            raise HistoseekError(f"{len(vectors)} query vectors need as many filters, got {len(filters)}")
        for attempt in range(2):
            scores, ids = self.backend.search(vectors, k, filters)
            items = self.store.lookup(ids[ids >= 0])
            if attempt or all(int(i) in items for i in ids[ids >= 0].tolist()):
                break
            # A hit without a row: removed by a writer since the search (then the repair finds
            # nothing to do), or a vector a crashed edit left behind: repair, search again.
            with self._write_lock():
                self._repair_if_needed()
        return [[Hit(int(i), float(s), items[i]) for i, s in zip(row_ids, row_scores) if i in items]
                for row_ids, row_scores in zip(ids, scores)]

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of items `ids` (float32 [len(ids), D]); UnknownItems names the
        ids this index holds no item for."""
        wanted = [int(i) for i in ids]
        known = self.store.lookup(wanted)
        unknown = sorted({i for i in wanted if i not in known})
        if unknown:
            raise UnknownItems(f"index {self.name!r} holds no item {', '.join(map(str, unknown[:10]))}"
                               f"{' …' if len(unknown) > 10 else ''}; mark items of its latest results")
        try:
            return self.backend.vectors(wanted)
        except KeyError as exc:  # a row whose vector a crashed edit lost: the next write repairs it
            raise UnknownItems(f"index {self.name!r} has no vector for items {exc.args[0]}; search again") from None

    # -- writing ---------------------------------------------------------------------------

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        # flock excludes other processes and, through separate open files, other threads.
        with open(self.path / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _differs(self, rows: np.ndarray) -> bool:
        """Whether backend or manifest may disagree with the store, whose item ids are `rows`."""
        return self.backend.needs_repair(rows) or self._manifest.get("count") != len(rows)

    def _repair_if_needed(self) -> None:
        """Bring backend and store back to the invariant if they differ (under the write lock)."""
        rows = self.store.ids()
        if not self._differs(rows):
            return
        orphans = np.setdiff1d(self.backend.held_ids(), rows)
        if len(orphans):
            # Their ids are never handed out again: a reader's older snapshot may still hold
            # these vectors, and must not find a new item's row under their ids.
            self.store.reserve_ids(int(orphans.max()) + 1)
        lost = self.backend.repair(rows)
        if len(lost):
            log.warning("%s: dropping %d items whose vectors are missing", self.path, len(lost))
            self.store.delete(lost.tolist())
        self._update_manifest()

    def _update_manifest(self) -> None:
        self._manifest = {**self._manifest, "count": self.store.count(),
                          "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json(self.path / MANIFEST_FILE, self._manifest)

    def add(self, embeddings: np.ndarray, items: list[Item], thumbnails: list[bytes]) -> list[int]:
        """Add items (their `id` is ignored) with their embeddings; returns the new ids."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(items), self.manifest["dimension"]) or len(thumbnails) != len(items):
            raise HistoseekError(f"{len(items)} items need {len(items)} thumbnails and embeddings shaped "
                                 f"[{len(items)}, {self.manifest['dimension']}], got {list(embeddings.shape)}")
        with self._write_lock():
            self._repair_if_needed()
            first = self.backend.first_free_id(self.store.next_id())
            items = [replace(item, id=first + n) for n, item in enumerate(items)]
            self.backend.add(embeddings, items)
            self.store.insert(items, thumbnails)
            self._update_manifest()
        return [item.id for item in items]

    def remove(self, ids: list[int]) -> int:
        """Remove items by id; returns how many existed."""
        with self._write_lock():
            self._repair_if_needed()
            removed = self.store.delete(ids)
            if removed:
                self.backend.remove(np.asarray(ids, dtype=np.int64))
                self._update_manifest()
        return removed

    def info(self) -> dict:
        manifest = self.manifest
        files = [p for p in self.path.rglob("*") if p.is_file()]  # a Milvus Lite database inside is a folder
        return {
            "name": self.name, "path": str(self.path), "backend": manifest.get("backend", "faiss"),
            **{key: manifest.get(key) for key in
               ("encoder", "model_sha256", "model_version", "dimension", "metric", "index_type",
                "index_params", "input_size", "created")},
            "count": self.store.count(), **self.backend.info(),
            "size_on_disk_bytes": sum(p.stat().st_size for p in files),
        }


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise HistoseekError(f"cannot read {path / MANIFEST_FILE} ({exc}); rebuild the index") from exc


def remove_items(index_dir: Path, ids: list[int]) -> int:
    """Remove items by id; returns how many there were."""
    folder = IndexFolder(Path(index_dir))
    try:
        return folder.remove(ids)
    finally:
        folder.close()


def index_info(index_dir: Path) -> dict:
    """Encoder, model checksum, backend, type, counts, bytes per item and size on disk."""
    folder = IndexFolder(Path(index_dir))
    try:
        return folder.info()
    finally:
        folder.close()
