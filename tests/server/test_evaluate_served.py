"""Served-path evaluation (Triton + FAISS through the search core) against exact numpy search."""
from __future__ import annotations

import numpy as np
import pytest

from histoseek.dataset import read_dataset
from histoseek.errors import HistoseekError
from histoseek.imaging import load_model_input
from histoseek.metrics import exact_neighbours, retrieval_metrics
from server.embedder import Embedder
from server.evaluate_served import evaluate_index
from server.index.build import build_index

KS = [1, 3, 5]


def exact_metrics(database, queries, url: str) -> dict[str, float]:
    """The PyTorch-side protocol with Triton embeddings: exact inner product, own group excluded."""
    embedder = Embedder(url, "tiny")
    db, q = read_dataset(database), read_dataset(queries)
    db_emb = embedder.embed(np.stack([load_model_input(db.absolute(i), 8) for i in db.items]))
    q_emb = embedder.embed(np.stack([load_model_input(q.absolute(i), 8) for i in q.items]))
    neighbours = exact_neighbours(q_emb, [i.group for i in q.items], db_emb, [i.group for i in db.items], max(KS))
    ranked = [[db.items[j].label for j in row if j >= 0] for row in neighbours]
    return retrieval_metrics([i.label for i in q.items], ranked, KS)


@pytest.mark.slow
@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_served_metrics_agree_with_exact_search(tmp_path, synth_data, triton_server, index_type):
    url = triton_server.grpc_url
    index_dir = build_index("tiny", synth_data, tmp_path / "tissue", index_type=index_type, triton_url=url, batch=8)

    # Leave-one-out over groups of 5 tiles: every query skips its own source image.
    result = evaluate_index(index_dir, synth_data, KS, url)

    assert (result["encoder"], result["index"], result["queries"]) == ("tiny", str(index_dir), str(synth_data))
    expected = exact_metrics(synth_data, synth_data, url)
    assert set(result["metrics"]) == set(expected)
    for key, value in expected.items():
        assert result["metrics"][key] == pytest.approx(value, abs=0.01), key


@pytest.mark.slow
def test_group_exclusion_is_applied(tmp_path, synth_data, triton_server):
    """With its own group excluded a tile never finds itself, so P@1 is not the trivial 1.0."""
    url = triton_server.grpc_url
    index_dir = build_index("tiny", synth_data, tmp_path / "tissue", triton_url=url, batch=8)
    metrics = evaluate_index(index_dir, synth_data, [1], url)["metrics"]
    assert metrics["queries"] == 24.0 and metrics["P@1"] < 1.0


def test_k_must_be_positive(tmp_path):
    with pytest.raises(HistoseekError, match="at least 1"):
        evaluate_index(tmp_path, tmp_path, [0], "localhost:1")
