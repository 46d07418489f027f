"""SPQ: self-supervised product quantization (Jang & Cho, ICCV 2021, arXiv:2109.02244).

A CNN descriptor of D dimensions is split into M sub-vectors; each sub-space has a
codebook of K codewords. Soft quantization replaces a sub-vector by the softmax-weighted
mix of its codewords, weighted by scaled cosine similarity; cross quantized contrastive
learning (CQC) contrasts one view's descriptor with the other view's soft-quantized
descriptor and the other way round, so descriptor and codebooks learn together and the
database can be stored as the codes SPQ learned (faiss.IndexPQ, asymmetric distance).
After the last step the codebooks are finished by spherical k-means on the training
set's descriptors, started from the learnt codewords (`refine_codebooks`).

K is 256 (one byte per sub-space, FAISS's fast path), so `--bits` (16, 32, 64) sets
M = bits / 8. The exported descriptor has every sub-vector L2-normalised and scaled by
1/sqrt(M): it stays unit-norm like every encoder's output, and its inner product with a
quantized item is the mean of the M sub-space cosine similarities. The codebooks live in
the backbone (unused by its forward, so absent from the ONNX graph) and are written as
`codebooks.npy` beside the exported model.
"""
from __future__ import annotations

import logging
import math

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from torch import nn

from histoseek.errors import HistoseekError
from training.backbones import LITE0_FINETUNE, cnn, load_cnn_init
from training.encoders.registry import Encoder, Preset, TrainingMethod, register
from training.transforms import preset_two_views

log = logging.getLogger(__name__)
CODEWORDS = 256
BITS = (16, 32, 64)

PRESETS = {
    # ImageNet EfficientNet-Lite0 fine-tuned; SPQ's descriptor layer and codebooks are new
    # and learn at the heads' rate.
    "cpu": Preset(**LITE0_FINETUNE | dict(embedding_dim=128, weight_decay=1e-5),
                  options=dict(bits=32, tau_q=5.0, tau_cqc=0.5, crop_scale=[0.4, 1.0], hed_strength=0.05,
                               color_jitter=0.1)),
    # ResNet-18 on 64-px tiles from random weights.
    "scratch": Preset(backbone="resnet18", input_size=64, embedding_dim=128, batch_size=64, epochs=30, lr=1e-3,
                  weight_decay=1e-5, warmup_epochs=2,
                  options=dict(bits=32, tau_q=5.0, tau_cqc=0.5, hed_strength=0.05, color_jitter=0.2)),
    # The authors' settings (tau_q 5, tau_cqc 0.5) on a ResNet-50.
    "paper": Preset(backbone="resnet50", input_size=224, embedding_dim=256, batch_size=256, epochs=100, lr=1e-3,
                    weight_decay=1e-5, warmup_epochs=5,
                    options=dict(bits=32, tau_q=5.0, tau_cqc=0.5, hed_strength=0.05, color_jitter=0.2)),
}


def books(preset: Preset) -> int:
    bits = int(preset.options["bits"])
    if bits not in BITS:
        raise HistoseekError(f"spq supports --bits {', '.join(map(str, BITS))}, not {bits}")
    m = bits // int(math.log2(CODEWORDS))
    if preset.embedding_dim % m:
        raise HistoseekError(f"the descriptor's {preset.embedding_dim} dimensions do not split into {m} sub-vectors")
    return m


class SPQNet(nn.Module):
    """ResNet trunk and linear layer to the descriptor; holds the M codebooks [M, K, D/M]."""

    def __init__(self, preset: Preset) -> None:
        super().__init__()
        self.trunk = cnn(preset.backbone)
        self.descriptor = nn.Linear(self.trunk.num_features, preset.embedding_dim)
        m = books(preset)
        self.codebooks = nn.Parameter(torch.randn(m, CODEWORDS, preset.embedding_dim // m))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.descriptor(self.trunk(images))

    def normalise_output(self, x: torch.Tensor) -> torch.Tensor:
        """The exported descriptor: unit sub-vectors scaled by 1/sqrt(M), unit-norm overall."""
        m = self.codebooks.shape[0]
        return split_normalised(x, m).flatten(1) / math.sqrt(m)

    def export_arrays(self) -> dict[str, np.ndarray]:
        """Unit-norm codewords `[M, K, D/M]`, for the index's product quantizer."""
        return {"codebooks.npy": F.normalize(self.codebooks.detach(), dim=-1).numpy().astype(np.float32)}


def split_normalised(x: torch.Tensor, m: int) -> torch.Tensor:
    """`[N, D]` -> `[N, M, D/M]` with every sub-vector L2-normalised."""
    return F.normalize(x.unflatten(1, (m, -1)), dim=-1)  # no batch size: it stays dynamic in ONNX


def soft_quantize(sub: torch.Tensor, codebooks: torch.Tensor, tau_q: float) -> torch.Tensor:
    """Each unit sub-vector of `sub` `[N, M, d]` replaced by its codewords weighted by
    softmax(tau_q * cosine); `[N, D]`."""
    words = F.normalize(codebooks, dim=-1)  # [M, K, d]
    weights = torch.softmax(tau_q * torch.einsum("nmd,mkd->nmk", sub, words), dim=-1)
    return torch.einsum("nmk,mkd->nmd", weights, words).flatten(1)


class SPQMethod(TrainingMethod):
    def __init__(self, backbone: SPQNet, preset: Preset) -> None:
        super().__init__()
        self.backbone = backbone
        self.tau_q = preset.options["tau_q"]
        self.criterion = NTXentLoss(temperature=preset.options["tau_cqc"])

    def cross_quantized_loss(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        codebooks = self.backbone.codebooks
        sa, sb = (split_normalised(x, codebooks.shape[0]) for x in (xa, xb))
        za, zb = soft_quantize(sa, codebooks, self.tau_q), soft_quantize(sb, codebooks, self.tau_q)
        # NT-Xent compares by cosine, so the 1/sqrt(M) scale of the export does not matter here.
        return 0.5 * (self.criterion(sa.flatten(1), zb) + self.criterion(sb.flatten(1), za))

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        xa, xb = self.backbone(torch.cat(views[:2])).chunk(2)
        return self.cross_quantized_loss(xa, xb)

    def after_training(self, descriptors) -> None:
        refine_codebooks(self.backbone.codebooks, descriptors())


def refine_codebooks(codebooks: nn.Parameter, descriptors: np.ndarray, iterations: int = 20) -> None:
    """Lloyd iterations of spherical k-means on the training descriptors, from the learnt
    codewords, in each sub-space. Soft quantization trains codewords by their softmax
    share, so some end far from every sub-vector (dead) and the rest off their clusters'
    centres; on crc5-dev the codes straight from training fell behind k-means PQ fitted
    to the same descriptor (benchmarks/compact_codes.py). Refining keeps the
    learnt codebooks as the start and hard assignment, the way the index uses them;
    FAISS re-seeds empty clusters by splitting large ones."""
    m, k, d = codebooks.shape
    if len(descriptors) < k:
        log.warning("spq: %d training tiles are fewer than the %d codewords of a sub-space; the codebooks stay "
                    "as trained", len(descriptors), k)
        return
    sub = descriptors.reshape(len(descriptors), m, d) * math.sqrt(m)  # unit sub-vectors again
    refined = []
    for i in range(m):
        kmeans = faiss.Kmeans(d, k, niter=iterations, spherical=True, seed=i, verbose=False)
        kmeans.cp.min_points_per_centroid = 1  # a small collection is still fitted, as PQ-after is
        start = F.normalize(codebooks.detach()[i], dim=-1).numpy().astype(np.float32)
        kmeans.train(np.ascontiguousarray(sub[:, i]), init_centroids=start)
        refined.append(torch.from_numpy(kmeans.centroids.copy()))
    with torch.no_grad():
        codebooks.copy_(torch.stack(refined))


def load_init(backbone: SPQNet, path) -> None:
    # Pretrained files hold the plain ResNet; descriptor layer and codebooks start fresh.
    load_cnn_init(backbone.trunk, path)


register(Encoder(
    name="spq", method="SPQ self-supervised product quantization (Jang & Cho 2021)", presets=PRESETS,
    build_backbone=SPQNet, build_method=lambda backbone, preset, labels: SPQMethod(backbone, preset),
    train_transform=preset_two_views, load_init=load_init, output_kind="pq_descriptor",
    trunk=lambda backbone: backbone.trunk,
))
