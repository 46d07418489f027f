"""The served contract in PyTorch: what export writes to ONNX and what evaluation embeds with.

uint8 RGB `[N, S, S, 3]` in, the encoder's mean/std inside, L2-normalised FP32 `[N, D]` out,
so training's probes, PyTorch evaluation and the exported graph all see the same function.
"""
from __future__ import annotations

import torch
from torch import nn

from training.encoders.registry import EncoderSpec


class ContractModel(nn.Module):
    """uint8 NHWC images -> L2-normalised embeddings; the exported graph."""

    def __init__(self, backbone: nn.Module, spec: EncoderSpec) -> None:
        super().__init__()
        self.backbone = backbone
        # Folding the 1/255 scaling into mean and std saves one op per pixel.
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        # An encoder may define its own unit-norm output (SPQ: per sub-vector), else plain L2.
        custom = getattr(self.backbone, "normalise_output", None)
        return custom(self.backbone(x)) if custom else nn.functional.normalize(self.backbone(x), dim=1)


class TextContractModel(nn.Module):
    """int64 token ids `[N, L]` -> L2-normalised embeddings in the image space; the exported text graph."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.tower(tokens), dim=1)
