"""The pretrained encoders that need no training, registered from their table
(training/foundation_table.py: one entry per published model).

Each entry becomes an encoder with a single preset, `pretrained`: its backbone is the
published architecture (training/foundation_models.py), its `--init` loader reads the
published weights file strictly (training/foundation_weights.py), and training it is
refused, since it needs none.
"""
from __future__ import annotations

from histoseek.errors import HistoseekError
from training import foundation_models, foundation_weights
from training.encoders.registry import Encoder, Preset, register
from training.foundation_table import MODELS, PRESET, FoundationModel


def _no_training(name: str):
    def refuse(*_args, **_kwargs):
        raise HistoseekError(f"{name} is a pretrained encoder and needs no training: write its checkpoint and "
                             f"export it with `histoseek export --encoder {name} --weights FILE --verify-data DIR`")
    return refuse


def register_model(model: FoundationModel) -> None:
    """Register `model` as an encoder (the table's entries at import; tests add variants)."""
    preset = Preset(backbone=model.architecture, input_size=model.input_size, embedding_dim=model.embedding_dim,
                    batch_size=0, epochs=0, lr=0.0, mean=model.mean, std=model.std, init=None)
    register(Encoder(
        name=model.name, method=f"pretrained: {model.title}", presets={PRESET: preset},
        build_backbone=lambda _preset, model=model: foundation_models.build(model),
        build_method=_no_training(model.name), train_transform=_no_training(model.name),
        load_init=lambda backbone, path, model=model: foundation_weights.load_file_into(model, backbone.model, path),
        pretrained=model,
    ))


for _model in MODELS:
    register_model(_model)
