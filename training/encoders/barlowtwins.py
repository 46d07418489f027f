"""Barlow Twins: redundancy reduction (Zbontar et al., ICML 2021, arXiv:2103.03230).

The cross-correlation matrix between the batch-normalised projections of two views is
pushed towards the identity: invariance on the diagonal, decorrelated features off it
(weighted by lambda). Head and loss come from lightly.
"""
from __future__ import annotations

import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from torch import nn

from training.backbones import LITE0_FINETUNE, cnn, load_cnn_init
from training.encoders.registry import Encoder, Preset, TrainingMethod, register
from training.transforms import preset_two_views

PRESETS = {
    # ImageNet EfficientNet-Lite0 fine-tuned, with a 2048-d projector. The trunk learns at 3e-4, not
    # the shared 1e-4: on crc5-dev (4 epochs) mMV@5 0.736 on the mean of seeds 0-2 (0.712-0.748), against
    # 0.688 at 1e-4 (seed 0) and 0.652 frozen.
    "cpu": Preset(**LITE0_FINETUNE | dict(trunk_lr=3e-4),
                  options=dict(hidden_dim=2048, out_dim=2048, lambda_param=5e-3, crop_scale=[0.4, 1.0],
                               hed_strength=0.05, color_jitter=0.1)),
    # ResNet-18 on 64-px tiles from random weights.
    "scratch": Preset(backbone="resnet18", input_size=64, embedding_dim=512, batch_size=64, epochs=30, lr=1e-3,
                  weight_decay=1e-4, warmup_epochs=2,
                  options=dict(hidden_dim=1024, out_dim=1024, lambda_param=5e-3, hed_strength=0.05, color_jitter=0.2)),
    # The paper's ResNet-50 with an 8192-8192-8192 projector and lambda 5e-3.
    "paper": Preset(backbone="resnet50", input_size=224, embedding_dim=2048, batch_size=256, epochs=100, lr=1e-3,
                    weight_decay=1.5e-6, warmup_epochs=10,
                    options=dict(hidden_dim=8192, out_dim=8192, lambda_param=5e-3, hed_strength=0.05,
                                 color_jitter=0.2)),
}


class BarlowTwinsMethod(TrainingMethod):
    def __init__(self, backbone: nn.Module, preset: Preset) -> None:
        super().__init__()
        o = preset.options
        self.backbone = backbone
        self.head = BarlowTwinsProjectionHead(preset.embedding_dim, o["hidden_dim"], o["out_dim"])
        self.criterion = BarlowTwinsLoss(lambda_param=o["lambda_param"])

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        # Views pass separately: each branch's BatchNorm statistics are its own, as in the paper.
        return self.criterion(self.head(self.backbone(views[0])), self.head(self.backbone(views[1])))


register(Encoder(
    name="barlowtwins", method="Barlow Twins redundancy reduction (Zbontar et al. 2021)", presets=PRESETS,
    build_backbone=lambda preset: cnn(preset.backbone),
    build_method=lambda backbone, preset, labels: BarlowTwinsMethod(backbone, preset),
    train_transform=preset_two_views, load_init=load_cnn_init,
))
