"""The FAISS backend: one `index.faiss` file in the index folder, searched in memory.

Readers never lock: they keep an in-memory snapshot of the file and replace it whole when
the file's identity changes (every edit writes a new file with os.replace), so edits made
by another process (the CLI while the API serves) show up at the next search. Writers,
under the folder's write lock, edit a copy and replace the file.

HNSW cannot remove vectors: a removed item's vector stays as a tombstone (a vector
without a row). Tombstones, and the rowless vectors a crash between the two writes of an
edit can leave, are kept out of results by the same id selector that applies filters.
Filters (server/index/filters.py) become an IDSelector over the allowed ids, passed to FAISS
through SearchParameters, so the search itself only ever ranks allowed vectors:
- flat, ivfpq: the selector; ivfpq searches every list when its nprobe lists hold fewer
  than k allowed vectors;
- hnsw: an exact search of the allowed vectors when the filter admits up to
  HNSW_EXACT_MAX_ITEMS items (or the graph search came back short), else the selector;
- pq: FAISS's IndexPQ takes no selector: the allowed items' codes are searched as a
  sub-index with the same codebooks, i.e. the same asymmetric distances.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from histoseek.atomic import temporary_path
from histoseek.errors import HistoseekError
from server.index.backends.base import VectorBackend, by_filter, no_results
from server.index.backends.catalog import CurrentCatalog
from server.index.filters import ItemFilter
from server.index.types import (INDEX_TYPES, apply_search_params, check_index_type, code_bytes_per_item,
                                new_faiss_index, search_parameters, searchable_copy)
from server.index.store import Item, Store

log = logging.getLogger(__name__)

FAISS_FILE = "index.faiss"
# HNSW with a selector walks the graph through disallowed nodes, and when the filter follows
# the embedding's own clusters (a label) the allowed ones can lie beyond its beam: on 800
# clustered tiles a one-label filter found only half of the true top 25 for some queries.
# Up to this many allowed items an exact scan of their vectors is both right and cheap
# (~50k x 128 dimensions: a few ms); beyond, the graph search with a beam widened by the
# filter's share (recall measured by `histoseek bench scale`).
HNSW_EXACT_MAX_ITEMS = 50_000
ALLOWED_CACHE_BYTES = 64 << 20  # the allowed ids of recent filters a snapshot keeps (8 bytes per id)


def faiss_ids(index: faiss.Index) -> np.ndarray:
    """Every id the FAISS index holds a vector for."""
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    invlists = faiss.extract_index_ivf(index).invlists
    parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
             for i in range(invlists.nlist) if invlists.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def stored_vectors(folder: Path) -> np.ndarray:
    """The vectors of an index folder's `index.faiss` in id order (types that map ids to
    stored vectors or codes: flat, hnsw, pq; codes come back decoded)."""
    index = faiss.read_index(str(Path(folder) / FAISS_FILE))
    return np.stack([index.reconstruct(int(i)) for i in np.sort(faiss_ids(index))])


@dataclass
class _Snapshot:
    cpu: faiss.Index  # as read from the file: edits copy it, filtered searches use it
    searchable: faiss.Index  # on the GPUs when faiss-gpu sees any
    file_id: tuple
    code_bytes: int
    held: np.ndarray | None = None  # ids with a vector, sorted; read on first need
    rows: tuple = ((), -1)  # (store signature, its row count)
    # (store signature, filter) -> (allowed ids with a vector, their selector); API threads share it
    allowed: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def held_ids(self) -> np.ndarray:
        if self.held is None:
            self.held = np.sort(faiss_ids(self.cpu))
        return self.held

    def reconstruct(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of `ids` (decoded codes for the PQ types), in that order."""
        wanted = np.asarray(ids, np.int64)
        missing = wanted[~np.isin(wanted, self.held_ids())]
        if missing.size:
            raise KeyError(missing.tolist())
        if isinstance(self.cpu, faiss.IndexIDMap2):
            rows = [self.cpu.reconstruct(int(i)) for i in wanted]
        else:
            rows = _reconstruct_from_lists(faiss.extract_index_ivf(self.cpu), wanted)
        return np.asarray(rows, np.float32).reshape(len(wanted), self.cpu.d)


def _reconstruct_from_lists(ivf: faiss.IndexIVF, wanted: np.ndarray) -> list[np.ndarray]:
    """Vectors of an IVF index by id, found by scanning its inverted lists' ids. Faiss's own
    lookup needs a direct map, which would change the shared index (and be saved with its
    next edit, about 16 bytes an item): a scan costs time instead, linear in the items,
    for the few ids a refinement names."""
    invlists, found = ivf.invlists, {}
    for list_no in range(invlists.nlist):
        size = invlists.list_size(list_no)
        if not size:
            continue
        ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), size)
        for offset in np.flatnonzero(np.isin(ids, wanted)):
            vector = np.empty(ivf.d, np.float32)
            ivf.reconstruct_from_offset(list_no, int(offset), faiss.swig_ptr(vector))
            found[int(ids[offset])] = vector
    return [found[int(i)] for i in wanted]


class FaissBackend(VectorBackend):
    name = "faiss"
    index_types = INDEX_TYPES

    @classmethod
    def create(cls, folder: Path, manifest: dict, vectors: np.ndarray, items: list[Item], options: dict) -> dict:
        index, params = new_faiss_index(manifest["index_type"], manifest["dimension"], vectors,
                                        manifest.get("index_params"), options.get("codebooks"))
        index.add_with_ids(vectors, np.array([item.id for item in items], dtype=np.int64))
        faiss.write_index(index, str(Path(folder) / FAISS_FILE))
        return {"index_params": params}

    @classmethod
    def validate(cls, manifest: dict, options: dict, count: int) -> None:
        check_index_type(manifest["index_type"], count)

    @classmethod
    def open(cls, folder: Path, manifest: dict, store: Store) -> "FaissBackend":
        if not (Path(folder) / FAISS_FILE).is_file():
            raise HistoseekError(f"{folder} is not an index folder (it lacks {FAISS_FILE}); "
                                 "build one with `histoseek index build`")
        return cls(Path(folder), manifest, store)

    def __init__(self, folder: Path, manifest: dict, store: Store):
        self.path, self.store = folder, store
        self.index_type, self.params = manifest["index_type"], manifest["index_params"]
        self._reload_lock = threading.Lock()
        self._catalog = CurrentCatalog(store)
        self._snapshot = self._read()

    # -- reading ---------------------------------------------------------------------------

    def _file_id(self) -> tuple:
        stat = os.stat(self.path / FAISS_FILE)
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _read(self) -> _Snapshot:
        # The identity is read before the file: a snapshot may be newer than its identity
        # (then it is read once more), never older.
        file_id = self._file_id()
        index = apply_search_params(faiss.read_index(str(self.path / FAISS_FILE)), self.index_type, self.params)
        return self._snapshot_of(index, file_id)

    def _snapshot_of(self, index: faiss.Index, file_id: tuple) -> _Snapshot:
        return _Snapshot(index, searchable_copy(index, self.index_type), file_id, code_bytes_per_item(index))

    def snapshot(self) -> _Snapshot:
        """The current in-memory index, read again first if the file changed on disk."""
        snapshot = self._snapshot
        if snapshot.file_id != self._file_id():
            with self._reload_lock:
                if self._snapshot.file_id != self._file_id():
                    self._snapshot = self._read()
                snapshot = self._snapshot
        return snapshot

    def _row_count(self, snapshot: _Snapshot, signature: tuple) -> int:
        if snapshot.rows[0] != signature:
            snapshot.rows = (signature, self.store.count())
        return snapshot.rows[1]

    def search(self, vectors: np.ndarray, k: int,
               filters: Sequence[ItemFilter | None]) -> tuple[np.ndarray, np.ndarray]:
        snapshot, signature = self.snapshot(), self.store.signature()  # one look at the store per search
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        scores, ids = no_results(len(vectors), k)
        # Vectors without a row (HNSW tombstones, a crashed edit's leftovers) must not
        # take result places: then every search is restricted to the store's rows.
        rowless = snapshot.cpu.ntotal != self._row_count(snapshot, signature)
        for where, rows in by_filter(filters).items():
            if where is None and not rowless:
                params = search_parameters(self.index_type, self.params, k)
                found = snapshot.searchable.search(vectors[rows], k, params=params)
            else:
                found = self._search_allowed(snapshot, vectors[rows], k, *self._allowed(snapshot, where, signature))
            scores[rows], ids[rows] = found
        return scores, ids

    def _allowed(self, snapshot: _Snapshot, where: ItemFilter | None,
                 signature: tuple) -> tuple[np.ndarray, faiss.IDSelector | None]:
        """Sorted ids that `where` admits and that have a vector (the store at `signature`), and
        their selector; the last few filters' are kept, as a user paging through results or a
        demo's label filter repeats them."""
        key = (signature, where)
        with snapshot.lock:
            cached = snapshot.allowed.get(key)
        if cached is not None:
            return cached
        allowed = np.intersect1d(self._catalog.get(signature).allowed(where), snapshot.held_ids(),
                                 assume_unique=True)
        cached = (allowed, _bitmap_selector(allowed) if len(allowed) else None)
        with snapshot.lock:
            snapshot.allowed[key] = cached
            while (len(snapshot.allowed) > 1 and sum(a.nbytes + (s.bitmap_array.nbytes if s else 0)
                                                     for a, s in snapshot.allowed.values()) > ALLOWED_CACHE_BYTES):
                snapshot.allowed.pop(next(iter(snapshot.allowed)))  # the oldest
        return cached

    def _search_allowed(self, snapshot: _Snapshot, queries: np.ndarray, k: int, allowed: np.ndarray,
                        selector: faiss.IDSelector | None) -> tuple[np.ndarray, np.ndarray]:
        """The k best of the `allowed` ids (sorted; `selector` selects them) for each query, on
        the CPU index."""
        index, want = snapshot.cpu, min(k, len(allowed))
        if not len(allowed):
            return no_results(len(queries), k)
        if self.index_type == "pq":
            return _subset_search(index, queries, k, allowed)
        if self.index_type == "hnsw":
            if len(allowed) > HNSW_EXACT_MAX_ITEMS:
                # Disallowed nodes are walked but not kept: widen the beam by the share they take.
                share = len(allowed) / index.ntotal
                efsearch = int(min(index.ntotal, max(self.params.get("ef_search", 64), k) / share))
                found = index.search(queries, k, params=faiss.SearchParametersHNSW(sel=selector, efSearch=efsearch))
                if (found[1] >= 0).sum(axis=1).min() >= want:
                    return found
            return _subset_search(index, queries, k, allowed)
        if self.index_type == "ivfpq":
            ivf = faiss.extract_index_ivf(index)
            found = index.search(queries, k, params=faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe))
            if (found[1] >= 0).sum(axis=1).min() >= want:
                return found
            # The probed lists held fewer than k allowed vectors: search every list.
            return index.search(queries, k, params=faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nlist))
        return index.search(queries, k, params=faiss.SearchParameters(sel=selector))

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        return self.snapshot().reconstruct(ids)

    def held_ids(self) -> np.ndarray:
        return self.snapshot().held_ids()

    def first_free_id(self, above: int) -> int:
        held = self.held_ids()  # sorted; HNSW tombstones and a crashed add's vectors included
        return max(int(above), int(held[-1]) + 1 if len(held) else 0)

    def info(self) -> dict:
        snapshot = self.snapshot()
        total = snapshot.cpu.ntotal
        return {"vectors": int(total), "tombstones": max(0, total - self.store.count()),
                "code_bytes_per_item": snapshot.code_bytes,
                "index_bytes_per_item": round((self.path / FAISS_FILE).stat().st_size / max(1, total), 1)}

    # -- writing (under the folder's write lock) ---------------------------------------------

    def _editable(self) -> faiss.Index:
        """A private copy of the on-disk index (readers keep searching the snapshot)."""
        for stale in self.path.glob(".*.tmp"):  # a killed writer's; a live one would hold the lock
            stale.unlink(missing_ok=True)
        snapshot = self.snapshot()  # never older than the file: another process may have written
        return faiss.clone_index(snapshot.cpu)

    def _save(self, index: faiss.Index) -> None:
        with temporary_path(self.path / FAISS_FILE) as tmp:
            faiss.write_index(index, str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        self._snapshot = self._snapshot_of(index, self._file_id())

    def needs_repair(self, rows: np.ndarray) -> bool:
        held = self.held_ids()
        removable = self.index_type != "hnsw"
        return (bool(len(np.setdiff1d(rows, held))) or (removable and bool(len(np.setdiff1d(held, rows))))
                or any(self.path.glob(".*.tmp")))

    def repair(self, rows: np.ndarray) -> np.ndarray:
        index = self._editable()
        held = faiss_ids(index)
        orphans = np.setdiff1d(held, rows)
        if len(orphans) and self.index_type != "hnsw":
            log.warning("%s: removing %d vectors left by an interrupted write", self.path, len(orphans))
            index.remove_ids(orphans)
            self._save(index)
        return np.setdiff1d(rows, held)

    def add(self, vectors: np.ndarray, items: list[Item]) -> None:
        index = self._editable()
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                           np.array([item.id for item in items], dtype=np.int64))
        self._save(index)

    def remove(self, ids: np.ndarray) -> None:
        if self.index_type == "hnsw":
            return  # tombstones: excluded from results by the search's row selector
        index = self._editable()
        index.remove_ids(np.asarray(ids, dtype=np.int64))
        self._save(index)


def _bitmap_selector(allowed: np.ndarray) -> faiss.IDSelector:
    """A selector of the `allowed` ids; it keeps its bitmap alive with it."""
    bits = np.zeros(int(allowed[-1]) + 1, bool)
    bits[allowed] = True
    bitmap = np.packbits(bits, bitorder="little")
    selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    selector.bitmap_array = bitmap  # FAISS holds only a pointer
    return selector


def _positions_of(index: faiss.Index, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in the storage, their ids) of the allowed ids of an IndexIDMap2."""
    id_map = faiss.vector_to_array(index.id_map).astype(np.int64)
    positions = np.flatnonzero(np.isin(id_map, allowed, assume_unique=True))
    return positions, id_map[positions]


def _subset_search(index: faiss.Index, queries: np.ndarray, k: int,
                   allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact search (for pq: exact asymmetric distances) over the allowed items only."""
    inner = faiss.downcast_index(index.index)
    positions, ids = _positions_of(index, allowed)
    if isinstance(inner, faiss.IndexHNSW):
        storage = faiss.downcast_index(inner.storage)
        scores, found = storage.search(queries, k, params=faiss.SearchParameters(sel=_bitmap_selector(positions)))
        found = np.where(found >= 0, np.searchsorted(positions, found), -1)  # storage position -> allowed rank
    else:  # IndexPQ: a sub-index of the allowed items' codes (in allowed order), with the same codebooks
        sub = faiss.IndexPQ(inner.d, inner.pq.M, inner.pq.nbits, inner.metric_type)
        sub.pq = inner.pq
        # A view of the stored codes (no copy of the whole index), of which the allowed are taken.
        stored = faiss.rev_swig_ptr(inner.codes.data(), inner.ntotal * inner.code_size)
        codes = np.asarray(stored).reshape(inner.ntotal, inner.code_size)[positions]
        faiss.copy_array_to_vector(codes.ravel(), sub.codes)
        sub.ntotal, sub.is_trained = len(positions), True
        scores, found = sub.search(queries, k)
    return scores, np.where(found >= 0, ids[np.maximum(found, 0)], -1)
