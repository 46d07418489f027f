"""Checkpoint folders: what `train` writes and `export`/`evaluate` read.

A checkpoint folder holds
- `weights.safetensors`: the exportable backbone only (no heads, no teacher);
- `encoder.json`: the EncoderSpec, so the weights carry their own input size and stats;
- `train_config.json`: how it was trained (arguments, preset, data, final figures);
- `resume/state.pt`: full training state for resuming (model with heads, optimiser,
  RNG, position), written every epoch and on interruption.
Every file is written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from histoseek import atomic
from histoseek.errors import HistoseekError
from training.encoders.registry import EncoderSpec, get_encoder

WEIGHTS = "weights.safetensors"
SPEC = "encoder.json"
CONFIG = "train_config.json"
RESUME = Path("resume") / "state.pt"


def save_backbone(out: Path, backbone: nn.Module, spec: EncoderSpec, config: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory; contiguous copies are independent.
    state = {k: v.detach().contiguous().clone() for k, v in backbone.state_dict().items()}
    with atomic.temporary_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"encoder": spec.name, "preset": spec.preset})
    atomic.write_json(out / SPEC, spec.to_dict())
    atomic.write_json(out / CONFIG, config)


def load_backbone(checkpoint: Path) -> tuple[nn.Module, EncoderSpec]:
    """Rebuild the backbone from its spec and load its weights."""
    checkpoint = Path(checkpoint)
    for name in (WEIGHTS, SPEC):
        if not (checkpoint / name).is_file():
            raise HistoseekError(
                f"{checkpoint} is not a checkpoint folder: {name} is missing "
                "(train one with `histoseek train --encoder NAME --data DIR --out DIR`)"
            )
    spec = EncoderSpec.load(checkpoint / SPEC)
    encoder = get_encoder(spec.name)
    backbone = encoder.build_backbone(encoder.preset(spec.preset, spec.options))
    try:
        backbone.load_state_dict(load_file(str(checkpoint / WEIGHTS)))
    except RuntimeError as exc:
        raise HistoseekError(f"weights in {checkpoint} do not match encoder {spec.name}/{spec.preset}: {exc}") from exc
    return backbone.eval(), spec


def save_resume_state(out: Path, state: dict[str, Any]) -> None:
    with atomic.temporary_path(out / RESUME) as tmp:
        torch.save(state, tmp)


def load_resume_state(out: Path) -> dict[str, Any] | None:
    path = out / RESUME
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def read_config(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}
