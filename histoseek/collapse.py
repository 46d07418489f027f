"""Telling a collapsed encoder from a healthy one by the spread of its similarities.

A collapsed self-supervised model maps every tile to (nearly) the same direction: every
search then returns arbitrary items, all at similarity 1.00. The check looks at the
pairwise cosine similarities of a fixed set of real tiles: when even the least similar
5 % of pairs are above `COLLAPSE_P05` the model is collapsed. Measured on crc5-dev: the
frozen ImageNet EfficientNet-Lite0 has p5 0.33 (median 0.51), the fine-tuned cpu presets
-0.38 to 0.66; the collapsed 3-minute DINO of the former quickstart showed 1.00 on every
result, and a scratch ViT after two steps has p5 0.96.
"""
from __future__ import annotations

import numpy as np

COLLAPSE_P05 = 0.95


def similarity_spread(embeddings: np.ndarray) -> dict[str, float | bool]:
    """Summary of the pairwise cosine similarities of `embeddings` `[N, D]` (N >= 2)."""
    vectors = np.asarray(embeddings, dtype=np.float64)
    if vectors.ndim != 2 or len(vectors) < 2:
        raise ValueError(f"need at least two embeddings, got shape {vectors.shape}")
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    cosine = vectors @ vectors.T
    pairs = cosine[np.triu_indices(len(vectors), k=1)]
    p05, p50, p95 = np.percentile(pairs, [5, 50, 95])
    return {"pairs": int(pairs.size), "mean": round(float(pairs.mean()), 4), "p05": round(float(p05), 4),
            "median": round(float(p50), 4), "p95": round(float(p95), 4),
            "collapsed": bool(p05 >= COLLAPSE_P05)}


def describe(spread: dict) -> str:
    """One line for progress bars, logs and the evaluation's table."""
    text = (f"pairwise similarity p5 {spread['p05']:.2f} / median {spread['median']:.2f} / "
            f"p95 {spread['p95']:.2f} over {spread['pairs']} pairs")
    return text + (" — COLLAPSED: every tile embeds alike" if spread["collapsed"] else "")
