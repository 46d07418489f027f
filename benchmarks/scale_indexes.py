"""Index backends at scale, through the one interface the API uses (IndexFolder.search).

A collection of `items` vectors sampled around real embeddings (the fine-tuned encoder's
vectors of real tiles; each sampled vector keeps its source tile's label), queried with
the encoder's vectors of other real tiles, one query at a time on one thread, k = 10,
as the server does. Each item gets a `source` of 100 equally likely sites, independent
of its vector, so a filter on 1, 10 or 50 sites admits 1 %, 10 % or 50 % of the items.
Recall@10 is against an exact search over the same (filtered) vectors.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.timing import summarise
from benchmarks.vectors import realistic, recall_at_10
from server.index.build import write_index_folder
from server.index.filters import ItemFilter
from server.index.folder import IndexFolder
from server.index.store import Item

log = logging.getLogger(__name__)
SITES, SLIDE_TILES, K = 100, 200, 10
SELECTIVITIES = (1, 10, 50)  # per cent of the items a filter admits


def collection(db: np.ndarray, labels: list[str], items: int, seed: int = 0) -> tuple[np.ndarray, list[Item]]:
    rng = np.random.default_rng(seed)
    vectors, rows = realistic(db, items, 1, rng, return_rows=True)
    sites = rng.integers(SITES, size=items)
    return vectors, [Item(i, f"synthetic/{i}", labels[r], f"slide-{i // SLIDE_TILES:05d}", source=f"site-{s:02d}")
                     for i, (r, s) in enumerate(zip(rows, sites))]


def site_filter(percent: int) -> ItemFilter:
    return ItemFilter(sources=tuple(f"site-{s:02d}" for s in range(percent)))


def exact_top(vectors: np.ndarray, queries: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    ids = np.arange(len(vectors)) if allowed is None else allowed
    scores = queries @ vectors[ids].T
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :K]]


def _timed_searches(folder: IndexFolder, queries: np.ndarray, where: ItemFilter | None) -> tuple[dict, np.ndarray]:
    for q in queries[:5]:  # warm-up: first touches of the index pages
        folder.search(q[None], K, where)
    seconds, found = [], []
    for q in queries:
        started = time.perf_counter()
        hits = folder.search(q[None], K, where)[0]
        seconds.append(time.perf_counter() - started)
        found.append([h.id for h in hits] + [-1] * (K - len(hits)))
    return summarise(seconds), np.asarray(found)


def measure(backend: str, index_type: str, vectors: np.ndarray, items: list[Item], queries: np.ndarray,
            workdir: Path, milvus_uri: str | None = None) -> dict:
    """Build one index folder of `vectors` in `backend`, then time plain and filtered searches."""
    out = workdir / f"{backend}_{index_type}"
    shutil.rmtree(out, ignore_errors=True)
    manifest = {"format": 1, "encoder": "bench", "model_sha256": None, "dimension": vectors.shape[1],
                "metric": "inner_product", "backend": backend, "index_type": index_type, "index_params": {}}
    options = {"uri": milvus_uri, "collection": f"bench_{index_type}"} if backend == "milvus" else {}
    started = time.perf_counter()
    write_index_folder(out, manifest, vectors, items, [b""] * len(items), options=options)
    folder = IndexFolder(out)
    build_s = time.perf_counter() - started
    try:
        plain, found = _timed_searches(folder, queries, None)
        row = {"backend": backend, "type": index_type, "items": len(items), "build_s": round(build_s, 1),
               "p50_ms": plain["p50_ms"], "p99_ms": plain["p99_ms"],
               "recall@10": round(recall_at_10(found, exact_top(vectors, queries)), 3), "filtered": []}
        sources = np.array([item.source for item in items])
        for percent in SELECTIVITIES:
            where = site_filter(percent)
            allowed = np.flatnonzero(np.isin(sources, where.sources))
            timing, found = _timed_searches(folder, queries, where)
            leaked = int(np.sum(~np.isin(found[found >= 0], allowed)))
            row["filtered"].append({"percent": percent, "p50_ms": timing["p50_ms"], "p99_ms": timing["p99_ms"],
                                    "recall@10": round(recall_at_10(found, exact_top(vectors, queries, allowed)), 3),
                                    "short_results": int(np.sum(found < 0)), "outside_filter": leaked})
        info = folder.info()
        row.update({key: info.get(key) for key in ("code_bytes_per_item", "index_bytes_per_item", "index_params")})
        log.info("%s %s: p50 %.2f ms, recall@10 %.3f", backend, index_type, row["p50_ms"], row["recall@10"])
        return row
    finally:
        folder.close()
