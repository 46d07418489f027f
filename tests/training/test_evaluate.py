"""PyTorch-side evaluation: group exclusion, splits, and agreement with the exported model."""
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.onnx_export import export_onnx
from histoseek.dataset import DatasetItem, read_dataset, write_manifest
from histoseek.errors import HistoseekError
from histoseek.imaging import load_model_input
from training import checkpoint
from training.encoders.registry import get_encoder
from training.evaluate import evaluate_checkpoint


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    encoder = get_encoder("dino")
    torch.manual_seed(0)
    backbone = encoder.build_backbone(encoder.preset("scratch")).eval()
    out = tmp_path_factory.mktemp("ckpt")
    checkpoint.save_backbone(out, backbone, encoder.spec("scratch"), {"data": None})
    return out


def test_results_of_the_query_group_are_excluded(tmp_path, synth_data, random_checkpoint):
    # Two tissue images, each saved twice in its own group: the exact copy is the
    # nearest neighbour, but it shares the query's group, so it must never be counted.
    source = read_dataset(synth_data)
    picks = [next(i for i in source.items if i.label == label) for label in source.labels[:2]]
    items = []
    for n, item in enumerate(picks):
        for copy in ("a", "b"):
            name = f"{item.label}/{n}{copy}.png"
            (tmp_path / item.label).mkdir(exist_ok=True)
            shutil.copy(source.absolute(item), tmp_path / name)
            items.append(DatasetItem(path=name, label=item.label, group=f"slide{n}", split="train"))
    write_manifest(tmp_path, items)
    result = evaluate_checkpoint(random_checkpoint, tmp_path, None, [1])
    assert result["metrics"]["P@1"] == 0.0  # only the other class is left to retrieve
    assert result["queries"] == "leave-one-out"


def test_splits_and_their_errors(tmp_path, random_checkpoint):
    from training.data.synthetic import synthesize

    synth_data = tmp_path / "split"
    synthesize(synth_data, classes=2, per_class=15, size=64, seed=2)  # 3 groups a class: one for test
    result = evaluate_checkpoint(random_checkpoint, synth_data, None, [1, 3],
                                 database_split="train", queries_split="test")
    metrics = result["metrics"]
    assert metrics["queries"] == len(read_dataset(synth_data).subset("test")) == 10
    for key in ("P@1", "mAP@3", "mMV@3"):
        assert 0.0 <= metrics[key] <= 1.0
    with pytest.raises(HistoseekError, match="its splits are"):
        evaluate_checkpoint(random_checkpoint, synth_data, None, [1], database_split="val")


def test_evaluation_embeds_like_the_exported_model(tmp_path, synth_data, random_checkpoint):
    from training.evaluate import embed_dataset
    from training.contract import ContractModel

    backbone, spec = checkpoint.load_backbone(random_checkpoint)
    dataset = read_dataset(synth_data)
    torch_emb = embed_dataset(ContractModel(backbone, spec).eval(), dataset, spec.input_size, workers=0)
    session = ort.InferenceSession(str(export_onnx(backbone, spec, tmp_path / "m.onnx")))
    tiles = np.stack([load_model_input(dataset.absolute(i), spec.input_size) for i in dataset.items])
    np.testing.assert_allclose(session.run(None, {"images": tiles})[0], torch_emb, atol=1e-5)
