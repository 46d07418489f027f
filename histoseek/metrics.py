"""Retrieval metrics of the histopathology CBIR literature: P@k, mAP@k and mMV@k.

They work on ranked neighbour labels, so the PyTorch-side evaluation (exact search on
embeddings) and the served path (Triton + FAISS) are scored by the same code.

- precision@k: share of the top k whose label equals the query's.
- AP@k: sum over ranks i<=k of precision@i at the relevant ranks, divided by the number
  of relevant results within the top k (0 when there is none), as in the SPQ paper's
  mAP@k; mAP@k is its mean over queries.
- majority vote@k (mMV@k): share of queries whose top-k majority label is the query's own
  (ties go to the label that appears first in the ranking), as in Kalra et al. 2020.
"""
from __future__ import annotations

from collections import Counter

import numpy as np


def exact_neighbours(
    queries: np.ndarray,
    query_groups: list[str],
    database: np.ndarray,
    database_groups: list[str],
    k: int,
    chunk: int = 1024,
) -> np.ndarray:
    """Indices `[n, k]` of the k most similar database rows by inner product.

    Rows of the query's own group are excluded (that also removes the query itself in
    leave-one-out); -1 fills ranks when fewer than k candidates remain.
    """
    db_groups = np.asarray(database_groups, dtype=object)
    k_eff = min(k, len(database))
    out = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ database.T
        for row, group in enumerate(query_groups[start : start + chunk]):
            sims[row, db_groups == group] = -np.inf
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k_eff]
        valid = np.take_along_axis(sims, top, axis=1) > -np.inf
        out[start : start + chunk, :k_eff] = np.where(valid, top, -1)
    return out


def majority_label(labels: list[str]) -> tuple[str, float]:
    """The most common label (ties: first in ranking order) and its share."""
    if not labels:
        return "", 0.0
    counts = Counter(labels)
    best = max(counts.values())
    winner = next(label for label in labels if counts[label] == best)
    return winner, best / len(labels)


def retrieval_metrics(query_labels: list[str], ranked_labels: list[list[str]], ks: list[int]) -> dict[str, float]:
    """P@k, mAP@k and mMV@k for each k; `ranked_labels[i]` is query i's ranking (best first)."""
    if len(query_labels) != len(ranked_labels):
        raise ValueError("one ranking per query is required")
    results: dict[str, float] = {"queries": float(len(query_labels))}
    for k in ks:
        precisions, aps, votes = [], [], []
        for label, ranking in zip(query_labels, ranked_labels):
            top = ranking[:k]
            relevant = np.array([r == label for r in top], dtype=np.float64)
            precisions.append(relevant.sum() / k)
            hits = relevant.sum()
            if hits:
                precision_at_i = np.cumsum(relevant) / np.arange(1, len(top) + 1)
                aps.append(float((precision_at_i * relevant).sum() / hits))
            else:
                aps.append(0.0)
            votes.append(float(majority_label(top)[0] == label))
        results[f"P@{k}"] = float(np.mean(precisions))
        results[f"mAP@{k}"] = float(np.mean(aps))
        results[f"mMV@{k}"] = float(np.mean(votes))
    return results


def format_table(metrics: dict[str, float], ks: list[int]) -> str:
    """A Markdown table, one row per k."""
    lines = ["| k | P@k | mAP@k | mMV@k |", "|---|---|---|---|"]
    for k in ks:
        lines.append(f"| {k} | {metrics[f'P@{k}']:.4f} | {metrics[f'mAP@{k}']:.4f} | {metrics[f'mMV@{k}']:.4f} |")
    return "\n".join(lines)


def embedding_retrieval_metrics(queries, query_embeddings: np.ndarray, database, database_embeddings: np.ndarray,
                                ks: list[int]) -> dict[str, float]:
    """Metrics of two datasets' embeddings (items with `.label` and `.group`), ranked by
    exact inner product with each query's own group excluded."""
    neighbours = exact_neighbours(query_embeddings, [i.group for i in queries.items], database_embeddings,
                                  [i.group for i in database.items], max(ks))
    db_labels = [i.label for i in database.items]
    ranked = [[db_labels[j] for j in row if j >= 0] for row in neighbours]
    return retrieval_metrics([i.label for i in queries.items], ranked, ks)
