"""`--init` for the CNN and CLIP families: the formats users bring load into the backbone."""
import pytest
import torch
import torchvision

from histoseek.errors import HistoseekError
from training.encoders.registry import get_encoder


def _backbone(name: str):
    encoder = get_encoder(name)
    return encoder, encoder.build_backbone(encoder.preset("scratch"))


def _same(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("name", ["simclr", "nnclr", "barlowtwins", "swav"])
def test_torchvision_resnet_state_dict_loads_into_the_ssl_backbones(name, tmp_path):
    source = torchvision.models.resnet18(weights=None).state_dict()  # fc.* is a head: ignored
    torch.save(source, tmp_path / "resnet18.pth")
    encoder, backbone = _backbone(name)
    encoder.load_init(backbone, tmp_path / "resnet18.pth")
    loaded = backbone.state_dict()
    assert _same(loaded, source, [k for k in loaded if not k.endswith("num_batches_tracked")])


def test_lightly_and_solo_learn_checkpoints_map_onto_resnet_names(tmp_path):
    resnet = torchvision.models.resnet18(weights=None)
    # lightly's examples: nn.Sequential(*list(resnet.children())[:-1]) inside a model as `backbone`.
    lightly_style = torch.nn.Sequential(*list(resnet.children())[:-1]).state_dict()
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in lightly_style.items()}}, tmp_path / "lightly.ckpt")
    # solo-learn: a Lightning checkpoint whose backbone keys carry the `backbone.` prefix.
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in resnet.state_dict().items()}}, tmp_path / "solo.ckpt")
    for path in (tmp_path / "lightly.ckpt", tmp_path / "solo.ckpt"):
        encoder, backbone = _backbone("simclr")
        encoder.load_init(backbone, path)
        assert torch.equal(backbone.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)
        assert torch.equal(backbone.bn1.running_mean, resnet.bn1.running_mean)


def test_dml_loads_a_plain_resnet_and_keeps_its_attention_fresh(tmp_path):
    source = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(source, tmp_path / "resnet18.pth")
    encoder, backbone = _backbone("dml")
    fresh_attention = backbone.trunk.layer1[0].se.channel.fc1.weight.clone()
    encoder.load_init(backbone, tmp_path / "resnet18.pth")
    assert torch.equal(backbone.trunk.conv1.weight, source["conv1.weight"])
    assert torch.equal(backbone.trunk.layer1[0].se.channel.fc1.weight, fresh_attention)


def test_a_resnet50_file_is_refused_by_the_resnet18_preset_with_the_keys(tmp_path):
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "resnet50.pth")
    encoder, backbone = _backbone("barlowtwins")
    with pytest.raises(HistoseekError, match=r"do not fit this backbone[\s\S]*layer1\.0\.conv1\.weight: file"):
        encoder.load_init(backbone, tmp_path / "resnet50.pth")


def test_open_clip_checkpoint_loads_both_towers(tmp_path):
    import open_clip

    encoder = get_encoder("clip")
    preset = encoder.preset("scratch")
    source = open_clip.CLIP(**preset.options["model"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "clip.pt")
    backbone = encoder.build_backbone(preset)
    encoder.load_init(backbone, tmp_path / "clip.pt")
    assert torch.equal(backbone.visual.conv1.weight, source.visual.conv1.weight)
    method = encoder.build_method(backbone, preset, ("tumour", "stroma"))
    assert torch.equal(method.clip.token_embedding.weight, source.token_embedding.weight)
    assert method.clip.visual is backbone.visual

    torch.save({k: v for k, v in source.state_dict().items() if k.startswith("visual.")}, tmp_path / "visual.pt")
    with pytest.raises(HistoseekError, match="no text tower"):
        encoder.load_init(encoder.build_backbone(preset), tmp_path / "visual.pt")
