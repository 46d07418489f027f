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
from timm.layers.cbam import CbamModule
from torch import nn

from training.backbones import LITE0_FINETUNE, cnn, load_cnn_init
from training.encoders.registry import Encoder, Preset, TrainingMethod, register
from training.transforms import preset_two_views

PRESETS = {
    # ImageNet EfficientNet-Lite0 fine-tuned, CBAM on its last feature map (the Lite
    # networks have no attention inside their blocks to add it to).
    "cpu": Preset(**LITE0_FINETUNE | dict(embedding_dim=128),
                  options=dict(attention="head", alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, crop_scale=[0.5, 1.0],
                               hed_strength=0.05, color_jitter=0.1)),
    # ResNet-18 with CBAM in every block, on 64-px tiles from random weights.
    "scratch": Preset(backbone="resnet18", input_size=64, embedding_dim=128, batch_size=64, epochs=30, lr=1e-3,
                  weight_decay=1e-4, warmup_epochs=2, options=dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1,
                                                                    hed_strength=0.05, color_jitter=0.2)),
    "paper": Preset(backbone="resnet50", input_size=224, embedding_dim=512, batch_size=128, epochs=50, lr=1e-4,
                    weight_decay=1e-4, warmup_epochs=2, options=dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1,
                                                                      hed_strength=0.05, color_jitter=0.2)),
}


class AttentionEmbedder(nn.Module):
    """CNN trunk with CBAM attention, global average pooling, linear embedding: the exported
    network. The attention sits in every residual block (ResNets, option `attention`
    "blocks") or on the trunk's last feature map ("head")."""

    def __init__(self, preset: Preset) -> None:
        super().__init__()
        on_map = preset.options.get("attention", "blocks") == "head"
        self.trunk = cnn(preset.backbone, pooled=not on_map, attention=None if on_map else "cbam")
        self.attention = CbamModule(self.trunk.num_features) if on_map else None
        self.embed = nn.Linear(self.trunk.num_features, preset.embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.trunk(images)
        if self.attention is not None:
            features = self.attention(features).mean(dim=(2, 3))
        return self.embed(features)


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
    load_cnn_init(backbone.trunk, path)


register(Encoder(
    name="dml", method="Deep metric learning with attention, multi-similarity loss on hard pairs (after Yang et al. 2020)",
    presets=PRESETS, build_backbone=AttentionEmbedder,
    build_method=lambda backbone, preset, labels: MetricLearningMethod(backbone, preset),
    train_transform=train_transform, load_init=load_init, needs_labels=True,
    trunk=lambda backbone: backbone.trunk,
))
