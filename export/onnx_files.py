"""ONNX files on disk, small or over protobuf's 2 GB limit (no torch here: the server side reads them too).

A model over 2 GB is saved as ONNX external data: `model.onnx` holds the graph and names
`model.onnx.data` beside it, which holds every tensor; onnxruntime and Triton read the pair.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from histoseek import atomic

# Protobuf refuses messages over 2 GiB; what is left below it is room for the graph itself.
EXTERNAL_DATA_BYTES = 2**31 - 2**27


def data_file(path: Path) -> Path:
    """Where the external weights of the ONNX file `path` live, if it has any."""
    return Path(path).with_name(Path(path).name + ".data")


def onnx_bytes(path: Path) -> int:
    """Size of an exported model on disk: the graph and its external data."""
    data = data_file(path)
    return Path(path).stat().st_size + (data.stat().st_size if data.is_file() else 0)


def uses_external_data(graph: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)


def save_onnx(graph: onnx.ModelProto, path: Path, external_data: bool) -> None:
    """Write `graph` to `path` atomically and check it; with `external_data`, every tensor goes
    into `path.data` (written first, so `path` never names a half-written file)."""
    path = Path(path)
    data = data_file(path)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    with atomic.temporary_path(path) as tmp:
        if external_data:
            onnx.save_model(graph, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=0)
            onnx.checker.check_model(str(tmp))  # by path: the checker reads the data file, not a >2 GB message
        else:
            onnx.checker.check_model(graph)
            onnx.save(graph, str(tmp))
