"""`histoseek export`: checkpoint folder -> verified ONNX -> new model-repository version.

An encoder with a text tower (clip) also gets its text model, `<encoder>_text`, exported
and verified beside the image one (export/text_export.py).

A collapsed model (every tile embeds alike, histoseek/collapse.py) is refused unless
forced: served, it would answer every search with arbitrary tiles at similarity 1.00.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from export.onnx_export import export_onnx
from export.repository import model_checksum, write_model_version
from export.text_export import export_text_tower
from export.triton_config import MAX_QUEUE_DELAY_US
from export.verify import verify_onnx
from histoseek.dataset import sample_images
from histoseek import collapse
from histoseek.errors import HistoseekError
from training import checkpoint
from training.encoders.registry import get_encoder

log = logging.getLogger(__name__)


def export_checkpoint(checkpoint_dir: Path, repo: Path, *, fp16: bool = False, verify_data: Path | None = None,
                      queue_delay_us: int = MAX_QUEUE_DELAY_US, force: bool = False) -> Path:
    """Export, verify on real images (the training data unless `verify_data` is given),
    and write the next version of `repo/<encoder>/`; returns the version folder.
    `force` exports a collapsed model all the same (e.g. to measure latency)."""
    backbone, spec = checkpoint.load_backbone(checkpoint_dir)
    data = verify_data or checkpoint.read_config(checkpoint_dir).get("data")
    if not data or not Path(data).is_dir():
        raise HistoseekError(
            f"no images to verify the export with: the training data {data!r} is gone; pass --verify-data DIR"
        )
    images = sample_images(Path(data), spec.input_size)
    with tempfile.TemporaryDirectory(prefix="histoseek-export-") as tmp:
        onnx_path = export_onnx(backbone, spec, Path(tmp) / "model.onnx", fp16=fp16)
        max_diff, embeddings = verify_onnx(backbone, spec, onnx_path, images, fp16=fp16)
        spread = collapse.similarity_spread(embeddings)
        if spread["collapsed"] and not force:
            raise HistoseekError(
                f"{checkpoint_dir} is collapsed: {collapse.describe(spread)} on {len(images)} tiles of {data}. "
                "Served, it would rank tiles at random. Retrain it (the cpu preset starts from ImageNet weights; "
                "a lower learning rate or another encoder also help) or pass --force to export it anyway")
        spec_dict = spec.to_dict() | {"verify_max_abs_diff": max_diff, "fp16": fp16, "similarity_spread": spread}
        # Arrays the index needs beside the model (SPQ's codebooks), as .npy files.
        extra_files = {}
        for file_name, array in getattr(backbone, "export_arrays", dict)().items():
            np.save(Path(tmp) / file_name, array)
            extra_files[file_name] = Path(tmp) / file_name
        version_dir = write_model_version(Path(repo), spec_dict, onnx_path, fp16=fp16, extra_files=extra_files,
                                          queue_delay_us=queue_delay_us)
    print(f"exported {spec.name} to {version_dir} (ONNX vs PyTorch max abs diff {max_diff:.2e} on {len(images)} images)")
    _export_text(checkpoint_dir, spec, Path(repo), model_checksum(version_dir))
    return version_dir


def _export_text(checkpoint_dir: Path, spec, repo: Path, image_sha256: str) -> Path | None:
    """The text tower beside the image model, for encoders that have one."""
    recipe = get_encoder(spec.name).text_tower
    if recipe is None:
        return None
    tower = checkpoint.load_text_tower(checkpoint_dir, spec)
    if tower is None:
        log.warning("%s has no text_weights.safetensors (trained before text towers were saved): its text tower is "
                    "not exported, so its indexes cannot be searched by text; retrain it to get one", checkpoint_dir)
        return None
    preset = get_encoder(spec.name).preset(spec.preset, spec.options)
    prompts = recipe.prompts(dict(preset.options), spec.labels) if recipe.prompts and spec.labels else {}
    text_dir, diff = export_text_tower(tower, recipe.tokenizer(preset), repo, encoder=spec.name,
                                       embedding_dim=spec.embedding_dim, image_model_sha256=image_sha256,
                                       prompts=prompts)
    print(f"exported {spec.name}'s text tower to {text_dir} (ONNX vs PyTorch max abs diff {diff:.2e} "
          f"on {len(prompts)} prompts and other texts)")
    return text_dir
