"""Export a checkpoint's backbone to ONNX by the model contract.

Input `images`: UINT8 `[N, S, S, 3]` RGB. The graph casts, moves channels first and
normalises with the spec's mean/std, so clients only decode, resize and crop. Output
`embeddings`: FP32 `[N, D]`, L2-normalised, so inner product is cosine similarity.
The batch dimension is dynamic.
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch
from torch import nn

from histoseek import atomic
from training.contract import ContractModel
from training.encoders.registry import EncoderSpec

log = logging.getLogger(__name__)
OPSET = 18


def export_onnx(backbone: nn.Module, spec: EncoderSpec, path: Path, *, fp16: bool = False) -> Path:
    """Write the contract graph to `path` atomically; with fp16, weights and math in half
    precision while the uint8 input and float32 output stay as the contract says."""
    model = ContractModel(backbone, spec).eval()
    size = spec.input_size
    example = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    with atomic.temporary_path(path) as tmp:
        with torch.no_grad():
            torch.onnx.export(
                model, (example,), str(tmp), input_names=["images"], output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                opset_version=OPSET, dynamo=False,
            )
        graph = onnx.load(str(tmp))
        if fp16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            graph = convert_float_to_float16(graph, keep_io_types=True)
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))
    log.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path
