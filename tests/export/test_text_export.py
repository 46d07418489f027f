"""The text tower's export: a clip checkpoint keeps its trained text tower, and `histoseek export`
writes it as `clip_text` (tokens INT64 [N, L] -> L2-normalised FP32 [N, D]) beside the image model,
verified against PyTorch, with the tokenizer's vocabulary in its version folder."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.export_checkpoint import export_checkpoint
from export.repository import model_checksum
from export.text_export import export_text_onnx, verify_text_onnx
from histoseek.errors import HistoseekError
from histoseek.text_tokenizer import CLIP_VOCAB, clip_bpe_spec, load_tokenizer
from training import checkpoint
from training.contract import TextContractModel
from training.encoders.registry import get_encoder

LABELS = ("AC", "T")


def tiny_clip_checkpoint(out: Path, data: Path, labels=LABELS, class_names=None) -> Path:
    """An untrained scratch-preset clip checkpoint, saved as training saves one (both towers)."""
    encoder = get_encoder("clip")
    options = {"class_names": class_names} if class_names else None
    preset = encoder.preset("scratch", options)
    torch.manual_seed(0)
    backbone = encoder.build_backbone(preset)
    method = encoder.build_method(backbone, preset, labels)
    spec = encoder.spec("scratch", labels=labels, options=options)
    checkpoint.save_backbone(out, backbone, spec, {"data": str(data)}, text_tower=method.text_tower())
    return out


def test_the_text_tower_round_trips_through_the_checkpoint(tmp_path, synth_data):
    out = tiny_clip_checkpoint(tmp_path / "ckpt", synth_data, class_names={"T": "tubular adenoma"})
    assert (out / checkpoint.TEXT_WEIGHTS).is_file()
    _, spec = checkpoint.load_backbone(out)
    tower = checkpoint.load_text_tower(out, spec)
    assert spec.options["class_names"] == {"T": "tubular adenoma"}
    prompts = get_encoder("clip").text_tower.prompts(spec.options, spec.labels)
    assert prompts == {"AC": "a histopathology image of AC", "T": "a histopathology image of tubular adenoma"}
    tokens = torch.from_numpy(load_tokenizer(clip_bpe_spec(32))(list(prompts.values())))
    encoder = get_encoder("clip")
    preset = encoder.preset("scratch", spec.options)
    method = encoder.build_method(encoder.build_backbone(preset), preset, LABELS)
    method.clip.load_state_dict({**method.clip.state_dict(), **tower.state_dict()})
    with torch.no_grad():  # the saved tower is the one training used
        torch.testing.assert_close(tower(tokens), method.clip.encode_text(tokens))
    # An encoder without a text tower has none; a clip checkpoint from before text towers has none either.
    (out / checkpoint.TEXT_WEIGHTS).unlink()
    assert checkpoint.load_text_tower(out, spec) is None


def test_text_export_follows_the_contract_and_matches_pytorch(tmp_path):
    encoder = get_encoder("clip")
    preset = encoder.preset("cpu")
    tower = encoder.text_tower.build(preset).eval()
    path = export_text_onnx(tower, 32, tmp_path / "text.onnx")
    graph = onnx.load(str(path))
    (inp,), (out,) = graph.graph.input, graph.graph.output
    assert inp.name == "tokens" and inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == [32]
    assert inp.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert out.name == "embeddings" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    tokens = load_tokenizer(clip_bpe_spec(32))(["a histopathology image of villous adenoma", "", "glands " * 40])
    assert verify_text_onnx(tower, path, tokens) < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        emb = session.run(None, {"tokens": tokens[:batch]})[0]
        assert emb.shape == (batch, 128) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_verification_rejects_a_text_tower_that_disagrees(tmp_path):
    tower = get_encoder("clip").text_tower.build(get_encoder("clip").preset("scratch")).eval()
    path = export_text_onnx(tower, 32, tmp_path / "text.onnx")
    with torch.no_grad():
        tower.text_projection.mul_(torch.rand_like(tower.text_projection))  # (adding a constant would not show: LayerNorm)
    with pytest.raises(HistoseekError, match="disagrees"):
        verify_text_onnx(tower, path, load_tokenizer(clip_bpe_spec(32))(["stroma", "tumour"]))


def test_export_writes_both_towers_into_the_repository(tmp_path, synth_data):
    ckpt = tiny_clip_checkpoint(tmp_path / "ckpt", synth_data)
    image_dir = export_checkpoint(ckpt, tmp_path / "repo", force=True)
    text_dir = tmp_path / "repo" / "clip_text" / "1"
    assert {p.name for p in text_dir.iterdir()} >= {"model.onnx", "model.py", "text.json", CLIP_VOCAB}
    text = json.loads((text_dir / "text.json").read_text())
    assert text["image_model_sha256"] == model_checksum(image_dir)
    assert text["tokenizer"] == clip_bpe_spec(32).to_dict() and text["embedding_dim"] == 128
    assert text["prompts"] == {"AC": "a histopathology image of AC", "T": "a histopathology image of T"}
    assert text["verify_max_abs_diff"] < 1e-4 and text["model_sha256"] == model_checksum(text_dir)
    config = (tmp_path / "repo" / "clip_text" / "config.pbtxt").read_text()
    assert 'name: "clip_text"' in config and "TYPE_INT64 dims: [ 32 ]" in config and "text_spec" in config
    # A second export is a second version of each.
    export_checkpoint(ckpt, tmp_path / "repo", force=True)
    assert (tmp_path / "repo" / "clip_text" / "2" / "model.onnx").is_file()


def test_training_saves_the_text_tower_and_refuses_unknown_class_names(tmp_path, synth_data):
    from training.train import TrainConfig, train

    base = dict(encoder="clip", data=str(synth_data), preset="scratch", epochs=1, batch_size=8, workers=0)
    out = train(TrainConfig(out=str(tmp_path / "ckpt"), class_names={"tumour": "tumour cells"}, **base))
    assert (out / checkpoint.TEXT_WEIGHTS).is_file()
    _, spec = checkpoint.load_backbone(out)
    assert get_encoder("clip").text_tower.prompts(spec.options, spec.labels)["tumour"] == \
        "a histopathology image of tumour cells"
    assert checkpoint.load_text_tower(out, spec) is not None
    with pytest.raises(HistoseekError, match="class names given for MUC, which the data does not have"):
        train(TrainConfig(out=str(tmp_path / "other"), class_names={"MUC": "mucin"}, **base))
