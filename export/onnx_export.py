"""Export a checkpoint's backbone to ONNX by the model contract.

Input `images`: UINT8 `[N, S, S, 3]` RGB. The graph casts, moves channels first and
normalises with the spec's mean/std, so clients only decode, resize and crop. Output
`embeddings`: FP32 `[N, D]`, L2-normalised, so inner product is cosine similarity.
The batch dimension is dynamic.

A model over protobuf's 2 GB limit (the ViT-H and ViT-g foundation models) is written with
its weights as ONNX external data: `model.onnx` holds the graph and names
`model.onnx.data` beside it, which holds every tensor; onnxruntime reads the pair.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

from export.onnx_files import EXTERNAL_DATA_BYTES, onnx_bytes, save_onnx
from training.contract import ContractModel
from training.encoders.registry import EncoderSpec

log = logging.getLogger(__name__)
OPSET = 18


def export_onnx(backbone: nn.Module, spec: EncoderSpec, path: Path, *, fp16: bool = False,
                external_data: bool | None = None) -> Path:
    """Write the contract graph to `path` atomically; with fp16, weights and math in half
    precision while the uint8 input and float32 output stay as the contract says.
    `external_data`: weights in `path.data` (None: when they would pass 2 GB)."""
    model = ContractModel(backbone, spec).eval()
    if external_data is None:
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        external_data = weight_bytes // (2 if fp16 else 1) >= EXTERNAL_DATA_BYTES
    size = spec.input_size
    example = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # The exporter writes a model over 2 GB as many files beside its output: a private folder.
    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".onnx-export-") as raw_dir:
        raw = os.path.join(raw_dir, "model.onnx")
        # nn.MultiheadAttention's fused inference path (open_clip's ViTs use it) has no ONNX export.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad():
                torch.onnx.export(
                    model, (example,), raw, input_names=["images"], output_names=["embeddings"],
                    dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                    opset_version=OPSET, dynamo=False,
                )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        graph = onnx.load(raw)
        if fp16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            graph = convert_float_to_float16(graph, keep_io_types=True)
        save_onnx(graph, Path(path), external_data)
    log.info("exported %s (%.1f MB%s)", path, onnx_bytes(path) / 1e6, ", external data" if external_data else "")
    return path
