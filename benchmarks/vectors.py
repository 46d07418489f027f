"""Large synthetic collections shaped like real embeddings, for FAISS latency at sizes no dataset here has."""
from __future__ import annotations

import math

import numpy as np


def realistic(db: np.ndarray, n: int, books: int, rng, return_rows: bool = False):
    """n vectors around real embeddings (noise at the data's own spread), normalised like the encoder
    (`books` > 1: each of that many sub-vectors to norm 1/sqrt(books), as SPQ's output); with
    `return_rows`, also the row of `db` each one was sampled around."""
    spread = float(np.std(db - db.mean(0)))
    rows = rng.integers(0, len(db), n)
    x = db[rows] + rng.normal(0, spread * 0.5, (n, db.shape[1])).astype(np.float32)
    x = x.reshape(n, books, -1)
    x /= np.linalg.norm(x, axis=-1, keepdims=True) * math.sqrt(books)
    x = x.reshape(n, -1).astype(np.float32)
    return (x, rows) if return_rows else x


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))
