"""Checkpoint folders: what `train` writes and `export`/`evaluate` read.

A checkpoint folder holds
- `weights.safetensors`: the exportable backbone only (no heads, no teacher);
- `text_weights.safetensors`: the trained text tower, for encoders that train one (clip);
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
TEXT_WEIGHTS = "text_weights.safetensors"
SPEC = "encoder.json"
CONFIG = "train_config.json"
RESUME = Path("resume") / "state.pt"


def _save_weights(path: Path, module: nn.Module, spec: EncoderSpec) -> None:
    # safetensors refuses tensors that share memory; contiguous copies are independent.
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    with atomic.temporary_path(path) as tmp:
        save_file(state, str(tmp), metadata={"encoder": spec.name, "preset": spec.preset})


def save_backbone(out: Path, backbone: nn.Module, spec: EncoderSpec, config: dict[str, Any],
                  text_tower: nn.Module | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(out / WEIGHTS, backbone, spec)
    if text_tower is not None:
        _save_weights(out / TEXT_WEIGHTS, text_tower, spec)
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


def load_text_tower(checkpoint: Path, spec: EncoderSpec) -> nn.Module | None:
    """The encoder's text tower (ids -> embedding), with its trained weights where it has them;
    None for an encoder without one, or a checkpoint trained before text towers were saved."""
    encoder = get_encoder(spec.name)
    if encoder.text_tower is None:
        return None
    path = Path(checkpoint) / TEXT_WEIGHTS
    if encoder.text_tower.trained and not path.is_file():
        return None
    tower = encoder.text_tower.build(encoder.preset(spec.preset, spec.options))
    if encoder.text_tower.trained:
        try:
            tower.load_state_dict(load_file(str(path)))
        except RuntimeError as exc:
            raise HistoseekError(f"text weights in {checkpoint} do not match encoder {spec.name}/{spec.preset}: "
                                 f"{exc}") from exc
    return tower.eval()


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
