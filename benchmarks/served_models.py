"""The encoders a latency benchmark measures: checkpoints, their ONNX export, one Triton.

Latency does not depend on weight values, so an encoder without a trained checkpoint is
measured with its preset's architecture at random initialisation (said in the report);
`--checkpoints DIR` (one checkpoint folder per encoder, as `histoseek train` writes)
measures trained ones instead. Everything lives under the benchmark's work folder and is
reused by a second run.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from export.export_checkpoint import export_checkpoint
from export.repository import latest_version_dir
from histoseek.errors import HistoseekError
from server import triton
from training import checkpoint
from training.data.synthetic import synthesize
from training.encoders.registry import EncoderSpec, get_encoder, list_encoders

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    name: str
    checkpoint: Path
    onnx: Path
    spec: EncoderSpec
    weights: str  # "trained: <path>" or "random init (latency only)"


def encoder_names(requested: list[str] | None) -> list[str]:
    names = requested or [e.name for e in list_encoders()]
    for name in names:
        get_encoder(name)  # an unknown name fails here, with the registered ones listed
    return names


def _fresh_checkpoint(name: str, preset: str, out: Path, verify_data: Path) -> None:
    encoder = get_encoder(name)
    backbone = encoder.build_backbone(encoder.preset(preset))
    # The spec of a labelled method names the classes; none are needed to time it.
    checkpoint.save_backbone(out, backbone, encoder.spec(preset),
                             {"data": str(verify_data), "weights": "random init (latency benchmark)"})


def prepare_models(names: list[str], preset: str, workdir: Path, checkpoints: Path | None) -> list[ServedModel]:
    """A checkpoint and an exported, verified model-repository version for each encoder."""
    verify_data = workdir / "verify_tiles"
    if not verify_data.is_dir():
        synthesize(verify_data, classes=2, per_class=16, size=64, seed=0)
    repo = workdir / "model_repository"
    models = []
    for name in names:
        trained = checkpoints / name if checkpoints else None
        if trained is not None and not trained.is_dir():
            raise HistoseekError(f"no checkpoint folder {trained}; train one with "
                                 f"`histoseek train --encoder {name} --out {trained}` or leave out --checkpoints")
        ckpt = trained or workdir / "checkpoints" / f"{name}-{preset}"
        if trained is None and not (ckpt / checkpoint.SPEC).is_file():
            _fresh_checkpoint(name, preset, ckpt, verify_data)
        # A new export whenever the checkpoint is newer than the served version.
        version = latest_version_dir(repo / name)
        if version is None or (ckpt / checkpoint.WEIGHTS).stat().st_mtime > (version / "model.onnx").stat().st_mtime:
            log.info("exporting %s to %s", name, repo)
            # Random weights may embed every tile alike; latency does not depend on it.
            version = export_checkpoint(ckpt, repo, verify_data=verify_data, force=trained is None)
        spec = EncoderSpec.load(ckpt / checkpoint.SPEC)
        models.append(ServedModel(name, ckpt, version / "model.onnx", spec,
                                  f"trained: {ckpt}" if trained else "random init (latency only)"))
    return models


@contextmanager
def running_triton(repo: Path, run_dir: Path) -> Iterator[triton.TritonInfo]:
    """A Triton on free loopback ports serving `repo`, stopped afterwards whatever happens."""
    ports = dict(http_port=triton.free_port(), grpc_port=triton.free_port(), metrics_port=triton.free_port())
    info = triton.start(repo, run_dir=run_dir, timeout=300, **ports)
    try:
        yield info
    finally:
        triton.stop(run_dir)
