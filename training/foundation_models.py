"""Build a pretrained encoder's published architecture and take its embedding by the model's rule.

`build(model)` returns a `FoundationBackbone`: normalised float NCHW in, `[N, D]` out,
like every backbone of the registry; `.model` is the network exactly as its library
builds it (timm, transformers, open_clip, or CONCH's image tower rebuilt here), so the
published state dict loads into `.model` under its own names. Build inside
`torch.device("meta")` to see a giant model's layout without allocating its weights.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import timm
import torch
from torch import nn

if TYPE_CHECKING:
    from training.foundation_table import FoundationModel

_LAYERS = {"SwiGLUPacked": lambda: timm.layers.SwiGLUPacked, "SiLU": lambda: nn.SiLU}


class FoundationBackbone(nn.Module):
    """A published network plus its embedding rule (`cls`, `cls+mean_patch`, `projected`, `pooled`)."""

    def __init__(self, model: nn.Module, spec: FoundationModel) -> None:
        super().__init__()
        self.model = model
        self.rule = spec.embedding
        self.library = spec.library

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.library == "transformers":
            out = self.model(pixel_values=x)
            # CLIP's projected image embedding, or Dinov2's class token (Phikon-v2's card).
            return out.image_embeds if self.rule == "projected" else out.last_hidden_state[:, 0]
        out = self.model(x)
        if self.rule == "cls+mean_patch":
            # Virchow2's card: the class token and the mean of the patch tokens (registers skipped).
            return torch.cat([out[:, 0], out[:, self.model.num_prefix_tokens:].mean(1)], dim=-1)
        return out


class AttentionalPooler(nn.Module):
    """CONCH's attentional pooler (conch/open_clip_custom/transformer.py): learnt queries
    attend over the trunk's tokens; the same parameter names and sequence-first attention."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x).permute(1, 0, 2)  # NLD -> LND
        q = self.ln_q(self.query).unsqueeze(1).repeat(1, x.shape[1], 1)
        return self.attn(q, x, x, need_weights=False)[0].permute(1, 0, 2)


class ConchImageTower(nn.Module):
    """CONCH's `VisualModel` for retrieval: the timm ViT-B/16 trunk's tokens (448 px), the
    contrastive attentional pooler, its LayerNorm and projection: `encode_image(proj_contrast=True)`.
    The captioning pooler is the text decoder's input and is not built."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.trunk = timm.models.VisionTransformer(
            embed_dim=cfg["width"], depth=cfg["layers"], num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
            img_size=cfg["image_size"], patch_size=cfg["patch_size"], num_classes=0, dynamic_img_size=True)
        dim = cfg["embed_dim"]
        self.attn_pool_contrast = AttentionalPooler(dim, cfg["width"], cfg["attn_pooler_heads"],
                                                    cfg["n_queries_contrast"])
        self.ln_contrast = nn.LayerNorm(dim)
        self.proj_contrast = nn.Parameter(cfg["width"] ** -0.5 * torch.randn(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])
        return pooled @ self.proj_contrast


def build_network(spec: FoundationModel) -> nn.Module:
    """The network as its library builds it (random weights)."""
    kwargs = {k: _LAYERS[v]() if k in ("mlp_layer", "act_layer") else v for k, v in spec.kwargs.items()}
    if spec.library == "timm":
        return timm.create_model(spec.architecture, pretrained=False, **kwargs)
    if spec.library == "transformers":
        import transformers

        config_class = {"Dinov2Model": transformers.Dinov2Config,
                        "CLIPVisionModelWithProjection": transformers.CLIPVisionConfig}[spec.architecture]
        return getattr(transformers, spec.architecture)(config_class(**kwargs))
    if spec.library == "open_clip":
        import open_clip
        from open_clip.model import _build_vision_tower

        cfg = open_clip.get_model_config(spec.architecture)
        return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    if spec.library == "conch":
        return ConchImageTower(kwargs)
    if spec.library == "imagenet":
        from training.backbones import cnn

        return cnn(spec.architecture)
    raise ValueError(f"unknown library {spec.library!r}")


def build(spec: FoundationModel) -> FoundationBackbone:
    return FoundationBackbone(build_network(spec), spec).eval()


def count_gflops(spec: FoundationModel) -> float:
    """FLOPs of one tile at the model's input size (multiply and add counted apart), in billions;
    counted on the meta device, so a giant model costs no memory."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        backbone = build(spec)
        tile = torch.zeros(1, 3, spec.input_size, spec.input_size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            backbone(tile)
    return counter.get_total_flops() / 1e9
