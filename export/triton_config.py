"""Text of the Triton model configs (config.pbtxt) for an exported encoder.

Two configs serve the same version folders:
- `python_backend_config`: for the Triton inside the `nvidia-pytriton` wheel, which has
  only the python backend, so `<version>/model.py` runs `model.onnx` with onnxruntime.
- `tensorrt_fp16_config`: for NVIDIA's Triton container, whose native onnxruntime
  backend runs `model.onnx` through TensorRT in FP16. Triton picks it with
  `--model-config-name=tensorrt_fp16` (it reads `<model>/configs/<name>.pbtxt`).

The encoder spec travels in `parameters`, so a client learns the input size and
embedding size from the server alone.
"""
from __future__ import annotations

import json
from typing import Any

MAX_BATCH_SIZE = 64
# No waiting for a batch to fill: requests that arrive while the model instance is busy are
# batched anyway, and on 2 CPU cores a 2 ms delay cost a lone client 2-3 ms per request and
# bought no throughput at 4 or 16 clients (`histoseek bench encoders`, 2026-11-23).
MAX_QUEUE_DELAY_US = 0
TENSORRT_CONFIG_NAME = "tensorrt_fp16"


def _quote(text: str) -> str:
    # json.dumps(ensure_ascii) output has no control or non-ASCII characters, so escaping
    # backslash and quote is all the protobuf text format needs.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parameters(params: dict[str, str]) -> str:
    return "\n".join(
        f"parameters {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}"
        for k, v in params.items()
    )


def _common(spec: dict[str, Any], max_batch_size: int, queue_delay_us: int, params: dict[str, str]) -> str:
    size, dim = int(spec["input_size"]), int(spec["embedding_dim"])
    all_params = {
        "encoder_spec": json.dumps(spec, sort_keys=True, ensure_ascii=True),
        "input_size": str(size),
        "embedding_dim": str(dim),
        **params,
    }
    return f"""name: {_quote(spec["name"])}
max_batch_size: {max_batch_size}
input [
  {{ name: "images" data_type: TYPE_UINT8 dims: [ {size}, {size}, 3 ] }}
]
output [
  {{ name: "embeddings" data_type: TYPE_FP32 dims: [ {dim} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}
version_policy: {{ latest: {{ num_versions: 1 }} }}
{_parameters(all_params)}
"""


def _served_params(
    fp16: bool, model_version: int | None, model_sha256: str | None
) -> dict[str, str]:
    # Only the latest version is served, so the model-level config can name its weights:
    # a client checks which model produced its embeddings without reading the repository.
    params = {"fp16": "true" if fp16 else "false"}
    if model_version is not None:
        params["model_version"] = str(model_version)
    if model_sha256 is not None:
        params["model_sha256"] = model_sha256
    return params


def python_backend_config(
    spec: dict[str, Any],
    *,
    fp16: bool = False,
    model_version: int | None = None,
    model_sha256: str | None = None,
    max_batch_size: int = MAX_BATCH_SIZE,
    queue_delay_us: int = MAX_QUEUE_DELAY_US,
) -> str:
    """Config for pip's Triton: python backend on a CPU instance; model.py picks the EP."""
    return (
        'backend: "python"\n'
        + _common(spec, max_batch_size, queue_delay_us, _served_params(fp16, model_version, model_sha256))
        + "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
    )


def tensorrt_fp16_config(
    spec: dict[str, Any],
    *,
    model_version: int | None = None,
    model_sha256: str | None = None,
    max_batch_size: int = MAX_BATCH_SIZE,
    queue_delay_us: int = MAX_QUEUE_DELAY_US,
) -> str:
    """Config for NVIDIA's Triton container: onnxruntime backend with TensorRT FP16 on GPU."""
    return (
        'platform: "onnxruntime_onnx"\nbackend: "onnxruntime"\n'
        + _common(spec, max_batch_size, queue_delay_us, _served_params(True, model_version, model_sha256))
        + "instance_group [ { kind: KIND_GPU count: 1 } ]\n"
        + """optimization { execution_accelerators { gpu_execution_accelerator: [ {
  name: "tensorrt"
  parameters { key: "precision_mode" value: "FP16" }
  parameters { key: "max_workspace_size_bytes" value: "1073741824" }
} ] } }
"""
    )
