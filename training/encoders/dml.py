"""Deep metric learning for histopathology retrieval (after Yang et al., Methods 2020).

A ResNet whose residual blocks carry channel and spatial attention (CBAM, Woo et al.
2018) and a linear embedding layer, trained on labels with the multi-similarity loss over
hard pairs (Wang et al., CVPR 2019): the miner keeps the positives less similar than the
hardest negative and the negatives more similar than the hardest positive (by
epsilon), and the loss weighs them by how hard they are. A batch-hard triplet loss was
tried first: trained from scratch it collapsed every tile onto one point (loss stuck at
its margin). Two augmented views of every tile enter the batch, so every anchor has a
positive. Miner and loss come from pytorch-metric-learning.
"""
from __future__ import annotations

from pathlib import Path

import torch
from pytorch_metric_learning import losses, miners
from torch import nn

from training.backbones import load_resnet_init, resnet
from training.encoders.registry import Encoder, Preset, TrainingMethod, register
from training.transforms import preset_two_views

PRESETS = {
    "cpu": Preset(backbone="resnet18", input_size=64, embedding_dim=128, batch_size=64, epochs=30, lr=1e-3,
                  weight_decay=1e-4, warmup_epochs=2, options=dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1,
                                                                    hed_strength=0.05, color_jitter=0.2)),
    "paper": Preset(backbone="resnet50", input_size=224, embedding_dim=512, batch_size=128, epochs=50, lr=1e-4,
                    weight_decay=1e-4, warmup_epochs=2, options=dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1,
                                                                      hed_strength=0.05, color_jitter=0.2)),
}


class AttentionEmbedder(nn.Module):
    """CBAM-ResNet trunk, global average pooling, linear embedding: the exported network."""

    def __init__(self, preset: Preset) -> None:
        super().__init__()
        self.trunk = resnet(preset.backbone, attention="cbam")
        self.embed = nn.Linear(self.trunk.num_features, preset.embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.trunk(images))


class MetricLearningMethod(TrainingMethod):
    def __init__(self, backbone: AttentionEmbedder, preset: Preset) -> None:
        super().__init__()
        self.backbone = backbone
        o = preset.options
        self.miner = miners.MultiSimilarityMiner(epsilon=o["epsilon"])
        self.criterion = losses.MultiSimilarityLoss(alpha=o["alpha"], beta=o["beta"], base=o["base"])

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        embeddings = self.backbone(torch.cat(views[:2]))
        labels = torch.cat([labels, labels])
        return self.criterion(embeddings, labels, self.miner(embeddings, labels))


def train_transform(preset: Preset):
    # Larger crops than the self-supervised methods: labels, not views, define similarity here.
    return preset_two_views(preset, scale=(0.5, 1.0))


def load_init(backbone: AttentionEmbedder, path: Path) -> None:
    # Pretrained files hold the plain ResNet; the attention blocks and the embedding start fresh.
    load_resnet_init(backbone.trunk, path)


register(Encoder(
    name="dml", method="Deep metric learning with attention, multi-similarity loss on hard pairs (after Yang et al. 2020)",
    presets=PRESETS, build_backbone=AttentionEmbedder,
    build_method=lambda backbone, preset, labels: MetricLearningMethod(backbone, preset),
    train_transform=train_transform, load_init=load_init, needs_labels=True,
))
