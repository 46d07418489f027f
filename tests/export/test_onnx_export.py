"""Export by the contract, verified against PyTorch on tiles decoded by the client path."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.export_checkpoint import export_checkpoint
from export.onnx_export import export_onnx
from training.contract import ContractModel
from export.verify import verify_onnx
from histoseek.dataset import sample_images
from histoseek.errors import HistoseekError
from training.encoders.registry import get_encoder, list_encoders


@pytest.fixture(scope="module")
def images(synth_data):
    return sample_images(synth_data, 64, count=6)


@pytest.mark.parametrize("name", [e.name for e in list_encoders()])
def test_export_follows_the_contract_and_matches_pytorch(name, tmp_path, synth_data):
    encoder = get_encoder(name)
    preset = encoder.preset("cpu")
    spec = encoder.spec("cpu")
    backbone = encoder.build_backbone(preset).eval()
    path = export_onnx(backbone, spec, tmp_path / "model.onnx")
    graph = onnx.load(str(path))
    (inp,) = graph.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == [spec.input_size, spec.input_size, 3]
    assert inp.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    tiles = sample_images(synth_data, spec.input_size, count=5)
    diff, embeddings = verify_onnx(backbone, spec, path, tiles)
    assert diff < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        out = session.run(None, {"images": tiles[:batch]})[0]
        assert out.shape == (batch, spec.embedding_dim) and out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embeddings, session.run(None, {"images": tiles})[0], atol=1e-6)


def test_fp16_export_keeps_uint8_in_float32_out(tmp_path, images):
    encoder = get_encoder("dino")
    spec = encoder.spec("scratch")
    backbone = encoder.build_backbone(encoder.preset("scratch")).eval()
    path = export_onnx(backbone, spec, tmp_path / "model16.onnx", fp16=True)
    graph = onnx.load(str(path))
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    assert verify_onnx(backbone, spec, path, images, fp16=True)[0] < 2e-2


def test_verification_rejects_a_model_that_disagrees(tmp_path, images):
    encoder = get_encoder("dino")
    spec = encoder.spec("scratch")
    backbone = encoder.build_backbone(encoder.preset("scratch")).eval()
    path = export_onnx(backbone, spec, tmp_path / "model.onnx")
    other = encoder.build_backbone(encoder.preset("scratch")).eval()  # different random weights
    with pytest.raises(HistoseekError, match="disagrees with PyTorch"):
        verify_onnx(other, spec, path, images)


def test_export_checkpoint_writes_numbered_versions(tmp_path, synth_data):
    from training.train import TrainConfig, train

    ckpt = train(TrainConfig(encoder="dino", data=str(synth_data), out=str(tmp_path / "ckpt"), preset="scratch",
                             epochs=1, batch_size=12, workers=0))
    repo = tmp_path / "repo"
    # Two steps of a scratch ViT embed every tile alike: the collapse check would refuse it.
    first = export_checkpoint(ckpt, repo, force=True)
    second = export_checkpoint(ckpt, repo, force=True)
    assert (first.name, second.name) == ("1", "2")
    assert (repo / "dino" / "config.pbtxt").is_file()
    assert (second / "model.onnx").is_file() and (second / "model.py").is_file()


def test_export_of_a_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(HistoseekError, match="histoseek train"):
        export_checkpoint(tmp_path / "nothing", tmp_path / "repo")


def test_contract_model_normalises_inside_the_graph():
    encoder = get_encoder("dino")
    spec = encoder.spec("scratch")
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.flatten(1)

    ContractModel(Probe(), spec)(torch.full((1, 2, 2, 3), 255, dtype=torch.uint8))
    expected = (1.0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert torch.allclose(seen["x"][0, :, 0, 0], expected, atol=1e-5)
