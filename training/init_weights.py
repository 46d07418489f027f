"""Loading a user's pretrained weights (`--init PATH`) into a backbone.

Accepts the common container formats — DINO's official checkpoints (a bare backbone
state dict, or a training checkpoint with `teacher`/`student`), timm and torchvision
state dicts, lightly/solo-learn/Lightning checkpoints (`state_dict`, `model`) and
safetensors files — strips wrapper prefixes and refuses, listing the keys, when the
weights do not fit the backbone.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from histoseek.errors import HistoseekError

log = logging.getLogger(__name__)

# Checked in this order: DINO's teacher is the network its authors evaluate.
_CONTAINER_KEYS = ("teacher", "state_dict", "model", "student", "backbone")
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "encoder.", "visual.trunk.", "trunk.")
# Classifier/projection heads that pretrained files carry and a retrieval backbone lacks.
_HEAD_PREFIXES = ("head.", "fc.", "classifier.", "projection_head.", "prototypes.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise HistoseekError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise HistoseekError(f"cannot read weights from {path}: {exc}") from exc
    for key in _CONTAINER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise HistoseekError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return {_strip_prefixes(k): v for k, v in obj.items()}


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def load_into(backbone: nn.Module, path: Path, adapt: dict | None = None,
              rename: Callable[[str], str] | None = None, optional: Callable[[str], bool] | None = None) -> None:
    """Load weights into `backbone`; head keys are ignored, any other mismatch is an error.

    `adapt` maps a key to a function (tensor, target tensor) -> tensor, for weights whose
    shape legitimately depends on the input size (e.g. a ViT's position embedding).
    `rename` maps the file's key names onto the backbone's (other libraries' layouts);
    `optional(key)` marks backbone parameters that pretrained files cannot have (modules
    this project adds, e.g. attention blocks) and that keep their fresh initialisation.
    """
    load_state_into(backbone, read_state_dict(path), path, adapt, rename, optional)


def load_state_into(backbone: nn.Module, state: dict[str, torch.Tensor], path: Path, adapt: dict | None = None,
                    rename: Callable[[str], str] | None = None, optional: Callable[[str], bool] | None = None) -> None:
    """`load_into` for a state dict already read from `path` (named in errors)."""
    if rename:
        state = {rename(k): v for k, v in state.items()}
    target = backbone.state_dict()
    usable, mismatched = {}, []
    for key, value in state.items():
        if key not in target:
            continue
        if value.shape != target[key].shape and adapt and key in adapt:
            value = adapt[key](value, target[key])
        if value.shape != target[key].shape:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(target[key].shape)}")
            continue
        usable[key] = value
    # A BatchNorm step counter is bookkeeping, not a weight: files converted from other
    # frameworks (the ImageNet EfficientNet wheels) leave it out.
    missing = [k for k in target if k not in usable and not k.startswith(_HEAD_PREFIXES)
               and not k.endswith("num_batches_tracked") and not (optional and optional(k))]
    unexpected = [k for k in state if k not in target and not k.startswith(_HEAD_PREFIXES)]
    if mismatched or missing:
        lines = mismatched + [f"{k}: missing from the file" for k in missing[:20]]
        more = f"\n  … and {len(missing) - 20} more missing" if len(missing) > 20 else ""
        raise HistoseekError(
            f"weights in {path} do not fit this backbone (is the preset's backbone the one they were "
            "trained with?):\n  " + "\n  ".join(lines) + more
        )
    backbone.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s (%d unused keys ignored)", len(usable), path, len(unexpected))
