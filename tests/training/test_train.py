"""Training a few steps on synthetic data: outputs, determinism, resume, --init."""
import json

import pytest
import torch
from safetensors.torch import load_file

from histoseek.dataset import DatasetItem, read_dataset, write_manifest
from histoseek.errors import HistoseekError
from training import checkpoint
from training.train import TrainConfig, train


def _config(data, out, **kw):
    base = dict(encoder="dino", data=str(data), out=str(out), preset="scratch", epochs=2, batch_size=8, workers=0, seed=3)
    return TrainConfig(**(base | kw))


def test_train_writes_a_loadable_checkpoint(synth_data, tmp_path):
    out = train(_config(synth_data, tmp_path / "ckpt"))
    assert {"weights.safetensors", "encoder.json", "train_config.json"} <= {p.name for p in out.iterdir()}
    spec = json.loads((out / "encoder.json").read_text())
    assert spec["name"] == "dino" and spec["input_size"] == 64
    config = json.loads((out / "train_config.json").read_text())
    assert config["steps"] == 2 * (24 // 8) and config["final_loss"] > 0
    backbone, loaded_spec = checkpoint.load_backbone(out)
    # Only the exportable backbone is saved: no head, no teacher.
    assert not any(k.startswith(("head", "teacher")) for k in load_file(str(out / "weights.safetensors")))
    assert backbone(torch.zeros(1, 3, 64, 64)).shape == (1, loaded_spec.embedding_dim)


def test_interrupted_training_resumes_to_the_same_weights(synth_data, tmp_path):
    straight = train(_config(synth_data, tmp_path / "straight"))

    def interrupt(step):
        if step == 4:
            raise KeyboardInterrupt

    resumed_dir = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(_config(synth_data, resumed_dir), on_step=interrupt)
    assert checkpoint.load_resume_state(resumed_dir)["step"] == 4
    resumed = train(_config(synth_data, resumed_dir))
    a = load_file(str(straight / "weights.safetensors"))
    b = load_file(str(resumed / "weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_init_loads_dino_style_checkpoint_and_rejects_mismatches(synth_data, tmp_path):
    from training.encoders.registry import get_encoder

    encoder = get_encoder("dino")
    source = encoder.build_backbone(encoder.preset("scratch"))
    # DINO's training checkpoints nest the backbone under teacher/ with a module.backbone. prefix.
    wrapped = {"teacher": {f"module.backbone.{k}": v for k, v in source.state_dict().items()},
               "epoch": 10}
    torch.save(wrapped, tmp_path / "dino_checkpoint.pth")
    target = encoder.build_backbone(encoder.preset("scratch"))
    encoder.load_init(target, tmp_path / "dino_checkpoint.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)

    # The paper preset's ViT-S weights do not fit the scratch ViT-Tiny: refused, keys listed.
    big = encoder.build_backbone(encoder.preset("paper"))
    torch.save(big.state_dict(), tmp_path / "vit_small.pth")
    with pytest.raises(HistoseekError, match=r"blocks\.0\.attn\.qkv\.weight: file \(1152, 384\)"):
        encoder.load_init(target, tmp_path / "vit_small.pth")
    with pytest.raises(HistoseekError, match="does not exist"):
        encoder.load_init(target, tmp_path / "missing.pth")


def test_training_refuses_a_run_of_another_encoder_and_a_missing_dataset(synth_data, tmp_path):
    with pytest.raises(HistoseekError, match="does not exist"):
        train(_config(tmp_path / "nowhere", tmp_path / "x"))
    with pytest.raises(HistoseekError, match="no items in split"):
        train(_config(synth_data, tmp_path / "y", split="validation"))


@pytest.mark.parametrize("name", ["dml", "clip"])
def test_label_learning_encoders_refuse_unlabelled_data(name, synth_data, tmp_path):
    dataset = read_dataset(synth_data)
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    write_manifest(unlabelled, [DatasetItem(path=str(dataset.absolute(item)), label="", group=item.group,
                                            source=item.path) for item in dataset.items])
    with pytest.raises(HistoseekError, match=f"encoder '{name}' learns from labels.*have none"):
        train(TrainConfig(encoder=name, data=str(unlabelled), out=str(tmp_path / "out"), epochs=1, workers=0))
    single = tmp_path / "one_class"
    (single / "tumour").mkdir(parents=True)
    for item in dataset.items[:4]:
        (single / "tumour" / dataset.absolute(item).name).write_bytes(dataset.absolute(item).read_bytes())
    with pytest.raises(HistoseekError, match="fewer than two classes"):
        train(TrainConfig(encoder=name, data=str(single), out=str(tmp_path / "out1"), epochs=1, workers=0))


def test_schedule_follows_the_clock_but_not_below_the_minimum_steps():
    from training.train import schedule_progress

    assert schedule_progress(5, 10, 0.0, None, None) == 0.5  # by steps
    assert schedule_progress(5, 100, 60.0, 60.0, None) == 1.0  # the clock has run out
    # A slow machine: the minutes are spent, the minimum steps not: the steps lead.
    assert schedule_progress(25, 300, 120.0, 120.0, 50) == 0.5
    assert schedule_progress(50, 300, 240.0, 120.0, 50) == 1.0
    # A fast machine: the clock ends it after more than the minimum.
    assert schedule_progress(40, 300, 60.0, 120.0, 50) == 0.5
    assert schedule_progress(55, 300, 120.0, 120.0, 50) == 1.0


def test_a_spent_time_budget_still_trains_the_minimum_steps(synth_data, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="training.train")
    out = train(_config(synth_data, tmp_path / "ckpt", epochs=4, max_minutes=1e-4, min_steps=7))
    assert json.loads((out / "train_config.json").read_text())["steps"] == 7
    assert any("s a step here" in r.getMessage() and "7 steps the recipe needs" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    steps = train(_config(synth_data, tmp_path / "steps", epochs=None, steps=5))
    assert json.loads((steps / "train_config.json").read_text())["steps"] == 5
    with pytest.raises(HistoseekError, match="--min-steps 99 is more than the run's 12 steps"):
        train(_config(synth_data, tmp_path / "bad", epochs=4, max_minutes=1, min_steps=99))
