"""Shared fixtures: a tiny ONNX encoder that obeys the export contract, and a real Triton.

The tiny model is built with `onnx.helper` (no torch): uint8 images -> float, flattened,
a fixed random projection, L2-normalised. Triton is the pip `tritonserver` from
`.venv-triton`, started once per session on free ports and shared by the tests.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import settings
from onnx import TensorProto, helper, numpy_helper

# CI draws the same hypothesis examples on every run: a red CI blocks a landing, so it must
# not depend on the draw. Local runs keep drawing new examples (that is how a float image
# whose range is a denormal was found to break to_rgb).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

TINY_SIZE = 8
TINY_DIM = 16


def _spec(name: str, size: int, dim: int) -> dict:
    return {
        "name": name,
        "method": "test",
        "preset": "cpu",
        "embedding_dim": dim,
        "input_size": size,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "output_kind": "embedding",
    }


def build_tiny_onnx(path: Path, size: int = TINY_SIZE, dim: int = TINY_DIM, seed: int = 0) -> Path:
    """Write an ONNX model with input `images` uint8 [N,S,S,3], output `embeddings` [N,D]."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((size * size * 3, dim)).astype(np.float32)
    bias = rng.standard_normal(dim).astype(np.float32)  # keeps a black image off the zero vector
    nodes = [
        helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["pixels", "scale"], ["scaled"]),
        helper.make_node("Reshape", ["scaled", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weights"], ["projected"]),
        helper.make_node("Add", ["projected", "bias"], ["raw"]),
        helper.make_node("LpNormalization", ["raw"], ["embeddings"], axis=1, p=2),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_encoder",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", dim])],
        initializer=[
            numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
            numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"),
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    # IR 9 / opset 17 load in every onnxruntime the two environments may hold.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="session")
def make_tiny_onnx(tmp_path_factory):
    """Factory: make_tiny_onnx(size=, dim=, seed=) -> path of a new contract-conforming model."""
    folder = tmp_path_factory.mktemp("onnx")

    def make(size: int = TINY_SIZE, dim: int = TINY_DIM, seed: int = 0) -> Path:
        return build_tiny_onnx(folder / f"tiny_{size}_{dim}_{seed}.onnx", size, dim, seed)

    return make


@pytest.fixture(scope="session")
def tiny_onnx(make_tiny_onnx) -> Path:
    return make_tiny_onnx()


@pytest.fixture(scope="session")
def served_specs() -> dict[str, dict]:
    """Encoder specs of the models in `triton_repo`: `tiny` is `tiny_onnx`; `tiny_spare`
    has other sizes, and tests may unload or re-version it without disturbing `tiny`."""
    return {"tiny": _spec("tiny", TINY_SIZE, TINY_DIM), "tiny_spare": _spec("tiny_spare", 12, 8)}


@pytest.fixture(scope="session")
def triton_repo(tmp_path_factory, tiny_onnx, make_tiny_onnx, served_specs) -> Path:
    """A model repository holding version 1 of each model in `served_specs`."""
    from export.repository import write_model_version

    repo = tmp_path_factory.mktemp("model_repository")
    write_model_version(repo, served_specs["tiny"], tiny_onnx)
    spare = served_specs["tiny_spare"]
    write_model_version(repo, spare, make_tiny_onnx(spare["input_size"], spare["embedding_dim"], 1))
    return repo


@pytest.fixture
def free_ports() -> dict[str, int]:
    """Three distinct free ports, as keyword arguments of `server.triton.start`."""
    from tests.servers import distinct_free_ports

    return dict(zip(("http_port", "grpc_port", "metrics_port"), distinct_free_ports(3)))


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory, triton_repo):
    """A running Triton (TritonInfo) serving `triton_repo`; stopped at the end of the session."""
    from server import triton
    from tests.servers import distinct_free_ports

    http_port, grpc_port, metrics_port = distinct_free_ports(3)
    run_dir = tmp_path_factory.mktemp("triton_run")
    info = triton.start(
        triton_repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
        run_dir=run_dir,
    )
    yield info
    triton.stop(run_dir)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small synthetic H&E dataset (3 classes x 8 tiles of 64 px) shared across tests."""
    from training.data.synthetic import synthesize

    out = tmp_path_factory.mktemp("synth") / "tiles"
    synthesize(out, classes=3, per_class=8, size=64, seed=1)
    return out


@pytest.fixture(scope="session")
def text_triton(tmp_path_factory, synth_data, tiny_onnx, served_specs):
    """Triton serving an untrained scratch `clip` (image and text towers, tests/export/test_text_export.py)
    and the contract's `tiny` (no text tower), with an index of synth_data by each: (TritonInfo, the
    indexes folder, holding `clipped` and `plain`). Never edit those indexes: the session shares them."""
    from export.export_checkpoint import export_checkpoint
    from export.repository import write_model_version
    from server import triton
    from server.index.build import build_index
    from tests.export.test_text_export import tiny_clip_checkpoint
    from tests.servers import distinct_free_ports

    work = tmp_path_factory.mktemp("text_search")
    ckpt = tiny_clip_checkpoint(work / "ckpt", synth_data, labels=("lymphocytes", "stroma", "tumour"),
                                class_names={"tumour": "tumour cells"})
    repo = work / "repo"
    export_checkpoint(ckpt, repo, force=True)  # random weights may embed alike: irrelevant here
    write_model_version(repo, served_specs["tiny"], tiny_onnx)
    http_port, grpc_port, metrics_port = distinct_free_ports(3)
    info = triton.start(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                        run_dir=work / "run")
    try:
        indexes = work / "indexes"
        build_index("clip", synth_data, indexes / "clipped", triton_url=info.grpc_url, batch=8, repo=repo)
        build_index("tiny", synth_data, indexes / "plain", triton_url=info.grpc_url, batch=8, repo=repo)
        yield info, indexes
    finally:
        triton.stop(work / "run")
