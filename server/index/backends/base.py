"""The interface every vector backend implements.

An index folder = manifest.json + items.sqlite (the item rows and thumbnails: the truth
about which items exist) + a backend holding one vector per item id. The folder (server/index/
folder.py) orders the writes so that a crash leaves at worst vectors without a row, never
a row without its vector: vectors are added before rows and removed after them, under the
folder's write lock. A backend therefore must tolerate, and on `repair` remove, vectors
whose ids have no row.

Searches take one filter per query vector (or None) and must apply it inside the vector
search, returning the k best allowed vectors whenever k are allowed.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from histoseek.errors import HistoseekError
from server.index.filters import ItemFilter
from server.index.store import Item, Store


def no_results(queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of `queries` searches that found nothing yet: -inf and id -1 everywhere."""
    return np.full((queries, k), -np.inf, np.float32), np.full((queries, k), -1, np.int64)


def by_filter(filters: Sequence[ItemFilter | None]) -> dict[ItemFilter | None, list[int]]:
    """The query rows of each distinct filter (None: no filter), searched together."""
    groups: dict[ItemFilter | None, list[int]] = {}
    for row, where in enumerate(filters):
        groups.setdefault(None if where is None or where.empty else where, []).append(row)
    return groups


class BackendUnavailable(HistoseekError):
    """The vector store cannot be reached now (503 at the API; retried on the next request)."""


class VectorBackend(ABC):
    name: ClassVar[str]  # "faiss" | "milvus", as written in the manifest's "backend"
    # Index types this backend can build (the names users pass as `--type`).
    index_types: ClassVar[tuple[str, ...]]

    # -- building ---------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def create(cls, folder: Path, manifest: dict, vectors: np.ndarray, items: list[Item],
               options: dict) -> dict:
        """Store `vectors` (float32 [N, D], unit norm) with `items` (ids 0..N-1 set) for a new
        index folder being written at `folder` (a staging folder: it is renamed afterwards).
        `manifest` holds encoder, dimension, index_type, index_params (as asked) so far;
        `options` the backend's own options (FAISS: codebooks; Milvus: uri, collection).
        Returns the manifest keys this backend adds (the index parameters chosen, the
        collection and URI without secrets, ...)."""

    @classmethod
    @abstractmethod
    def open(cls, folder: Path, manifest: dict, store: Store) -> "VectorBackend":
        """The backend of an existing index folder; `store` is its items.sqlite."""

    # -- reading ----------------------------------------------------------------------------

    @abstractmethod
    def search(self, vectors: np.ndarray, k: int,
               filters: Sequence[ItemFilter | None]) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [N, k], ids int64 [N, k]) of the k best vectors for each query
        (inner product), padded with id -1 where fewer exist; `filters[i]` restricts query i."""

    @abstractmethod
    def held_ids(self) -> np.ndarray:
        """Every id the backend holds a vector for (removed-but-kept tombstones excluded)."""

    @abstractmethod
    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of `ids` (float32 [len(ids), D], in that order; decoded from
        their codes where the index stores codes). The folder asks only for ids it holds
        rows of; an id without a vector raises KeyError."""

    @abstractmethod
    def info(self) -> dict:
        """Counts and sizes for `histoseek index info` and /v1/indexes: at least `vectors`,
        `tombstones`, `code_bytes_per_item`, `index_bytes_per_item`."""

    def check_available(self) -> None:
        """Raise BackendUnavailable with a message saying what to do when the store cannot be reached."""

    def close(self) -> None:
        """Release connections or files (a Milvus Lite file is locked by the process that opened it)."""

    # -- writing (called under the folder's write lock) --------------------------------------

    @abstractmethod
    def add(self, vectors: np.ndarray, items: list[Item]) -> None:
        """Add vectors under their items' ids (ids never used before in this index)."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> None:
        """Remove the vectors of these ids (ids without a vector are ignored)."""

    @abstractmethod
    def needs_repair(self, rows: np.ndarray) -> bool:
        """Whether the vectors held may differ from the store's rows `rows` (checked on opening
        and before every write, so it should be cheap)."""

    @abstractmethod
    def repair(self, rows: np.ndarray) -> np.ndarray:
        """Make the backend agree with the store, whose item ids are `rows`: remove vectors
        without a row; return the rows that have no vector (the folder drops them)."""

    @abstractmethod
    def first_free_id(self, above: int) -> int:
        """The smallest id >= `above` (the store's next id) with no vector at or beyond it:
        where the folder starts handing out new ids."""

    @classmethod
    def validate(cls, manifest: dict, options: dict, count: int) -> None:
        """Refuse, before anything is embedded, what `create` would refuse: an index type or
        parameters this backend cannot build over `count` items, a bad URI."""
