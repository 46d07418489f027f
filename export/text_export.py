"""Export an encoder's text tower as the Triton model `<encoder>_text`, beside the image model.

The text contract:
- input `tokens`: INT64 `[N, L]`, L the tower's context length, as the tokenizer named in
  the config gives them (histoseek/text_tokenizer.py: torch-free, so the API tokenizes);
- output `embeddings`: FP32 `[N, D]`, L2-normalised, in the same space as the image
  model's embeddings, so a text query searches an image index by inner product.

Layout, next to `<repo>/<encoder>/`:

    <repo>/<encoder>_text/config.pbtxt              python backend; parameter `text_spec`
    <repo>/<encoder>_text/<version>/model.onnx      (the same model.py as the image models)
    <repo>/<encoder>_text/<version>/model.py
    <repo>/<encoder>_text/<version>/text.json       text_spec + model_sha256 + model_version
    <repo>/<encoder>_text/<version>/<vocabulary>    the tokenizer's file, e.g. bpe_simple_vocab_16e6.txt.gz

`text_spec` (JSON) names the encoder, the embedding size, the tokenizer spec, the prompts
the tower was trained on (per class) and the sha256 of the image model exported with it:
a text query is only comparable with an index built by that image model.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from export.onnx_export import OPSET
from export.repository import TRITON_MODEL_SOURCE, model_checksum, versions
from export.triton_config import MAX_BATCH_SIZE, _parameters, _quote
from histoseek import atomic
from histoseek.errors import HistoseekError
from histoseek.text_tokenizer import TokenizerSpec, find_vocab, load_tokenizer
from training.contract import TextContractModel

log = logging.getLogger(__name__)
TOLERANCE = 1e-4
TEXT_SUFFIX = "_text"
# Besides the trained prompts, texts the tower never saw: the check covers any input.
_CHECK_TEXTS = ["a histopathology image of tissue", "glands", "H&E stained colorectal mucosa with crypts",
                "tumour cells invading the stroma, high grade", "", "x " * 40]


def text_model_name(encoder: str) -> str:
    return f"{encoder}{TEXT_SUFFIX}"


def export_text_onnx(tower: nn.Module, context_length: int, path: Path) -> Path:
    model = TextContractModel(tower).eval()
    example = torch.zeros((2, context_length), dtype=torch.int64)
    example[:, 0], example[:, 1] = 49406, 49407
    with atomic.temporary_path(path) as tmp:
        with torch.no_grad():
            torch.onnx.export(model, (example,), str(tmp), input_names=["tokens"], output_names=["embeddings"],
                              dynamic_axes={"tokens": {0: "batch"}, "embeddings": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
        onnx.checker.check_model(onnx.load(str(tmp)))
    return path


def verify_text_onnx(tower: nn.Module, onnx_path: Path, tokens: np.ndarray) -> float:
    """Max abs difference between PyTorch and onnxruntime on `tokens`; raises above tolerance."""
    with torch.no_grad():
        expected = TextContractModel(tower).eval()(torch.from_numpy(tokens)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    actual = session.run(["embeddings"], {"tokens": tokens})[0]
    if actual.shape != expected.shape:
        raise HistoseekError(f"text ONNX output shape {actual.shape} differs from PyTorch's {expected.shape}")
    diff = float(np.abs(actual - expected).max())
    log.info("text ONNX vs PyTorch on %d texts: max abs diff %.2e (tolerance %.0e)", len(tokens), diff, TOLERANCE)
    if not diff <= TOLERANCE:
        raise HistoseekError(f"exported text tower disagrees with PyTorch: max abs diff {diff:.3e} > {TOLERANCE:.0e}")
    return diff


def text_config(text_spec: dict[str, Any], *, model_version: int, model_sha256: str,
                max_batch_size: int = MAX_BATCH_SIZE) -> str:
    """config.pbtxt of a text tower for pip's Triton (python backend, CPU instance)."""
    length = int(text_spec["tokenizer"]["context_length"])
    params = {"text_spec": json.dumps(text_spec, sort_keys=True, ensure_ascii=True),
              "model_version": str(model_version), "model_sha256": model_sha256}
    return f"""backend: "python"
name: {_quote(text_model_name(text_spec["encoder"]))}
max_batch_size: {max_batch_size}
input [
  {{ name: "tokens" data_type: TYPE_INT64 dims: [ {length} ] }}
]
output [
  {{ name: "embeddings" data_type: TYPE_FP32 dims: [ {int(text_spec["embedding_dim"])} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
version_policy: {{ latest: {{ num_versions: 1 }} }}
{_parameters(params)}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""


def export_text_tower(tower: nn.Module, tokenizer: TokenizerSpec, repo: Path, *, encoder: str, embedding_dim: int,
                      image_model_sha256: str | None, prompts: dict[str, str] | None = None,
                      check_texts: Sequence[str] = ()) -> tuple[Path, float]:
    """Export, verify and write the next version of `repo/<encoder>_text/`; returns (version folder, max diff)."""
    tok = load_tokenizer(tokenizer)
    texts = [*(prompts or {}).values(), *check_texts, *_CHECK_TEXTS]
    tokens = tok(texts)
    text_spec = {"encoder": encoder, "embedding_dim": int(embedding_dim), "tokenizer": tokenizer.to_dict(),
                 "prompts": dict(prompts or {}), "image_model_sha256": image_model_sha256}
    model_dir = Path(repo) / text_model_name(encoder)
    version = max(versions(model_dir), default=0) + 1
    with atomic.staged_directory(model_dir / str(version)) as staging:
        onnx_path = export_text_onnx(tower, tokenizer.context_length, staging / "model.onnx")
        diff = verify_text_onnx(tower, onnx_path, tokens)
        shutil.copyfile(TRITON_MODEL_SOURCE, staging / "model.py")
        shutil.copyfile(find_vocab(tokenizer), staging / tokenizer.vocab)
        sha256 = model_checksum(staging)
        atomic.write_json(staging / "text.json", {**text_spec, "verify_max_abs_diff": diff, "model_sha256": sha256,
                                                  "model_version": version})
    atomic.write_text(model_dir / "config.pbtxt", text_config(text_spec, model_version=version, model_sha256=sha256))
    return model_dir / str(version), diff
