"""The encoder registry: one file per encoder registers itself here by name.

An encoder is a recipe with presets. `build_backbone` gives the exportable network
(normalised float NCHW in, `[N, D]` embedding out); `build_method` wraps it with
whatever only training needs (heads, teachers, queues, losses), so the backbone exports
as is, as in facebookresearch/dino. The `EncoderSpec` travels with the weights
(`encoder.json`), into the Triton config and the index manifest.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from histoseek.errors import HistoseekError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    """Sizes and optimisation settings of one training recipe."""

    backbone: str
    input_size: int
    embedding_dim: int
    batch_size: int
    epochs: int
    lr: float
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    options: dict[str, Any] = field(default_factory=dict)  # method-specific settings, JSON values (lists, not tuples)
    # Fine-tuning a pretrained trunk (training/finetune.py): where it starts (`--init`'s
    # default: "imagenet", a file, or None for random), its learning rate (None: `lr`, as
    # the heads), how many early stages stay frozen, whether its BatchNorm statistics stay
    # frozen, and the size of the training views (None: `input_size`).
    init: str | None = None
    trunk_lr: float | None = None
    frozen_stages: int = 0
    frozen_batchnorm: bool = False
    train_size: int | None = None


@dataclass(frozen=True)
class EncoderSpec:
    """What a consumer of the exported model needs to know; saved as encoder.json."""

    name: str
    method: str
    preset: str
    backbone: str
    embedding_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    output_kind: str = "embedding"  # "embedding": L2-normalised vector
    labels: tuple[str, ...] = ()  # class names seen in training, when the method used them
    options: dict[str, Any] = field(default_factory=dict)
    weights_origin: dict[str, Any] = field(default_factory=dict)  # where training started (training/pretrained.py)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("mean", "std", "labels"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def load(cls, path: Path) -> "EncoderSpec":
        return cls.from_dict(json.loads(Path(path).read_text()))


class TrainingMethod(nn.Module):
    """A backbone plus its training-only parts; `loss` is one optimisation step's objective."""

    backbone: nn.Module

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Called after each optimiser step with training progress in [0, 1] (e.g. EMA)."""

    def after_training(self, descriptors: Callable[[], np.ndarray]) -> None:
        """Called once after the last step; `descriptors()` embeds (a sample of) the training
        set the way the exported model will (SPQ fits its codebooks to them)."""

    def text_tower(self) -> nn.Module | None:
        """A trained text tower to save beside the backbone (encoders with `text_tower.trained`)."""
        return None


@dataclass(frozen=True)
class TextTower:
    """An encoder's text tower, exported as the Triton model `<encoder>_text` (export/text_export.py).

    `build(preset)`: a torch module, token ids int64 `[N, L]` -> `[N, D]` in the image space
    (L2-normalised by the export); `tokenizer(preset)`: its histoseek.text_tokenizer.TokenizerSpec
    (kind, context length, vocabulary file); `prompts(options, labels)`: the prompts it was
    trained on, per class, if any; `trained`: its weights come from training (the checkpoint's
    text_weights.safetensors), not from `build`.
    """

    build: Callable[[Preset], nn.Module]
    tokenizer: Callable[[Preset], Any]
    prompts: Callable[[dict[str, Any], tuple[str, ...]], dict[str, str]] | None = None
    trained: bool = False


@dataclass(frozen=True)
class Encoder:
    name: str
    method: str
    presets: dict[str, Preset]
    build_backbone: Callable[[Preset], nn.Module]
    build_method: Callable[[nn.Module, Preset, tuple[str, ...]], TrainingMethod]  # (backbone, preset, class names)
    train_transform: Callable[[Preset], Callable]  # PIL image -> list of view tensors
    load_init: Callable[[nn.Module, Path], None]  # user's weights into the backbone
    needs_labels: bool = False
    output_kind: str = "embedding"
    # The part of the backbone that pretrained weights fit (a timm model), e.g. without an
    # embedding layer or attention added on top: `--init imagenet` loads into it, and it
    # trains at the preset's `trunk_lr`.
    trunk: Callable[[nn.Module], nn.Module] = lambda backbone: backbone
    # A pretrained encoder that needs no training (training/encoders/foundation.py): its
    # entry in the table of published models; None for the encoders trained here.
    pretrained: Any = None
    text_tower: TextTower | None = None  # encoders with a text tower (clip, CONCH, PLIP, QuiltNet)

    def spec(self, preset_name: str, labels: tuple[str, ...] = (), options: dict[str, Any] | None = None,
             **overrides: Any) -> EncoderSpec:
        preset = self.preset(preset_name, options)
        return EncoderSpec(
            name=self.name, method=self.method, preset=preset_name, backbone=preset.backbone,
            embedding_dim=preset.embedding_dim, input_size=preset.input_size, mean=preset.mean,
            std=preset.std, output_kind=self.output_kind, labels=labels, options=dict(preset.options),
            **overrides,
        )

    def preset(self, name: str, options: dict[str, Any] | None = None) -> Preset:
        """A preset, with some of its options replaced (e.g. SPQ's `bits`); unknown options are refused."""
        if name not in self.presets:
            raise HistoseekError(f"encoder {self.name!r} has no preset {name!r}; choose from {sorted(self.presets)}")
        preset = self.presets[name]
        unknown = sorted(set(options or {}) - set(preset.options))
        if unknown:
            raise HistoseekError(f"encoder {self.name!r} has no option {', '.join(unknown)}")
        return dataclasses.replace(preset, options=preset.options | options) if options else preset


_REGISTRY: dict[str, Encoder] = {}


def register(encoder: Encoder) -> Encoder:
    if encoder.name in _REGISTRY:
        raise ValueError(f"encoder {encoder.name!r} registered twice")
    _REGISTRY[encoder.name] = encoder
    return encoder


def get_encoder(name: str) -> Encoder:
    _import_all()
    if name not in _REGISTRY:
        raise HistoseekError(f"unknown encoder {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_encoders() -> list[Encoder]:
    """The encoders that train here (each with its `cpu` and `paper` presets)."""
    _import_all()
    return [_REGISTRY[name] for name in sorted(_REGISTRY) if _REGISTRY[name].pretrained is None]


def list_pretrained() -> list[Encoder]:
    """The pretrained encoders that need no training (one preset, `pretrained`), in table order."""
    _import_all()
    return [encoder for encoder in _REGISTRY.values() if encoder.pretrained is not None]


def _import_all() -> None:
    # Importing the package's modules runs their `register(...)` calls; a new encoder is
    # one new file in this folder and nothing else.
    import importlib
    import pkgutil

    import training.encoders as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name != "registry":
            importlib.import_module(f"training.encoders.{module.name}")
