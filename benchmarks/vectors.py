"""Large synthetic collections shaped like real embeddings, for FAISS latency at sizes no dataset here has."""
from __future__ import annotations

import math

import numpy as np


def realistic(db: np.ndarray, n: int, books: int, rng) -> np.ndarray:
    """n vectors around real embeddings (noise at the data's own spread), normalised like the encoder
    (`books` > 1: each of that many sub-vectors to norm 1/sqrt(books), as SPQ's output)."""
    spread = float(np.std(db - db.mean(0)))
    x = db[rng.integers(0, len(db), n)] + rng.normal(0, spread * 0.5, (n, db.shape[1])).astype(np.float32)
    x = x.reshape(n, books, -1)
    x /= np.linalg.norm(x, axis=-1, keepdims=True) * math.sqrt(books)
    return x.reshape(n, -1).astype(np.float32)


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))
