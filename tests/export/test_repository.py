"""Model repository layout, versioning, checksums and config text (no Triton needed)."""
from __future__ import annotations

import hashlib
import json

import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2

from export.repository import (
    TRITON_MODEL_SOURCE,
    latest_version_dir,
    model_checksum,
    versions,
    write_model_version,
)
from export.triton_config import TENSORRT_CONFIG_NAME
from histoseek.errors import HistoseekError

SPEC = {"name": "enc", "embedding_dim": 16, "input_size": 8, "mean": [0.5] * 3,
        "std": [0.25] * 3, "output_kind": "embedding", "preset": "cpu"}


def parse_config(path) -> model_config_pb2.ModelConfig:
    """Parse with Triton's own ModelConfig schema: an unknown or misspelt field fails."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_layout_and_versions(tmp_path, make_tiny_onnx):
    first = write_model_version(tmp_path, SPEC, make_tiny_onnx(seed=0))
    second = write_model_version(tmp_path, SPEC, make_tiny_onnx(seed=1), fp16=True)

    model_dir = tmp_path / "enc"
    assert (first, second) == (model_dir / "1", model_dir / "2")
    assert versions(model_dir) == [1, 2] and latest_version_dir(model_dir) == second
    for version_dir in (first, second):
        assert {p.name for p in version_dir.iterdir()} == {"model.onnx", "model.py", "encoder.json"}
    assert (second / "model.py").read_text() == TRITON_MODEL_SOURCE.read_text()
    # Atomic writes leave no staging folders behind.
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "config.pbtxt", "configs"]

    encoder = json.loads((second / "encoder.json").read_text())
    assert encoder["model_version"] == 2
    assert encoder["model_sha256"] == model_checksum(second) != model_checksum(first)
    assert {k: encoder[k] for k in SPEC} == SPEC


def test_checksum_is_sha256_of_model_onnx(tmp_path, tiny_onnx):
    version_dir = write_model_version(tmp_path, SPEC, tiny_onnx)
    expected = hashlib.sha256((version_dir / "model.onnx").read_bytes()).hexdigest()
    assert model_checksum(version_dir) == expected


def test_python_backend_config(tmp_path, tiny_onnx):
    version_dir = write_model_version(tmp_path, SPEC, tiny_onnx)
    config = parse_config(tmp_path / "enc" / "config.pbtxt")

    assert (config.name, config.backend, config.max_batch_size) == ("enc", "python", 64)
    (images,), (embeddings,) = config.input, config.output
    assert (images.name, images.data_type, list(images.dims)) == (
        "images", model_config_pb2.TYPE_UINT8, [8, 8, 3])
    assert (embeddings.name, embeddings.data_type, list(embeddings.dims)) == (
        "embeddings", model_config_pb2.TYPE_FP32, [16])
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 0
    assert config.version_policy.latest.num_versions == 1
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]

    params = {k: v.string_value for k, v in config.parameters.items()}
    assert json.loads(params["encoder_spec"]) == SPEC
    assert (params["input_size"], params["embedding_dim"], params["fp16"]) == ("8", "16", "false")
    assert params["model_version"] == "1"
    assert params["model_sha256"] == model_checksum(version_dir)


def test_tensorrt_fp16_config(tmp_path, tiny_onnx):
    write_model_version(tmp_path, SPEC, tiny_onnx)
    config = parse_config(tmp_path / "enc" / "configs" / f"{TENSORRT_CONFIG_NAME}.pbtxt")

    assert (config.platform, config.backend) == ("onnxruntime_onnx", "onnxruntime")
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP16"
    assert config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [8, 8, 3]


def test_batching_queue_delay_is_set_in_both_configs(tmp_path, tiny_onnx):
    write_model_version(tmp_path, SPEC, tiny_onnx, queue_delay_us=1500)
    for path in (tmp_path / "enc" / "config.pbtxt", tmp_path / "enc" / "configs" / f"{TENSORRT_CONFIG_NAME}.pbtxt"):
        assert parse_config(path).dynamic_batching.max_queue_delay_microseconds == 1500
    with pytest.raises(HistoseekError, match="queue delay must be 0 or more"):
        write_model_version(tmp_path, SPEC, tiny_onnx, queue_delay_us=-1)


def test_spec_with_quotes_and_unicode_survives_config_text(tmp_path, tiny_onnx):
    spec = {**SPEC, "labels": ['say "hi"', "back\\slash", "Ödem"], "note": "a\nb"}
    write_model_version(tmp_path, spec, tiny_onnx)
    config = parse_config(tmp_path / "enc" / "config.pbtxt")
    assert json.loads(config.parameters["encoder_spec"].string_value) == spec


def test_extra_files_land_in_version(tmp_path, tiny_onnx):
    codebooks = tmp_path / "codebooks.npy"
    codebooks.write_bytes(b"\x93NUMPY")
    version_dir = write_model_version(tmp_path / "repo", SPEC, tiny_onnx,
                                      extra_files={"codebooks.npy": codebooks})
    assert (version_dir / "codebooks.npy").read_bytes() == b"\x93NUMPY"
    with pytest.raises(HistoseekError, match="not allowed"):
        write_model_version(
            tmp_path / "repo", SPEC, tiny_onnx, extra_files={"model.onnx": codebooks}
        )


def _identity_model(path, in_type, in_shape, out_name="embeddings"):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], [out_name])], "bad",
        [helper.make_tensor_value_info("images", in_type, in_shape)],
        [helper.make_tensor_value_info(out_name, in_type, in_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("in_type, in_shape, out_name, complaint", [
    (TensorProto.FLOAT, ["N", 8, 8, 3], "embeddings", "'images' is FLOAT"),
    (TensorProto.UINT8, [1, 8, 8, 3], "embeddings", "dynamic batch"),
    (TensorProto.UINT8, ["N", 8, 8, 3], "features", "no tensor named 'embeddings'"),
    (TensorProto.UINT8, ["N", 9, 9, 3], "embeddings", r"expected \['N', 8, 8, 3\]"),
])
def test_rejects_onnx_that_breaks_the_contract(tmp_path, in_type, in_shape, out_name, complaint):
    bad = _identity_model(tmp_path / "bad.onnx", in_type, in_shape, out_name)
    with pytest.raises(HistoseekError, match=complaint):
        write_model_version(tmp_path / "repo", SPEC, bad)
    assert not (tmp_path / "repo").exists()


def test_rejects_bad_spec_and_missing_file(tmp_path, tiny_onnx):
    with pytest.raises(HistoseekError, match="lacks"):
        write_model_version(tmp_path, {"name": "enc"}, tiny_onnx)
    with pytest.raises(HistoseekError, match="Triton model name"):
        write_model_version(tmp_path, {**SPEC, "name": "../up"}, tiny_onnx)
    with pytest.raises(HistoseekError, match="no ONNX file"):
        write_model_version(tmp_path, SPEC, tmp_path / "missing.onnx")
