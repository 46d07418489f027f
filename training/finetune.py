"""What makes a short fine-tuning of a pretrained trunk help rather than hurt.

Three measures, each a preset setting (registry.Preset):
- the trunk learns at a lower rate than the fresh heads (`trunk_lr`), so a few hundred
  steps of a new loss do not wash the ImageNet features out before the heads are useful;
- its early stages (edges, colour blobs: generic) stay frozen (`frozen_stages`), which
  also spares their backward pass, the costliest on a CPU at full resolution;
- its BatchNorm running statistics stay as they were (`frozen_batchnorm`): batches of
  32 tiles of a few tissue types would replace ImageNet's statistics with noisy ones.
"""
from __future__ import annotations

import logging

from torch import nn

from training.encoders.registry import Preset

log = logging.getLogger(__name__)


def stages(trunk: nn.Module) -> list[nn.Module]:
    """A timm CNN's modules in input order, one entry per stage (the stem first)."""
    if hasattr(trunk, "conv_stem") and hasattr(trunk, "blocks"):  # EfficientNet / MobileNet family
        return [nn.ModuleList([trunk.conv_stem, trunk.bn1]), *trunk.blocks]
    if hasattr(trunk, "layer1"):  # ResNet family
        return [nn.ModuleList([trunk.conv1, trunk.bn1]), trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4]
    raise ValueError(f"cannot find the stages of a {type(trunk).__name__}; frozen_stages works on timm CNNs")


def freeze_early_stages(trunk: nn.Module, count: int) -> int:
    """Stop gradients to the first `count` stages; returns the number of frozen parameters."""
    if count <= 0:
        return 0
    frozen = 0
    for stage in stages(trunk)[:count]:
        for parameter in stage.parameters():
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    log.info("froze the first %d stages of the trunk (%.2f M parameters)", count, frozen / 1e6)
    return frozen


def parameter_groups(method: nn.Module, trunk: nn.Module, preset: Preset) -> list[dict]:
    """Optimiser groups: the trunk at `trunk_lr`, everything else (heads, codebooks) at `lr`.

    Each group keeps its base rate in `base_lr`, which the schedule scales.
    """
    trunk_ids = {id(p) for p in trunk.parameters()}
    trainable = [p for p in method.parameters() if p.requires_grad]
    trunk_params = [p for p in trainable if id(p) in trunk_ids]
    other = [p for p in trainable if id(p) not in trunk_ids]
    trunk_lr = preset.trunk_lr if preset.trunk_lr is not None else preset.lr
    groups = [{"params": trunk_params, "base_lr": trunk_lr, "lr": trunk_lr},
              {"params": other, "base_lr": preset.lr, "lr": preset.lr}]
    return [g for g in groups if g["params"]]


def train_mode(method: nn.Module, preset: Preset) -> None:
    """`method.train()`, with the convolutional BatchNorm layers in eval mode when frozen.

    Only 2-d BatchNorm (the CNN trunks, a momentum teacher's copy included) is frozen: the
    heads' 1-d BatchNorm is new and must learn its statistics.
    """
    method.train()
    if preset.frozen_batchnorm:
        for module in method.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
