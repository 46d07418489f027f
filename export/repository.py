"""Write an exported encoder into a Triton model repository.

Layout, one folder per encoder:

    <repo>/<name>/config.pbtxt                    pip Triton (python backend)
    <repo>/<name>/configs/tensorrt_fp16.pbtxt     NVIDIA container (--model-config-name)
    <repo>/<name>/<version>/model.onnx            the contract: images UINT8 [N,S,S,3]
    <repo>/<name>/<version>/model.onnx.data       its weights, for models over 2 GB (ONNX external data)
    <repo>/<name>/<version>/model.py              -> embeddings FP32 [N,D], L2-normalised
    <repo>/<name>/<version>/encoder.json          spec + model_sha256 + model_version
    <repo>/<name>/<version>/<extra files>         e.g. SPQ codebooks

Every export is a new version (never an overwrite), so an index built with version 3
can still name the exact weights it used; the config serves only the latest version.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import onnx

from export.onnx_files import data_file, save_onnx, uses_external_data
from export.triton_config import (
    MAX_QUEUE_DELAY_US,
    TENSORRT_CONFIG_NAME,
    python_backend_config,
    tensorrt_fp16_config,
)
from histoseek.atomic import staged_directory, write_json, write_text
from histoseek.checksum import file_sha256
from histoseek.errors import HistoseekError

TRITON_MODEL_SOURCE = Path(__file__).with_name("triton_model.py")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED_FILES = {"model.onnx", "model.onnx.data", "model.py", "encoder.json"}


def model_checksum(version_dir: Path) -> str:
    """sha256 of the version's model.onnx: what an index records to name its encoder."""
    return file_sha256(Path(version_dir) / "model.onnx")


def versions(model_dir: Path) -> list[int]:
    """Version numbers present in a model folder, ascending (staging folders are hidden)."""
    if not Path(model_dir).is_dir():
        return []
    return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.name.isdigit() and p.is_dir())


def latest_version_dir(model_dir: Path) -> Path | None:
    """The folder Triton serves (its version policy is `latest`), or None before any export."""
    found = versions(model_dir)
    return Path(model_dir) / str(found[-1]) if found else None


def _dims(value_info: onnx.ValueInfoProto) -> list[int | None] | None:
    """Static sizes (None where symbolic); None when the file records no shape at all."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def _check_contract(model: onnx.ModelProto, spec: dict[str, Any], source: Path) -> None:
    """Fail at export, not at Triton load time, when the ONNX file breaks the contract."""
    size, dim = int(spec["input_size"]), int(spec["embedding_dim"])
    initializers = {t.name for t in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in initializers}
    outputs = {o.name: o for o in model.graph.output}
    expected = {
        "images": (inputs, onnx.TensorProto.UINT8, [None, size, size, 3]),
        "embeddings": (outputs, onnx.TensorProto.FLOAT, [None, dim]),
    }
    problems = []
    for name, (found, elem_type, shape) in expected.items():
        if name not in found:
            problems.append(f"no tensor named {name!r} (has {sorted(found)})")
            continue
        got_type = found[name].type.tensor_type.elem_type
        got_shape = _dims(found[name])
        if got_type != elem_type:
            problems.append(f"{name!r} is {onnx.TensorProto.DataType.Name(got_type)}, "
                            f"expected {onnx.TensorProto.DataType.Name(elem_type)}")
        if got_shape is not None and (
            len(got_shape) != len(shape) or got_shape[0] is not None
            or any(g is not None and g != e for g, e in zip(got_shape[1:], shape[1:]))
        ):
            shown = ["N" if d is None else d for d in got_shape]
            problems.append(f"{name!r} has shape {shown}, expected {['N', *shape[1:]]} "
                            "with a dynamic batch dimension N")
    if problems:
        raise HistoseekError(
            f"{source} does not follow the export contract: " + "; ".join(problems)
            + ". Re-export it with `histoseek export`."
        )


def write_model_version(
    repo: Path,
    spec: dict[str, Any],
    onnx_path: Path,
    *,
    fp16: bool = False,
    extra_files: dict[str, Path] | None = None,
    queue_delay_us: int = MAX_QUEUE_DELAY_US,
) -> Path:
    """Add `onnx_path` as the next version of model `spec['name']`; return its folder.
    `queue_delay_us`: how long Triton's dynamic batcher may hold a request for others."""
    missing = [k for k in ("name", "input_size", "embedding_dim") if k not in spec]
    if missing:
        raise HistoseekError(
            f"encoder spec lacks {missing}; it comes from the checkpoint's encoder.json"
        )
    name = str(spec["name"])
    if not _MODEL_NAME.match(name):
        raise HistoseekError(
            f"encoder name {name!r} cannot be a Triton model name; use letters, digits, _ . -"
        )
    extra_files = dict(extra_files or {})
    for file_name in extra_files:
        if "/" in file_name or file_name in _RESERVED_FILES or file_name.startswith("."):
            raise HistoseekError(
                f"extra file name {file_name!r} is not allowed in a version folder"
            )
    if queue_delay_us < 0:
        raise HistoseekError(f"the batching queue delay must be 0 or more microseconds, got {queue_delay_us}")
    if not Path(onnx_path).is_file():
        raise HistoseekError(f"no ONNX file at {onnx_path}; export the checkpoint first")

    # The contract is checked on the graph alone; then onnx.load pulls in external weight
    # files, so the version folder never depends on files the exporter left elsewhere. A
    # model over 2 GB keeps its weights as external data (model.onnx.data) in the folder.
    model = onnx.load(str(onnx_path), load_external_data=False)
    _check_contract(model, spec, Path(onnx_path))
    external = uses_external_data(model)
    if external:
        onnx.load_external_data_for_model(model, str(Path(onnx_path).parent))

    model_dir = Path(repo) / name
    version = max(versions(model_dir), default=0) + 1
    version_dir = model_dir / str(version)
    with staged_directory(version_dir) as staging:
        save_onnx(model, staging / "model.onnx", external)
        shutil.copyfile(TRITON_MODEL_SOURCE, staging / "model.py")
        for file_name, source in extra_files.items():
            shutil.copyfile(source, staging / file_name)
        sha256 = model_checksum(staging)
        # model_sha256 names the graph file; with external data the weights' own checksum goes beside it.
        data = {"model_data_sha256": file_sha256(data_file(staging / "model.onnx"))} if external else {}
        write_json(
            staging / "encoder.json", {**spec, "model_sha256": sha256, "model_version": version, **data}
        )

    # Configs after the version: they name the latest version's checksum.
    served = {"model_version": version, "model_sha256": sha256, "queue_delay_us": queue_delay_us}
    write_text(model_dir / "config.pbtxt", python_backend_config(spec, fp16=fp16, **served))
    write_text(
        model_dir / "configs" / f"{TENSORRT_CONFIG_NAME}.pbtxt",
        tensorrt_fp16_config(spec, **served),
    )
    return version_dir
