"""The colour-histogram floor: how far mean stain colour alone gets on a retrieval split.

Each tile becomes an 8x8x8 RGB histogram; square roots of the normalised counts make the
inner product the Bhattacharyya coefficient (Hellinger kernel). An encoder that does not
beat this has learnt colour, not tissue.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from histoseek.dataset import Dataset
from histoseek.metrics import embedding_retrieval_metrics


def histogram_embedding(path, bins: int = 8) -> np.ndarray:
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3) // (256 // bins)
    codes = (pixels[:, 0] * bins + pixels[:, 1]) * bins + pixels[:, 2]
    counts = np.bincount(codes, minlength=bins**3).astype(np.float32)
    return np.sqrt(counts / counts.sum())


def colour_histogram_metrics(database: Dataset, queries: Dataset, ks: list[int]) -> dict[str, float]:
    db = np.stack([histogram_embedding(database.absolute(i)) for i in database.items])
    q = np.stack([histogram_embedding(queries.absolute(i)) for i in queries.items])
    return embedding_retrieval_metrics(queries, q, database, db, ks)
