"""The row every quality table needs: a frozen ImageNet backbone, no training.

Globally pooled features of the trunk the `cpu` presets start from, through the same
contract graph (uint8 in, TensorFlow normalisation, L2 norm) as any exported encoder.
"""
from __future__ import annotations

from torch import nn

from training import pretrained
from training.backbones import cnn
from training.encoders.registry import EncoderSpec


def frozen_backbone(architecture: str, input_size: int) -> tuple[nn.Module, EncoderSpec]:
    trunk = cnn(architecture)
    pretrained.load_imagenet(trunk)
    spec = EncoderSpec(name=f"frozen {architecture}", method="frozen ImageNet backbone", preset="-",
                       backbone=architecture, embedding_dim=trunk.num_features, input_size=input_size,
                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return trunk.eval(), spec
