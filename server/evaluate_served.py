"""Served-path evaluation: retrieval metrics of the running system (Triton + the index).

Queries go through the same `SearchCore` as the API (decode, preprocess, Triton, index
search), not over HTTP, and are scored with histoseek.metrics like the PyTorch-side
evaluation (training/evaluate.py), so the two can be compared key by key: a gap shows
what export, serving or approximate search cost.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from histoseek.dataset import read_dataset
from histoseek.errors import HistoseekError
from histoseek.label_map import relabel
from histoseek.metrics import retrieval_metrics
from server.index.filters import ItemFilter
from server.embedder import Embedder
from server.index.folder import IndexFolder
from server.search import SearchCore


def evaluate_index(index_dir: Path, queries: Path, ks: list[int], triton_url: str, protocol: str = "grpc",
                   batch: int = 32, label_map: dict[str, str] | None = None) -> dict:
    """P@k, mAP@k and mMV@k of `queries` (a dataset folder) against the index, own groups
    excluded; `label_map` says the queries' labels in the index's words (histoseek/label_map.py)."""
    if not ks or min(ks) < 1:
        raise HistoseekError(f"every k must be at least 1, got {ks}")
    folder = IndexFolder(Path(index_dir))
    try:
        return _evaluate(folder, queries, ks, triton_url, protocol, batch, label_map)
    finally:
        folder.close()


def _evaluate(folder: IndexFolder, queries: Path, ks: list[int], triton_url: str, protocol: str, batch: int,
              label_map: dict[str, str] | None) -> dict:
    core = SearchCore(folder, Embedder(triton_url, folder.manifest["encoder"], protocol, batch_size=batch))
    core.verify_model(force=True)
    dataset = read_dataset(queries)
    if label_map is not None:
        dataset = relabel(dataset, label_map, folder.store.labels())
    k = max(ks)
    ranked: list[list[str]] = []
    with tqdm(total=len(dataset), unit="img", desc=f"querying {folder.name}") as progress:
        for start in range(0, len(dataset), batch):
            items = dataset.items[start:start + batch]
            # Local query files are trusted input, but they go through the API's decoding
            # all the same: the served path is what is being measured.
            images = np.stack([core.preprocess(core.decode(_read(dataset.absolute(i)), name=i.path))
                               for i in items])
            hits = core.search_batch(images, k, [ItemFilter(exclude_groups=(i.group,)) for i in items])
            ranked.extend([hit.item.label for hit in row] for row in hits)
            progress.update(len(items))
    return {
        "encoder": folder.manifest["encoder"], "model_sha256": folder.manifest["model_sha256"],
        "index": str(folder.path), "index_type": folder.manifest["index_type"], "queries": str(queries),
        "metrics": retrieval_metrics([i.label for i in dataset.items], ranked, ks),
    }


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise HistoseekError(f"cannot read query image {path}: {exc.strerror}") from exc
