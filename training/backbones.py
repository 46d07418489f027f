"""ResNet trunks shared by the CNN encoders (SimCLR, NNCLR, Barlow Twins, SwAV, DML).

timm's ResNets use torchvision's parameter names, so torchvision and timm state dicts load
as they are; lightly's examples wrap `resnet.children()[:-1]` in an `nn.Sequential`,
whose numbered keys are mapped back to names here.
"""
from __future__ import annotations

import re
from pathlib import Path

import timm
from torch import nn

from training import init_weights

# nn.Sequential(*list(resnet.children())[:-1]): conv1, bn1, relu, maxpool, layer1..layer4.
_SEQUENTIAL_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def resnet(name: str, attention: str | None = None) -> nn.Module:
    """A timm ResNet returning globally average-pooled features, `[N, C]`.

    `attention="cbam"` adds channel and spatial attention (Woo et al., ECCV 2018) to every
    residual block.
    """
    extra = {"block_args": {"attn_layer": attention}} if attention else {}
    return timm.create_model(name, pretrained=False, num_classes=0, **extra)


def _from_sequential(key: str) -> str:
    match = re.fullmatch(r"(\d+)\.(.*)", key)
    if match and match.group(1) in _SEQUENTIAL_NAMES:
        return f"{_SEQUENTIAL_NAMES[match.group(1)]}.{match.group(2)}"
    return key


def _is_attention(key: str) -> bool:
    # timm stores a block's attention module as `layerN.M.se`.
    return ".se." in key


def load_resnet_init(model: nn.Module, path: Path) -> None:
    """torchvision, timm, lightly, solo-learn or Lightning ResNet weights into `model`."""
    init_weights.load_into(model, path, rename=_from_sequential, optional=_is_attention)
