"""Weights files in the pretrained encoders' published layouts, from random weights.

`published_state` turns a built network's state dict into the keys its published file
holds: the image tower's prefix, the names of the library version the file was saved
with, and the parts the file carries besides the image tower (text towers, captioning
pooler, temperature), so a loader that ignored a prefix or refused a text tower would fail.
The layouts' landmarks (a key and its shape per model) are pinned in test_foundation.py.
"""
from __future__ import annotations

from pathlib import Path

import torch

from training.foundation_table import FoundationModel

# Keys a published file has besides the image tower (one or two per part suffice: the
# loader must accept them without loading them).
OTHER_PARTS = {
    "conch": {"visual.attn_pool_caption.query": (256, 768), "visual.ln_caption.weight": (768,),
              "text.token_embedding.weight": (32007, 8), "text_decoder.ln_final.weight": (768,), "logit_scale": ()},
    "plip": {"text_model.embeddings.token_embedding.weight": (49408, 8), "text_projection.weight": (512, 512),
             "logit_scale": (), "vision_model.embeddings.position_ids": (1, 50)},
    "quiltnet-b-32": {"token_embedding.weight": (49408, 8), "positional_embedding": (77, 512),
                      "transformer.resblocks.0.attn.in_proj_weight": (1536, 512), "ln_final.weight": (512,),
                      "text_projection": (512, 512), "logit_scale": ()},
}


def published_state(model: FoundationModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the built network's) under the published file's key names, plus its other parts."""
    published = {}
    for key, value in state.items():
        for old, new in model.renames:
            key = key.replace(new, old)
        published[model.prefix + key] = value
    device = next(iter(state.values())).device
    for key, shape in OTHER_PARTS.get(model.name, {}).items():
        published[key] = torch.zeros(shape, device=device)
    return published


def write_published(model: FoundationModel, state: dict[str, torch.Tensor], folder: Path) -> Path:
    """The published file (its name and format: safetensors or a torch.save state dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / model.weights_file
    published = {k: v.detach().contiguous().clone() for k, v in published_state(model, state).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(published, str(path))
    else:
        torch.save(published, path)
    return path
