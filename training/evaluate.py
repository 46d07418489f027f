"""`histoseek evaluate --checkpoint`: retrieval metrics of a PyTorch checkpoint.

Images are embedded through the same contract graph the export produces (uint8 tiles
from the client preprocessing, normalisation and L2 norm inside), then ranked by exact
inner product, excluding the query's own group, and scored with histoseek.metrics. The
spread of the database's pairwise similarities is reported beside the metrics: a
collapsed model (every tile alike) shows there before anyone searches with it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.contract import ContractModel
from histoseek import collapse
from histoseek.dataset import Dataset, read_split
from histoseek.imaging import load_model_input
from histoseek.label_map import relabel
from histoseek.metrics import embedding_retrieval_metrics
from training import checkpoint

log = logging.getLogger(__name__)


class _TileDataset(torch.utils.data.Dataset):
    def __init__(self, dataset: Dataset, size: int) -> None:
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        # PIL hands out read-only arrays; torch wants its own writable copy.
        return torch.from_numpy(load_model_input(self.dataset.absolute(self.dataset.items[index]), self.size).copy())


@torch.no_grad()
def embed_dataset(model: ContractModel, dataset: Dataset, size: int, batch_size: int = 64, workers: int = 2) -> np.ndarray:
    loader = DataLoader(_TileDataset(dataset, size), batch_size=batch_size, num_workers=workers)
    chunks = []
    started = time.monotonic()
    for batch in tqdm(loader, desc=f"embedding {dataset.root.name}", unit="batch", leave=False):
        chunks.append(model(batch).numpy())
    log.info("embedded %d images in %.1f s", len(dataset), time.monotonic() - started)
    return np.concatenate(chunks).astype(np.float32)


def evaluate_checkpoint(checkpoint_dir: Path, database: Path, queries: Path | None, ks: list[int],
                        database_split: str | None = None, queries_split: str | None = None,
                        label_map: dict[str, str] | None = None) -> dict:
    backbone, spec = checkpoint.load_backbone(checkpoint_dir)
    return evaluate_backbone(backbone, spec, database, queries, ks, database_split, queries_split, label_map) | {
        "checkpoint": str(checkpoint_dir)}


def evaluate_backbone(backbone: torch.nn.Module, spec, database: Path, queries: Path | None, ks: list[int],
                      database_split: str | None = None, queries_split: str | None = None,
                      label_map: dict[str, str] | None = None) -> dict:
    """Metrics and similarity spread of a backbone with its spec (a checkpoint's, or a frozen
    pretrained network's); `label_map` says the queries' labels in the database's words
    (queries from another collection, histoseek/label_map.py)."""
    model = ContractModel(backbone, spec).eval()
    db = read_split(database, database_split)
    db_emb = embed_dataset(model, db, spec.input_size)
    if queries is None and queries_split is None:  # leave-one-out: every item queries all the others
        q, q_emb = db, db_emb
    else:
        q = read_split(queries or database, queries_split)
        if label_map is not None:
            q = relabel(q, label_map, db.labels)
        q_emb = embed_dataset(model, q, spec.input_size)
    metrics = embedding_retrieval_metrics(q, q_emb, db, db_emb, ks)
    # A fixed, seeded sample keeps the spread's cost flat on large databases.
    sample = np.random.default_rng(0).permutation(len(db_emb))[:1000]
    return {"encoder": spec.name, "preset": spec.preset, "database": str(database),
            "queries": str(queries) if queries else "leave-one-out", "metrics": metrics,
            "similarity_spread": collapse.similarity_spread(db_emb[sample])}
