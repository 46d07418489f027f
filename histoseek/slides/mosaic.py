"""A slide's mosaic: a few tiles that stand for the whole slide (Yottixel's recipe).

Kalra et al., "Yottixel – An Image Search Engine for Large Archives of Histopathology
Whole Slide Images" (Med. Image Anal. 2020): k-means on the tiles' colour into a few
clusters (tissue types look different), then, inside each cluster, k-means on the tiles'
positions keeping a fixed share of them (5 %): one tile per spatial cluster, the one
nearest its centre. So every tissue type and every region of the slide is represented,
and a slide of 10,000 tiles is searched with ~500. A minimum keeps small slides (and tiny
biopsies) from ending with one or two tiles.
"""
from __future__ import annotations

import math

import numpy as np

COLOUR_CLUSTERS = 9  # Yottixel's k for colour
SHARE = 0.05
MINIMUM = 16


def select_mosaic(colours: np.ndarray, positions: np.ndarray, *, colour_clusters: int = COLOUR_CLUSTERS,
                  share: float = SHARE, minimum: int = MINIMUM, seed: int = 0) -> np.ndarray:
    """Sorted indices of the mosaic tiles among N tiles with mean `colours` [N, 3] (any
    colour space) and level-0 `positions` [N, 2]. Same input, same mosaic."""
    n = len(colours)
    if n == 0:
        return np.zeros(0, np.int64)
    if n <= minimum:
        return np.arange(n)
    # The share is raised where needed so that the clusters' picks add up to the minimum.
    share = max(share, minimum / n)
    colour_of = _kmeans_labels(np.asarray(colours, np.float32), min(colour_clusters, n), seed)
    chosen: list[int] = []
    for cluster in np.unique(colour_of):
        members = np.flatnonzero(colour_of == cluster)
        keep = min(len(members), max(1, math.ceil(share * len(members))))
        where = np.asarray(positions, np.float32)[members]
        spatial = _kmeans_labels(where, keep, seed + 1 + int(cluster))
        for part in np.unique(spatial):
            inside = members[spatial == part]
            centre = np.asarray(positions, np.float32)[inside].mean(axis=0)
            distances = np.linalg.norm(np.asarray(positions, np.float32)[inside] - centre, axis=1)
            chosen.append(int(inside[np.argmin(distances)]))
    return np.array(sorted(set(chosen)), dtype=np.int64)


def _kmeans_labels(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster of each point (faiss k-means; k >= the number of points gives each its own)."""
    n = len(points)
    if k >= n:
        return np.arange(n)
    if k == 1:
        return np.zeros(n, np.int64)
    import faiss

    # Standardised so that no axis (or the slide's size) dominates the distance.
    scale = points.std(axis=0)
    data = np.ascontiguousarray((points - points.mean(axis=0)) / np.where(scale > 0, scale, 1), dtype=np.float32)
    kmeans = faiss.Kmeans(data.shape[1], k, niter=20, seed=seed, min_points_per_centroid=1,
                          max_points_per_centroid=100_000, verbose=False)
    kmeans.train(data)
    _, labels = kmeans.index.search(data, 1)
    return labels[:, 0].astype(np.int64)
