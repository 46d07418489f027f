"""SimCLR: contrastive learning of two augmented views (Chen et al., ICML 2020, arXiv:2002.05709).

Each image's two views are positives, every other view in the batch a negative, under
the normalised-temperature cross-entropy (NT-Xent) on a projection head's output. Head
and loss come from lightly; the ResNet trunk (timm) is the exported backbone.
"""
from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from training.backbones import LITE0_FINETUNE, cnn, load_cnn_init
from training.encoders.registry import Encoder, Preset, TrainingMethod, register
from training.transforms import preset_two_views

PRESETS = {
    # ImageNet EfficientNet-Lite0 fine-tuned (backbones.LITE0_FINETUNE): temperature 0.2,
    # crops of 40-100 % and mild colour jitter, as measured in shared/FINDINGS.md.
    "cpu": Preset(**LITE0_FINETUNE, options=dict(hidden_dim=512, out_dim=128, temperature=0.2, crop_scale=[0.4, 1.0],
                                                 hed_strength=0.05, color_jitter=0.1)),
    # ResNet-18 on 64-px tiles from random weights: about 120 images/s forward+backward on 2 cores.
    "scratch": Preset(backbone="resnet18", input_size=64, embedding_dim=512, batch_size=64, epochs=30, lr=1e-3,
                  weight_decay=1e-4, warmup_epochs=2,
                  options=dict(hidden_dim=512, out_dim=128, temperature=0.2, hed_strength=0.05, color_jitter=0.2)),
    # The paper's ResNet-50 at 224 with a 2048-2048-128 head and temperature 0.1 (AdamW here, LARS there).
    "paper": Preset(backbone="resnet50", input_size=224, embedding_dim=2048, batch_size=256, epochs=100, lr=1e-3,
                    weight_decay=1e-6, warmup_epochs=10,
                    options=dict(hidden_dim=2048, out_dim=128, temperature=0.1, hed_strength=0.05, color_jitter=0.2)),
}


class SimCLRMethod(TrainingMethod):
    def __init__(self, backbone: nn.Module, preset: Preset) -> None:
        super().__init__()
        opts = preset.options
        self.backbone = backbone
        self.head = SimCLRProjectionHead(preset.embedding_dim, opts["hidden_dim"], opts["out_dim"])
        self.criterion = NTXentLoss(temperature=opts["temperature"])

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        # One pass over both views: BatchNorm sees the whole batch, as in the paper.
        z0, z1 = self.head(self.backbone(torch.cat(views[:2]))).chunk(2)
        return self.criterion(z0, z1)


register(Encoder(
    name="simclr", method="SimCLR contrastive learning (Chen et al. 2020)", presets=PRESETS,
    build_backbone=lambda preset: cnn(preset.backbone),
    build_method=lambda backbone, preset, labels: SimCLRMethod(backbone, preset),
    train_transform=preset_two_views, load_init=load_cnn_init,
))
