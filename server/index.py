"""Index folders: `index.faiss` + `items.sqlite` + `manifest.json`, searched and edited in place.

Consistency of add and remove (one writer at a time: an fcntl lock on `.write.lock`):
- invariant: every item in the store has its vector in index.faiss; the index may hold
  extra vectors, which are never returned because results are looked up in the store;
- add: vectors go into index.faiss first (temporary file + os.replace), then the rows
  are committed to the store in one transaction;
- remove: the rows are deleted from the store first, then the vectors from index.faiss;
  HNSW cannot remove vectors, so there the rowless vectors stay as tombstones;
- so a crash between the two writes leaves at worst rowless vectors. Opening a folder
  checks the invariant; under the lock, rowless vectors are removed from the index
  (kept as tombstones for HNSW), rows without a vector, which only outside tampering
  can cause, are dropped, and a killed writer's temporary files are deleted. New ids
  start above every id the store ever handed out and every vector the index holds or
  held, so a tombstone or a stale snapshot's vector is never mistaken for a new item.
manifest.json's `count` is refreshed last (and by a repair) and only informs; the
store's rows decide.

Readers never lock: they keep an in-memory snapshot of the FAISS index and replace it
whole when the store's (build_id, generation) or index.faiss's file identity changes, so
edits made by another process (the CLI while the API serves) show up at the next search.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np

from histoseek.atomic import temporary_path, write_json
from histoseek.errors import HistoseekError
from server.index_types import apply_search_params, code_bytes_per_item, search_parameters, searchable_copy
from server.store import Item, Store

log = logging.getLogger(__name__)

FAISS_FILE, STORE_FILE, MANIFEST_FILE, LOCK_FILE = "index.faiss", "items.sqlite", "manifest.json", ".write.lock"


class ModelMismatch(HistoseekError):
    """The served model is not the one the index was built with."""


@dataclass(frozen=True)
class Hit:
    id: int
    score: float
    item: Item


def faiss_ids(index: faiss.Index) -> np.ndarray:
    """Every id the FAISS index holds a vector for."""
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    invlists = faiss.extract_index_ivf(index).invlists
    parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
             for i in range(invlists.nlist) if invlists.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


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


@dataclass(frozen=True)
class _Snapshot:
    faiss: faiss.Index  # on the GPUs when faiss-gpu sees any
    signature: tuple
    dead: int  # vectors without a row (HNSW tombstones): how far to over-fetch
    code_bytes: int  # per item, read from the CPU index (a GPU copy does not tell)


class IndexFolder:
    """An index folder opened for searching and editing; safe to share between threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        missing = [f for f in (FAISS_FILE, STORE_FILE, MANIFEST_FILE) if not (self.path / f).is_file()]
        if missing:
            raise HistoseekError(f"{self.path} is not an index folder (it lacks {', '.join(missing)}); "
                                 "build one with `histoseek index build`")
        self.store = Store(self.path / STORE_FILE)
        self._reload_lock = threading.Lock()
        if self._needs_repair(self._load()):
            with self._write_lock():
                self._install(self._load_for_write(save=True))
                self._update_manifest()

    @property
    def manifest(self) -> dict:
        return self._manifest

    # -- reading ---------------------------------------------------------------------------

    def _signature(self) -> tuple:
        stat = os.stat(self.path / FAISS_FILE)
        return self.store.signature(), stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _read(self) -> faiss.Index:
        self._manifest = _read_manifest(self.path)
        index = faiss.read_index(str(self.path / FAISS_FILE))
        return apply_search_params(index, self._manifest["index_type"], self._manifest["index_params"])

    def _load(self) -> faiss.Index:
        """Read the folder into a new snapshot; returns the CPU index read."""
        # The signature is read before the files: a snapshot may be newer than its
        # signature (then it is reloaded once more), never older.
        signature = self._signature()
        index = self._read()
        self._snapshot = self._snapshot_of(index, signature)
        return index

    def _install(self, index: faiss.Index) -> None:
        """Searches see `index`, just edited and saved by this process."""
        self._snapshot = self._snapshot_of(index, self._signature())

    def _snapshot_of(self, index: faiss.Index, signature: tuple) -> _Snapshot:
        return _Snapshot(searchable_copy(index, self._manifest["index_type"]), signature,
                         max(0, index.ntotal - self.store.count()), code_bytes_per_item(index))

    def snapshot(self) -> _Snapshot:
        """The current in-memory index, reloaded first if the folder changed on disk."""
        snapshot = self._snapshot
        if snapshot.signature != self._signature():
            with self._reload_lock:
                if self._snapshot.signature != self._signature():
                    self._load()
                snapshot = self._snapshot
        return snapshot

    def search(self, vectors: np.ndarray, k: int, exclude_groups: list[str] | None = None) -> list[list[Hit]]:
        """The k best live items per query vector, skipping each query's own group if given."""
        if k < 1:
            raise HistoseekError(f"k must be at least 1, got {k}")
        snapshot = self.snapshot()
        index, total = snapshot.faiss, snapshot.faiss.ntotal
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        results: list[list[Hit]] = [[] for _ in range(len(vectors))]
        extra = snapshot.dead + (self.store.largest_group() if exclude_groups else 0)
        fetch, pending = min(total, k + extra), list(range(len(vectors)))
        # Rowless vectors and the query's group are filtered out after the search; when
        # that leaves fewer than k, search again deeper (rare: the over-fetch covers both).
        while pending and fetch > 0:
            params = search_parameters(self._manifest["index_type"], self._manifest["index_params"], fetch)
            scores, ids = index.search(vectors[pending], fetch, params=params)
            items = self.store.lookup(ids[ids >= 0])
            unfinished = []
            for row, query in enumerate(pending):
                skip = exclude_groups[query] if exclude_groups else None
                hits = [Hit(int(i), float(s), items[i]) for i, s in zip(ids[row], scores[row])
                        if i in items and items[i].group != skip]
                results[query] = hits[:k]
                if len(hits) < k and fetch < total:
                    unfinished.append(query)
            pending, fetch = unfinished, min(total, fetch * 2)
        return results

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

    def _needs_repair(self, index: faiss.Index) -> bool:
        held, rows = set(faiss_ids(index).tolist()), set(self.store.ids().tolist())
        removable = self._manifest["index_type"] != "hnsw"
        return (bool(rows - held) or (removable and bool(held - rows)) or self._manifest.get("count") != len(rows)
                or any(self.path.glob(".*.tmp")))

    def _load_for_write(self, save: bool = False) -> faiss.Index:
        """A fresh copy of the on-disk index, repaired; readers keep their snapshot meanwhile."""
        # Temporary files of a killed writer (each may be a whole copy of index.faiss); any
        # live writer would hold the lock we hold.
        for stale in self.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        index = self._read()  # never a snapshot: another process may have written since
        held, rows = faiss_ids(index), self.store.ids()
        lost = np.setdiff1d(rows, held)
        if len(lost):
            log.warning("%s: dropping %d items whose vectors are missing from %s", self.path, len(lost), FAISS_FILE)
            self.store.delete(lost.tolist())
        orphans = np.setdiff1d(held, rows)
        if len(orphans) and self._manifest["index_type"] != "hnsw":
            log.warning("%s: removing %d vectors left by an interrupted write", self.path, len(orphans))
            # Their ids are never handed out again: a reader's older snapshot may still hold
            # these vectors, and must not find a new item's row under their ids.
            self.store.reserve_ids(int(orphans.max()) + 1)
            index.remove_ids(orphans)
            if save:
                self._save_faiss(index)
        return index

    def _save_faiss(self, index: faiss.Index) -> None:
        with temporary_path(self.path / FAISS_FILE) as tmp:
            faiss.write_index(index, str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())

    def _update_manifest(self) -> None:
        self._manifest = {**self._manifest, "count": self.store.count(),
                          "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json(self.path / MANIFEST_FILE, self._manifest)

    def add(self, embeddings: np.ndarray, items: list[Item], thumbnails: list[bytes]) -> list[int]:
        """Add items (their `id` is ignored) with their embeddings; returns the new ids."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(items), self._manifest["dimension"]) or len(thumbnails) != len(items):
            raise HistoseekError(f"{len(items)} items need {len(items)} thumbnails and embeddings shaped "
                                 f"[{len(items)}, {self._manifest['dimension']}], got {list(embeddings.shape)}")
        with self._write_lock():
            index = self._load_for_write()
            held = faiss_ids(index)
            first = max(self.store.next_id(), int(held.max()) + 1 if len(held) else 0)
            ids = np.arange(first, first + len(items), dtype=np.int64)
            index.add_with_ids(embeddings, ids)
            self._save_faiss(index)
            self.store.insert([replace(item, id=int(i)) for item, i in zip(items, ids)], thumbnails)
            self._update_manifest()
            self._install(index)
        return ids.tolist()

    def remove(self, ids: list[int]) -> int:
        """Remove items by id; returns how many existed."""
        with self._write_lock():
            index = self._load_for_write()
            removed = self.store.delete(ids)
            if not removed:
                return 0
            if self._manifest["index_type"] != "hnsw":
                index.remove_ids(np.asarray(ids, dtype=np.int64))
                self._save_faiss(index)
            self._update_manifest()
            self._install(index)
        return removed

    def info(self) -> dict:
        snapshot = self.snapshot()
        index = snapshot.faiss
        count = self.store.count()
        index_bytes = (self.path / FAISS_FILE).stat().st_size
        files = [p for p in self.path.iterdir() if p.is_file()]
        return {
            "name": self.name, "path": str(self.path),
            **{key: self._manifest.get(key) for key in
               ("encoder", "model_sha256", "model_version", "dimension", "metric", "index_type",
                "index_params", "input_size", "created")},
            "count": count, "vectors": int(index.ntotal), "tombstones": max(0, index.ntotal - count),
            "code_bytes_per_item": snapshot.code_bytes,
            "index_bytes_per_item": round(index_bytes / max(1, index.ntotal), 1),
            "size_on_disk_bytes": sum(p.stat().st_size for p in files),
        }


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise HistoseekError(f"cannot read {path / MANIFEST_FILE} ({exc}); rebuild the index") from exc


# -- the functions the CLI calls -----------------------------------------------------------

def build_index(encoder: str, data: Path, out: Path, *, index_type: str = "flat",
                triton_url: str = "localhost:8001", protocol: str = "grpc", batch: int = 32,
                params: dict | None = None, repo: Path = Path("model_repository")) -> Path:
    """Embed a dataset folder through Triton and write the index folder `out` atomically."""
    from server.build import build  # server.build imports this module

    return build(encoder, Path(data), Path(out), index_type=index_type, triton_url=triton_url,
                 protocol=protocol, batch=batch, params=params, repo=Path(repo))


def add_items(index_dir: Path, source: Path | list[Path], *, label: str | None = None, group: str | None = None,
              triton_url: str = "localhost:8001", protocol: str = "grpc", batch: int = 32) -> list[int]:
    """Add a dataset folder (labels from it) or image files (all labelled `label`); the new ids."""
    from server.build import add_files  # server.build imports this module

    return add_files(IndexFolder(Path(index_dir)), source, label=label, group=group,
                     triton_url=triton_url, protocol=protocol, batch=batch)


def remove_items(index_dir: Path, ids: list[int]) -> int:
    """Remove items by id; returns how many there were."""
    return IndexFolder(Path(index_dir)).remove(ids)


def index_info(index_dir: Path) -> dict:
    """Encoder, model checksum, type, counts, bytes per item and size on disk."""
    return IndexFolder(Path(index_dir)).info()
