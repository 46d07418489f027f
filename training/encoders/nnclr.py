"""NNCLR: contrastive learning with nearest-neighbour positives (Dwibedi et al., ICCV 2021, arXiv:2104.14548).

Like SimCLR, but each view's positive is the nearest neighbour of the other view's
projection in a queue (support set) of past projections, which brings semantically close
tiles of *different* images together. Heads, queue and loss come from lightly.
"""
from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import NNCLRPredictionHead, NNCLRProjectionHead, NNMemoryBankModule
from torch import nn

from training.backbones import LITE0_FINETUNE, cnn, load_cnn_init
from training.encoders.registry import Encoder, Preset, TrainingMethod, register
from training.transforms import preset_two_views

PRESETS = {
    # ImageNet EfficientNet-Lite0 fine-tuned; the support set is smaller than the 2,000-image
    # development sets it meets on CPU, and its neighbours are meaningful from the first step.
    "cpu": Preset(**LITE0_FINETUNE, options=dict(hidden_dim=512, out_dim=128, pred_hidden_dim=512, queue_size=1024,
                                                 temperature=0.2, crop_scale=[0.4, 1.0], hed_strength=0.05,
                                                 color_jitter=0.1)),
    # ResNet-18 on 64-px tiles from random weights.
    "scratch": Preset(backbone="resnet18", input_size=64, embedding_dim=512, batch_size=64, epochs=30, lr=1e-3,
                  weight_decay=1e-4, warmup_epochs=2,
                  options=dict(hidden_dim=512, out_dim=128, pred_hidden_dim=512, queue_size=1024,
                               temperature=0.1, hed_strength=0.05, color_jitter=0.2)),
    # The paper's ResNet-50, 2048-2048-256 projection, 4096 prediction hidden layer, 98,304-entry queue.
    "paper": Preset(backbone="resnet50", input_size=224, embedding_dim=2048, batch_size=256, epochs=100, lr=1e-3,
                    weight_decay=1e-6, warmup_epochs=10,
                    options=dict(hidden_dim=2048, out_dim=256, pred_hidden_dim=4096, queue_size=98_304,
                                 temperature=0.1, hed_strength=0.05, color_jitter=0.2)),
}


class NNCLRMethod(TrainingMethod):
    def __init__(self, backbone: nn.Module, preset: Preset) -> None:
        super().__init__()
        o = preset.options
        self.backbone = backbone
        self.projection_head = NNCLRProjectionHead(preset.embedding_dim, o["hidden_dim"], o["out_dim"])
        self.prediction_head = NNCLRPredictionHead(o["out_dim"], o["pred_hidden_dim"], o["out_dim"])
        self.support_set = NNMemoryBankModule(size=(o["queue_size"], o["out_dim"]))
        self.criterion = NTXentLoss(temperature=o["temperature"])

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        z = self.projection_head(self.backbone(torch.cat(views[:2])))
        p0, p1 = self.prediction_head(z).chunk(2)
        z0, z1 = z.detach().chunk(2)
        # Nearest neighbours come from the queue as it was; only the second call enqueues.
        nn0 = self.support_set(z0, update=False)
        nn1 = self.support_set(z1, update=True)
        return 0.5 * (self.criterion(nn0, p1) + self.criterion(nn1, p0))


register(Encoder(
    name="nnclr", method="NNCLR nearest-neighbour contrastive learning (Dwibedi et al. 2021)", presets=PRESETS,
    build_backbone=lambda preset: cnn(preset.backbone),
    build_method=lambda backbone, preset, labels: NNCLRMethod(backbone, preset),
    train_transform=preset_two_views, load_init=load_cnn_init,
))
