"""Pretrained encoders through the whole product path, one model of each family, from
random weights in the published file layout: `histoseek export --encoder NAME --weights
FILE` (checkpoint folder, ONNX verified against PyTorch) -> one real Triton -> FAISS index
built through Triton -> search with an uploaded image.

Families: timm ViT (UNI's entry with depth reduced to 2, said here explicitly: the
published 24 blocks cost minutes on 2 cores and add nothing to the plumbing),
`transformers` (PLIP, full size), open_clip (QuiltNet-B-32, full size, exported with its
weights as ONNX external data, as the models over 2 GB are), CONCH (its entry with the
trunk reduced to 2 blocks, explicitly), and the frozen ImageNet Lite0 (no file at all).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from histoseek.dataset import read_dataset
from histoseek_cli.main import main
from server import triton
from server.embedder import Embedder
from server.index.build import build_index
from server.index.folder import IndexFolder
from server.search import SearchCore
from tests.servers import distinct_free_ports
from tests.training.foundation_files import write_published
from training import foundation_models
from training.encoders.foundation import register_model
from training.foundation_table import foundation_model

pytestmark = pytest.mark.slow


def _variant(name: str, new_name: str, **kwargs) -> str:
    """A table entry with fewer blocks, registered under its own name (once per process)."""
    from training.encoders.registry import list_pretrained

    if new_name not in {e.name for e in list_pretrained()}:
        model = foundation_model(name)
        register_model(dataclasses.replace(model, name=new_name, kwargs={**model.kwargs, **kwargs}))
    return new_name


def _random_published_file(name: str, folder: Path) -> Path:
    model = foundation_model(name)
    torch.manual_seed(0)
    network = foundation_models.build_network(model)
    state = network.state_dict()
    for key, value in state.items():
        # Layer scales start at 1e-5: random blocks would add nothing and every tile embed
        # alike (a collapsed model, which export refuses). Published weights have real scales.
        if key.endswith(("ls1.gamma", "ls2.gamma", "lambda1")):
            value.fill_(1.0)
    return write_published(model, state, folder)


@pytest.fixture(scope="module")
def served_foundation(tmp_path_factory, synth_data):
    root = tmp_path_factory.mktemp("foundation")
    repo = root / "model_repository"
    names = [_variant("uni", "uni-depth2", depth=2), "plip", "quiltnet-b-32",
             _variant("conch", "conch-depth2", layers=2), "imagenet-lite0"]
    for name in names:
        weights = [] if name == "imagenet-lite0" else \
            ["--weights", str(_random_published_file(name, root / "hub" / name))]
        with pytest.MonkeyPatch.context() as patch:
            if name == "quiltnet-b-32":  # small enough to serve, forced through the >2 GB code path
                patch.setattr("export.onnx_export.EXTERNAL_DATA_BYTES", 0)
            # Random weights may embed every tile nearly alike (export's collapse check): forced,
            # except for the frozen Lite0, whose real weights must pass it.
            force = [] if name == "imagenet-lite0" else ["--force"]
            main(["export", "--encoder", name, *weights, "--checkpoint", str(root / "checkpoints" / name),
                  "--repo", str(repo), "--verify-data", str(synth_data), *force])
    http_port, grpc_port, metrics_port = distinct_free_ports(3)
    run_dir = root / "triton_run"
    info = triton.start(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, run_dir=run_dir)
    yield info, repo, names
    triton.stop(run_dir)


@pytest.mark.parametrize("name", ["uni-depth2", "plip", "quiltnet-b-32", "conch-depth2", "imagenet-lite0"])
def test_pretrained_encoder_exports_serves_indexes_and_searches(name, served_foundation, synth_data, tmp_path):
    info, repo, _ = served_foundation
    version = repo / name / "1"
    import json

    spec = json.loads((version / "encoder.json").read_text())
    model = foundation_model(name)
    assert spec["preset"] == "pretrained" and spec["embedding_dim"] == model.embedding_dim
    assert tuple(spec["mean"]) == model.mean and spec["input_size"] == model.input_size
    assert spec["verify_max_abs_diff"] <= 1e-4
    if name == "quiltnet-b-32":
        assert (version / "model.onnx.data").stat().st_size > 300e6 > (version / "model.onnx").stat().st_size
        assert len(spec["model_data_sha256"]) == 64
    else:
        assert not (version / "model.onnx.data").exists()

    url = f"localhost:{info.grpc_port}"
    index_dir = build_index(name, synth_data, tmp_path / "index", index_type="flat", triton_url=url,
                            protocol="grpc", batch=8)
    origin = IndexFolder(index_dir).manifest["weights_origin"]
    assert origin["source"] == ("imagenet" if name == "imagenet-lite0" else "file")
    core = SearchCore(IndexFolder(index_dir), Embedder(url, name, "grpc"))
    dataset = read_dataset(synth_data)
    query = dataset.items[5]
    hits = core.search(Path(dataset.absolute(query)).read_bytes(), k=5, name=query.path).hits
    # The served model embeds the upload as it embedded the same file in the build: cosine 1
    # (with random weights other tiles may tie with it, so it need not come first).
    own = [h for h in hits if h.item.path == str(Path(dataset.absolute(query)).resolve())]
    assert own and own[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    if name == "imagenet-lite0":
        assert hits[0] is own[0]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
