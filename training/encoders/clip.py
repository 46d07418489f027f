"""CLIP image encoder fine-tuned against class-name prompts (Radford et al., ICML 2021).

The image tower (open_clip) is trained contrastively against the text tower's embedding
of a prompt per class ("a histopathology image of <class>", where <class> is the label or
the words `class_names` gives it, e.g. T -> "tubular adenoma"). Both towers train; the
image tower is the checkpoint's backbone, the text tower is saved beside it and exported
as the second Triton model `clip_text` (token ids in, the image space out), so the prompts
search the index by text. A batch
holds many tiles of one class, so the symmetric CLIP loss is taken over the batch's
distinct prompts: each image's target is its class prompt, each prompt's target is
spread evenly over the images of its class. With one image per class this is exactly
open_clip's `ClipLoss` (tested). The `cpu` preset's image tower is a timm ImageNet
EfficientNet-Lite0 inside open_clip (its `TimmModel`) with a linear projection; its small
text tower starts from random weights, as no CLIP text weights install here.
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from lightly.transforms.multi_view_transform import MultiViewTransform
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import text_global_pool
from torch import nn

from histoseek.errors import HistoseekError
from training import init_weights
from training.backbones import LITE0_FINETUNE
from histoseek.text_tokenizer import clip_bpe_spec
from training.encoders.registry import Encoder, Preset, TextTower, TrainingMethod, register
from training.transforms import histology_view, view_size

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SMALL_TEXT_TOWER = dict(context_length=32, vocab_size=49408, width=128, heads=2, layers=3)

PRESETS = {
    # ImageNet EfficientNet-Lite0 as the image tower, fine-tuned; a 3-layer text tower.
    "cpu": Preset(**LITE0_FINETUNE | dict(embedding_dim=128, weight_decay=0.1),
                  options=dict(model=dict(embed_dim=128,
                                          vision_cfg=dict(timm_model_name="tf_efficientnet_lite0",
                                                          timm_model_pretrained=False, timm_pool="avg",
                                                          timm_proj="linear", image_size=224),
                                          text_cfg=_SMALL_TEXT_TOWER),
                               prompt="a histopathology image of {}", class_names={}, hed_strength=0.05,
                               color_jitter=0.1)),
    # From random weights: a ViT-Tiny-sized image tower on 64-px tiles and a 3-layer text tower.
    "scratch": Preset(backbone="open_clip-vit-tiny-8", input_size=64, embedding_dim=128, batch_size=64, epochs=30,
                  lr=5e-4, weight_decay=0.1, warmup_epochs=2, mean=CLIP_MEAN, std=CLIP_STD,
                  options=dict(model=dict(embed_dim=128,
                                          vision_cfg=dict(image_size=64, layers=6, width=192, head_width=64,
                                                          patch_size=8),
                                          text_cfg=_SMALL_TEXT_TOWER),
                               prompt="a histopathology image of {}", class_names={}, hed_strength=0.05,
                               color_jitter=0.2)),
    # OpenAI's ViT-B/32 architecture (open_clip "ViT-B-32"); fine-tune from its weights with --init.
    "paper": Preset(backbone="open_clip-ViT-B-32", input_size=224, embedding_dim=512, batch_size=128, epochs=10,
                    lr=1e-5, weight_decay=0.1, warmup_epochs=1, mean=CLIP_MEAN, std=CLIP_STD,
                    options=dict(model=open_clip.get_model_config("ViT-B-32"), prompt="a histopathology image of {}",
                                 class_names={}, hed_strength=0.05, color_jitter=0.2)),
}


class ImageTower(nn.Module):
    """open_clip's image tower: normalised pixels in, projected image embedding out."""

    def __init__(self, preset: Preset) -> None:
        super().__init__()
        self.visual = open_clip.CLIP(**preset.options["model"]).visual
        # Text-tower weights found in an --init file, handed to training (never exported).
        self.text_init: dict[str, torch.Tensor] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


class ClipTextTower(nn.Module):
    """open_clip's text tower alone: token ids `[N, L]` in, projected text embedding out
    (open_clip's `CLIP.encode_text`, sharing the given model's parameters)."""

    def __init__(self, clip: open_clip.CLIP) -> None:
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.pool_type, self.eos_id = clip.text_pool_type, getattr(clip, "text_eos_id", None)
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection if self.text_projection is not None else x


def class_prompts(options: dict, labels: tuple[str, ...]) -> dict[str, str]:
    """The prompt of each class: the preset's template around the class's words."""
    names = options.get("class_names") or {}
    return {label: options["prompt"].format(names.get(label, label.replace("_", " "))) for label in labels}


def class_prompt_clip_loss(image_features: torch.Tensor, class_text_features: torch.Tensor, labels: torch.Tensor,
                           logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss between images and their classes' prompts (features L2-normalised)."""
    logits = logit_scale * image_features @ class_text_features.T  # [images, classes]
    image_loss = F.cross_entropy(logits, labels)
    present = labels.unique()
    targets = (labels[None, :] == present[:, None]).float()
    targets = targets / targets.sum(dim=1, keepdim=True)
    text_loss = -(targets * logits.T[present].log_softmax(dim=1)).sum(dim=1).mean()
    return (image_loss + text_loss) / 2


class CLIPMethod(TrainingMethod):
    def __init__(self, backbone: ImageTower, preset: Preset, labels: tuple[str, ...]) -> None:
        super().__init__()
        o = preset.options
        self.backbone = backbone
        self.clip = open_clip.CLIP(**o["model"])
        self.clip.visual = backbone.visual  # one image tower, trained and exported
        if backbone.text_init:
            self.clip.load_state_dict(backbone.text_init, strict=False)
        unknown = sorted(set(o.get("class_names") or {}) - set(labels))
        if unknown:
            raise HistoseekError(f"class names given for {', '.join(unknown)}, which the data does not have "
                                 f"(its classes: {', '.join(labels)})")
        prompts = list(class_prompts(o, labels).values())
        tokenizer = SimpleTokenizer(context_length=o["model"]["text_cfg"]["context_length"])
        self.register_buffer("prompt_tokens", tokenizer(prompts), persistent=False)

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        images = F.normalize(self.backbone(views[0]), dim=-1)
        texts = F.normalize(self.clip.encode_text(self.prompt_tokens), dim=-1)
        # CLIP clamps its learned temperature so that logits stay below 100.
        return class_prompt_clip_loss(images, texts, labels, self.clip.logit_scale.exp().clamp(max=100))

    def text_tower(self) -> nn.Module:
        return ClipTextTower(self.clip)


def train_transform(preset: Preset):
    o = preset.options
    view = histology_view(view_size(preset), (0.5, 1.0), preset.mean, preset.std, hed_strength=o["hed_strength"],
                          color_jitter=o["color_jitter"])
    return MultiViewTransform([view])


def load_init(backbone: ImageTower, path: Path) -> None:
    """An open_clip (or OpenAI CLIP) checkpoint: image tower into the backbone, text tower kept for training."""
    state = init_weights.read_state_dict(path)
    init_weights.load_state_into(backbone, state, path)
    backbone.text_init = {k: v for k, v in state.items() if not k.startswith("visual.")}
    if "token_embedding.weight" not in backbone.text_init:
        raise HistoseekError(f"{path} has an image tower but no text tower (token_embedding.weight); CLIP "
                             "fine-tuning needs both: give a full open_clip checkpoint")


register(Encoder(
    name="clip", method="CLIP image encoder fine-tuned against class-name prompts (Radford et al. 2021)",
    presets=PRESETS, build_backbone=ImageTower,
    build_method=lambda backbone, preset, labels: CLIPMethod(backbone, preset, labels),
    train_transform=train_transform, load_init=load_init, needs_labels=True,
    trunk=lambda backbone: getattr(backbone.visual, "trunk", backbone.visual),
    # The text tower trains with the image tower; its weights are the checkpoint's text_weights.safetensors.
    text_tower=TextTower(build=lambda preset: ClipTextTower(open_clip.CLIP(**preset.options["model"])),
                         tokenizer=lambda preset: clip_bpe_spec(preset.options["model"]["text_cfg"]["context_length"]),
                         prompts=class_prompts, trained=True),
))
