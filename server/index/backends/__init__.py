"""Where an index folder's vectors live: FAISS files in the folder (default) or a Milvus collection.

Both implement `VectorBackend` (base.py); the index folder, the API, the CLI and the
benchmarks see only that interface. `open_backend` picks one from the folder's manifest.
"""
from __future__ import annotations

from pathlib import Path

from server.index.backends.base import BackendUnavailable, VectorBackend
from server.index.store import Store

BACKENDS = ("faiss", "milvus")


def backend_class(name: str) -> type[VectorBackend]:
    # Imported on demand: a FAISS-only install never loads pymilvus, and the reverse.
    if name == "faiss":
        from server.index.backends.faiss_backend import FaissBackend
        return FaissBackend
    if name == "milvus":
        from server.index.backends.milvus_backend import MilvusBackend
        return MilvusBackend
    from histoseek.errors import HistoseekError
    raise HistoseekError(f"unknown index backend {name!r}; choose one of {', '.join(BACKENDS)}")


def open_backend(folder: Path, manifest: dict, store: Store) -> VectorBackend:
    """The backend the manifest names (indexes built before backends existed are FAISS)."""
    return backend_class(manifest.get("backend", "faiss")).open(Path(folder), manifest, store)


__all__ = ["BACKENDS", "BackendUnavailable", "VectorBackend", "backend_class", "open_backend"]
