"""DINO: self-distillation with no labels (Caron et al., ICCV 2021, arXiv:2104.14294).

A student ViT learns to match a momentum teacher's centred, sharpened output over
multi-crop views (two global crops seen by both, local crops by the student only).
Loss, projection head and momentum update come from lightly; the backbone is a timm
network whose `forward` returns the embedding, so it exports without the head: a ViT
(the paper's preset) or, as the paper also did with a ResNet-50, a CNN (the `cpu` preset
fine-tunes ImageNet EfficientNet-Lite0; the teacher starts from the same weights).
"""
from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import timm
import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from timm.layers import HybridEmbed, resample_abs_pos_embed
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

from training import init_weights
from training.backbones import LITE0_FINETUNE, cnn, load_cnn_init
from training.encoders.registry import Encoder, Preset, TrainingMethod, register
from training.transforms import multi_crop, view_size

PRESETS = {
    # ImageNet EfficientNet-Lite0 fine-tuned: 2 global 160-px crops and 2 local 96-px ones, a
    # 4096-way head; the teacher's momentum starts at 0.99 so that its head, fresh like the
    # student's, follows within a few hundred steps.
    "cpu": Preset(**LITE0_FINETUNE | dict(weight_decay=0.04),
                  options=dict(arch="cnn", local_size=96, n_local=2, out_dim=4096, hidden_dim=1024, bottleneck_dim=256,
                               teacher_temp=0.04, warmup_teacher_temp=0.04, teacher_temp_warmup=0.3, momentum=0.99,
                               weight_decay_end=0.04, global_scale=[0.3, 1.0], local_scale=[0.05, 0.3],
                               hed_strength=0.05, color_jitter=0.1)),
    # From random weights: a ViT-Tiny on 64-px tiles with a convolutional stem (3 stride-2 convs -> 64 tokens):
    # early convolutions make ViTs far more sample-efficient (Xiao et al., NeurIPS 2021),
    # which is what a few minutes on 2 cores need.
    "scratch": Preset(
        backbone="vit_tiny_patch16_224", input_size=64, embedding_dim=192, batch_size=64, epochs=30,
        lr=1e-3, weight_decay=0.04, warmup_epochs=3,
        # Mean-pooled patch tokens: after minutes of training they hold more texture than CLS.
        options=dict(patch_size=8, stem="conv", depth=6, global_pool="avg", local_size=32, n_local=4, out_dim=2048,
                     hidden_dim=512, bottleneck_dim=128, teacher_temp=0.04, warmup_teacher_temp=0.04,
                     teacher_temp_warmup=0.3, momentum=0.99, weight_decay_end=0.1,
                     hed_strength=0.05, color_jitter=0.2),
    ),
    # The paper's ViT-S/16 recipe (Table 8 and Appendix of the DINO paper).
    "paper": Preset(
        backbone="vit_small_patch16_224", input_size=224, embedding_dim=384, batch_size=256, epochs=100,
        lr=5e-4, weight_decay=0.04, warmup_epochs=10,
        options=dict(patch_size=16, stem="patch", depth=12, global_pool="token", local_size=96, n_local=6, out_dim=65536, hidden_dim=2048,
                     bottleneck_dim=256, teacher_temp=0.07, warmup_teacher_temp=0.04,
                     teacher_temp_warmup=0.3, momentum=0.996, weight_decay_end=0.4,
                     hed_strength=0.05, color_jitter=0.2),
    ),
}


def build_backbone(preset: Preset) -> nn.Module:
    opts = preset.options
    if opts.get("arch") == "cnn":
        return cnn(preset.backbone)
    stem = {}
    if opts["stem"] == "conv":
        # Three stride-2 3x3 convolutions reach the patch size 8 (timm's hybrid-ViT stem).
        conv = ConvStem(channels=(preset.embedding_dim // 4, preset.embedding_dim // 2, preset.embedding_dim),
                        stride=(2, 2, 2), kernel_size=3, padding=1)
        stem = dict(embed_layer=partial(HybridEmbed, backbone=conv), patch_size=1)
    # dynamic_img_size lets one ViT take global and local crops of different sizes.
    return timm.create_model(
        preset.backbone, pretrained=False, num_classes=0, img_size=preset.input_size,
        **({"patch_size": opts["patch_size"]} | stem), depth=opts["depth"],
        global_pool=opts["global_pool"], dynamic_img_size=True,
    )


class DINOMethod(TrainingMethod):
    def __init__(self, backbone: nn.Module, preset: Preset) -> None:
        super().__init__()
        opts = preset.options
        self.backbone = backbone
        dims = (preset.embedding_dim, opts["hidden_dim"], opts["bottleneck_dim"], opts["out_dim"])
        self.head = DINOProjectionHead(*dims)
        self.teacher_backbone = copy.deepcopy(backbone)
        # The head's weight norm cannot be deep-copied: build a twin and copy its weights.
        self.teacher_head = DINOProjectionHead(*dims)
        self.teacher_head.load_state_dict(self.head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=opts["out_dim"], warmup_teacher_temp=opts["warmup_teacher_temp"],
                                  teacher_temp=opts["teacher_temp"])
        self.opts = opts
        self.progress = 0.0

    def _teacher_temp(self) -> float:
        # Linear warm-up of the teacher temperature over the first part of training.
        warm = self.opts["teacher_temp_warmup"]
        t0, t1 = self.opts["warmup_teacher_temp"], self.opts["teacher_temp"]
        return t1 if self.progress >= warm else t0 + (t1 - t0) * self.progress / warm

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_out = [self.teacher_head(self.teacher_backbone(v)) for v in views[:2]]
        # Views of one size go through the ViT together: fewer, larger matmuls.
        global_out = self.head(self.backbone(torch.cat(views[:2])))
        student_out = list(global_out.chunk(2))
        if len(views) > 2:
            student_out += list(self.head(self.backbone(torch.cat(views[2:]))).chunk(len(views) - 2))
        return self.criterion(teacher_out, student_out, teacher_temp=self._teacher_temp())

    def after_step(self, progress: float) -> None:
        self.progress = progress
        # The paper's cosine schedule of the teacher momentum from its base value to 1.
        momentum = cosine_schedule(int(progress * 10_000), 10_000, self.opts["momentum"], 1.0)
        update_momentum(self.backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.head, self.teacher_head, m=momentum)


def train_transform(preset: Preset):
    o = preset.options
    return multi_crop(view_size(preset), o["local_size"], o["n_local"], preset.mean, preset.std,
                      global_scale=tuple(o.get("global_scale", (0.4, 1.0))),
                      local_scale=tuple(o.get("local_scale", (0.1, 0.4))), hed_strength=o["hed_strength"],
                      color_jitter=o["color_jitter"])


def load_init(backbone: nn.Module, path: Path) -> None:
    if not hasattr(backbone, "pos_embed"):  # the CNN presets
        load_cnn_init(backbone, path)
        return

    def resize_pos_embed(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        grid = int((target.shape[1] - 1) ** 0.5)
        return resample_abs_pos_embed(value, new_size=(grid, grid), num_prefix_tokens=1)

    init_weights.load_into(backbone, path, adapt={"pos_embed": resize_pos_embed})


register(Encoder(
    name="dino", method="DINO self-distillation (Caron et al. 2021)", presets=PRESETS,
    build_backbone=build_backbone, build_method=lambda backbone, preset, labels: DINOMethod(backbone, preset),
    train_transform=train_transform, load_init=load_init,
))
