"""The store's rows as arrays, for evaluating filters with numpy instead of a query per search.

The FAISS backend turns a filter into the allowed ids (its IDSelector); the Milvus backend
only counts them, to choose how to search (a count from Milvus Lite scans every row in
Python: 200 ms at 20k items).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from server.index.filters import FIELDS, ItemFilter
from server.index.store import Store


@dataclass
class Catalog:
    """Item ids, and each filterable field as integer codes."""
    ids: np.ndarray
    codes: dict[str, np.ndarray]
    values: dict[str, dict[str, int]]

    @classmethod
    def read(cls, store: Store) -> "Catalog":
        rows = store.filter_columns()
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        codes, values = {}, {}
        for column, name in enumerate(FIELDS, start=1):
            table: dict[str, int] = {}
            codes[name] = np.fromiter((table.setdefault(r[column], len(table)) for r in rows), np.int32, len(rows))
            values[name] = table
        return cls(ids, codes, values)

    def allowed(self, where: ItemFilter | None) -> np.ndarray:
        """Sorted ids of the rows that `where` admits."""
        mask = np.ones(len(self.ids), bool)
        for name in FIELDS if where is not None else ():
            for wanted, keep in ((where.include(name), True), (where.exclude(name), False)):
                if wanted:
                    codes = [self.values[name][v] for v in wanted if v in self.values[name]]
                    hit = np.isin(self.codes[name], np.asarray(codes, np.int32))
                    mask &= hit if keep else ~hit
        return np.sort(self.ids[mask])


class CurrentCatalog:
    """The catalog of a store's current rows, read again after every commit to it."""

    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()
        self._held: tuple[tuple, Catalog] | None = None

    def get(self, signature: tuple | None = None) -> Catalog:
        """The catalog of the store at `signature` (default: as it is now)."""
        signature = self.store.signature() if signature is None else signature
        with self._lock:
            if self._held is None or self._held[0] != signature:
                self._held = (signature, Catalog.read(self.store))
            return self._held[1]
