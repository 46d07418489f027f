"""Check an exported ONNX file against the PyTorch model on real images.

The same uint8 tiles (decoded and cropped by the client code path) go through PyTorch
and onnxruntime; the largest absolute difference of the embeddings must stay within
tolerance, or the export is refused.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from histoseek.errors import HistoseekError
from training.contract import ContractModel
from training.encoders.registry import EncoderSpec

log = logging.getLogger(__name__)
TOLERANCE_FP32 = 1e-4
# Half precision keeps about three significant digits of a unit-norm embedding.
TOLERANCE_FP16 = 2e-2


def verify_onnx(backbone: torch.nn.Module, spec: EncoderSpec, onnx_path: Path, images: np.ndarray,
                *, fp16: bool = False) -> tuple[float, np.ndarray]:
    """Return the max abs difference between PyTorch and onnxruntime and the ONNX model's
    embeddings of `images`; raise above tolerance."""
    with torch.no_grad():
        expected = ContractModel(backbone, spec).eval()(torch.from_numpy(images)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    actual = session.run(["embeddings"], {"images": images})[0]
    if actual.shape != expected.shape:
        raise HistoseekError(f"ONNX output shape {actual.shape} differs from PyTorch's {expected.shape}")
    diff = float(np.abs(actual - expected).max())
    tolerance = TOLERANCE_FP16 if fp16 else TOLERANCE_FP32
    log.info("ONNX vs PyTorch on %d real images: max abs diff %.2e (tolerance %.0e)", len(images), diff, tolerance)
    if not diff <= tolerance:
        raise HistoseekError(f"exported model disagrees with PyTorch: max abs diff {diff:.3e} > {tolerance:.0e}")
    return diff, actual
