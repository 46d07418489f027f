"""SwAV: swapping assignments between views (Caron et al., NeurIPS 2020, arXiv:2006.09882).

Projections of every crop are scored against learnable prototypes; the Sinkhorn-Knopp
algorithm turns the global crops' scores into equipartitioned soft cluster codes, and
each crop predicts the codes of the *other* global crops. A queue of recent global-crop
projections enlarges the batch that Sinkhorn balances, which small batches need. Head,
prototypes, queue and loss come from lightly.
"""
from __future__ import annotations

import torch
from lightly.loss import SwaVLoss
from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
from lightly.models.modules.memory_bank import MemoryBankModule
from torch import nn

from training.backbones import LITE0_FINETUNE, cnn, load_cnn_init
from training.encoders.registry import Encoder, Preset, TrainingMethod, register
from training.transforms import multi_crop, view_size

PRESETS = {
    # ImageNet EfficientNet-Lite0 fine-tuned: 2 global 160-px crops and 2 local 96-px ones;
    # 128 prototypes for a few thousand tiles of a handful of tissue types.
    "cpu": Preset(**LITE0_FINETUNE, options=dict(local_size=96, n_local=2, hidden_dim=512, out_dim=128,
                                                 n_prototypes=128, frozen_prototype_steps=30, queue_size=512,
                                                 queue_start=0.15, temperature=0.1, sinkhorn_iterations=3,
                                                 sinkhorn_epsilon=0.05, global_scale=[0.3, 1.0],
                                                 local_scale=[0.05, 0.3], hed_strength=0.05, color_jitter=0.1)),
    # ResNet-18 on 64-px tiles from random weights.
    "scratch": Preset(backbone="resnet18", input_size=64, embedding_dim=512, batch_size=64, epochs=30, lr=1e-3,
                  weight_decay=1e-4, warmup_epochs=2,
                  options=dict(local_size=32, n_local=4, hidden_dim=512, out_dim=128, n_prototypes=256,
                               frozen_prototype_steps=30, queue_size=1024, queue_start=0.15, temperature=0.1,
                               sinkhorn_iterations=3, sinkhorn_epsilon=0.05, hed_strength=0.05, color_jitter=0.2)),
    # The paper's ResNet-50, 2x224 + 6x96 crops, 3000 prototypes, a 3840-entry queue.
    "paper": Preset(backbone="resnet50", input_size=224, embedding_dim=2048, batch_size=256, epochs=100, lr=1e-3,
                    weight_decay=1e-6, warmup_epochs=10,
                    options=dict(local_size=96, n_local=6, hidden_dim=2048, out_dim=128, n_prototypes=3000,
                                 frozen_prototype_steps=300, queue_size=3840, queue_start=0.15, temperature=0.1,
                                 sinkhorn_iterations=3, sinkhorn_epsilon=0.05, hed_strength=0.05, color_jitter=0.2)),
}


class SwaVMethod(TrainingMethod):
    def __init__(self, backbone: nn.Module, preset: Preset) -> None:
        super().__init__()
        o = preset.options
        self.backbone = backbone
        self.head = SwaVProjectionHead(preset.embedding_dim, o["hidden_dim"], o["out_dim"])
        self.prototypes = SwaVPrototypes(o["out_dim"], o["n_prototypes"], o["frozen_prototype_steps"])
        # One queue per global crop, as in the paper.
        self.queues = nn.ModuleList(
            MemoryBankModule(size=(o["queue_size"], o["out_dim"]), feature_dim_first=False) for _ in range(2)
        )
        self.criterion = SwaVLoss(o["temperature"], o["sinkhorn_iterations"], o["sinkhorn_epsilon"])
        self.queue_start = o["queue_start"]
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # saved with the resume state
        self.progress = 0.0

    def _project(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        z = nn.functional.normalize(self.head(self.backbone(torch.cat(views))), dim=1)
        return list(z.chunk(len(views)))

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        self.prototypes.normalize()
        step = int(self.step)
        high = self._project(views[:2])
        low = self._project(views[2:]) if len(views) > 2 else []
        queued = []
        with torch.no_grad():
            for queue, z in zip(self.queues, high):
                _, bank = queue(z.detach(), update=True)
                queued.append(bank)
        # The queue starts out as random vectors: it joins the codes once it holds projections.
        queue_scores = [self.prototypes(q, step) for q in queued] if self.progress >= self.queue_start else None
        return self.criterion([self.prototypes(z, step) for z in high], [self.prototypes(z, step) for z in low],
                              queue_scores)

    def after_step(self, progress: float) -> None:
        self.step += 1
        self.progress = progress


def train_transform(preset: Preset):
    o = preset.options
    return multi_crop(view_size(preset), o["local_size"], o["n_local"], preset.mean, preset.std,
                      global_scale=tuple(o.get("global_scale", (0.14, 1.0))),
                      local_scale=tuple(o.get("local_scale", (0.05, 0.14))), hed_strength=o["hed_strength"],
                      color_jitter=o["color_jitter"])


register(Encoder(
    name="swav", method="SwAV online clustering with swapped assignments (Caron et al. 2020)", presets=PRESETS,
    build_backbone=lambda preset: cnn(preset.backbone),
    build_method=lambda backbone, preset, labels: SwaVMethod(backbone, preset),
    train_transform=train_transform, load_init=load_cnn_init,
))
