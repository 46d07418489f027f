"""`histoseek train`: one training loop for every registered encoder.

The loop is generic; what differs between methods lives in the encoder's file (views,
heads, loss, momentum updates). Augmentations are seeded per (seed, epoch, sample), so a
run is reproducible and a resumed run continues exactly where it stopped. With
`--max-minutes` the schedules (learning rate, momentum, temperatures) follow the clock,
so a time budget still gets a whole schedule; such a run is not bit-reproducible.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset, Sampler
from tqdm import tqdm

from histoseek.dataset import Dataset, read_split
from histoseek.errors import HistoseekError
from histoseek.imaging import load_image
from training import checkpoint
from training.encoders.registry import get_encoder

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    encoder: str
    data: str
    out: str
    preset: str = "cpu"
    epochs: int | None = None  # default: the preset's
    max_minutes: float | None = None
    batch_size: int | None = None  # default: the preset's
    init: str | None = None
    split: str | None = None  # train on one split of a prepared dataset
    seed: int = 0
    workers: int = 2
    fresh: bool = False  # ignore an existing resume state
    bits: int | None = None  # code length, for encoders that quantize (spq)


class EpochSampler(Sampler):
    """A seeded permutation per epoch, started at `start`; yields (epoch, index) pairs."""

    def __init__(self, size: int, seed: int, epoch: int, start: int = 0) -> None:
        self.size, self.seed, self.epoch, self.start = size, seed, epoch, start

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        return iter((self.epoch, int(i)) for i in order[self.start :])

    def __len__(self) -> int:
        return self.size - self.start


class ViewDataset(TorchDataset):
    def __init__(self, dataset: Dataset, transform: Callable, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self.label_index = {label: i for i, label in enumerate(dataset.labels)}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        item = self.dataset.items[index]
        # Per-sample seeding makes augmentations independent of workers and resumption.
        sample_seed = (self.seed * 1_000_003 + epoch * 7_919 + index) % 2**31
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        torch.manual_seed(sample_seed)
        try:
            image = load_image(self.dataset.absolute(item))
        except HistoseekError as exc:
            log.warning("skipping unreadable training image: %s", exc)
            return None
        return self.transform(image), self.label_index[item.label]


def _collate(batch):
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    views = [torch.stack([b[0][v] for b in batch]) for v in range(len(batch[0][0]))]
    return views, torch.tensor([b[1] for b in batch])


def _lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up then cosine decay to 1% of the base rate."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    t = (progress - warmup) / max(1e-8, 1 - warmup)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _require_labels(name: str, data: str, dataset: Dataset) -> None:
    unlabelled = [item.path for item in dataset.items if not item.label.strip()]
    if unlabelled:
        raise HistoseekError(
            f"encoder {name!r} learns from labels, but {len(unlabelled)} images in {data} have none "
            f"(e.g. {unlabelled[0]}); give every image a class (folder per class, or the manifest's label "
            "column) or choose a self-supervised encoder (`histoseek encoders`)")
    if len(dataset.labels) < 2:
        raise HistoseekError(f"encoder {name!r} learns from labels; {data} has fewer than two classes "
                             f"({', '.join(dataset.labels) or 'none'})")


def train(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> Path:
    """Train and write the checkpoint folder; `on_step(step)` is a hook called after each step."""
    encoder = get_encoder(cfg.encoder)
    options = {"bits": cfg.bits} if cfg.bits is not None else None
    preset = encoder.preset(cfg.preset, options)
    out = Path(cfg.out)
    dataset = read_split(cfg.data, cfg.split)
    if encoder.needs_labels:
        _require_labels(cfg.encoder, cfg.data, dataset)
    epochs = cfg.epochs or preset.epochs
    batch_size = min(cfg.batch_size or preset.batch_size, len(dataset))
    steps_per_epoch = len(dataset) // batch_size  # drop_last: losses need full batches
    total_steps = epochs * steps_per_epoch
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None

    torch.manual_seed(cfg.seed)
    backbone = encoder.build_backbone(preset)
    if cfg.init:
        encoder.load_init(backbone, Path(cfg.init))
    method = encoder.build_method(backbone, preset, tuple(dataset.labels))
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=preset.lr, weight_decay=preset.weight_decay)

    state = None if cfg.fresh else checkpoint.load_resume_state(out)
    step, elapsed = 0, 0.0
    if state is not None:
        if [state["config"].get(k) for k in ("encoder", "preset", "bits")] != [cfg.encoder, cfg.preset, cfg.bits]:
            bits = f" ({state['config']['bits']} bits)" if state["config"].get("bits") else ""
            raise HistoseekError(f"{out} holds a {state['config']['encoder']}/{state['config']['preset']}{bits} run; "
                                 "choose another --out or pass --fresh")
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        log.info("resuming %s at step %d/%d (%.1f min done)", out, step, total_steps, elapsed / 60)

    spec = encoder.spec(cfg.preset, labels=tuple(dataset.labels) if encoder.needs_labels else (), options=options)
    views_dataset = ViewDataset(dataset, encoder.train_transform(preset), cfg.seed)
    wd_end = preset.options.get("weight_decay_end", preset.weight_decay)
    warmup = preset.warmup_epochs / epochs
    losses: list[float] = []
    started = time.monotonic() - elapsed

    def progress() -> float:
        done = step / total_steps
        return min(1.0, max(done, (time.monotonic() - started) / budget_s)) if budget_s else done

    def save_state() -> None:
        checkpoint.save_resume_state(out, {
            "config": asdict(cfg), "method": method.state_dict(), "optimizer": optimizer.state_dict(),
            "step": step, "elapsed": time.monotonic() - started,
        })

    method.train()
    try:
        while progress() < 1.0:
            epoch, start = divmod(step, steps_per_epoch)
            loader = DataLoader(
                views_dataset, batch_size=batch_size, drop_last=True, collate_fn=_collate,
                sampler=EpochSampler(len(dataset), cfg.seed, epoch, start * batch_size),
                num_workers=cfg.workers, persistent_workers=False,
            )
            bar = tqdm(loader, desc=f"{cfg.encoder} epoch {epoch + 1}/{epochs}", unit="batch", leave=False)
            for batch in bar:
                if batch is None:
                    continue
                views, labels = batch
                tick = time.monotonic()
                p = progress()
                for group in optimizer.param_groups:
                    group["lr"] = preset.lr * _lr_factor(p, warmup)
                    group["weight_decay"] = wd_end + (preset.weight_decay - wd_end) * 0.5 * (1 + math.cos(math.pi * p))
                loss = method.loss(views, labels)
                if not torch.isfinite(loss):
                    raise HistoseekError(f"training diverged at step {step} (loss {loss.item()}); lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                method.after_step(progress())
                losses.append(loss.item())
                rate = len(labels) / max(time.monotonic() - tick, 1e-6)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{rate:.1f}", step=f"{step}/{total_steps}")
                if on_step:
                    on_step(step)
                if progress() >= 1.0:
                    break
            save_state()
            recent = losses[-steps_per_epoch:]
            log.info("epoch %d: loss %.4f, %d steps, %.1f min", epoch + 1, float(np.mean(recent)) if recent else float("nan"),
                     step, (time.monotonic() - started) / 60)
    except KeyboardInterrupt:
        save_state()
        log.warning("interrupted at step %d: state saved, rerun the same command to resume", step)
        raise

    minutes = (time.monotonic() - started) / 60
    config = {
        "train": asdict(cfg), "preset": asdict(preset), "steps": step, "epochs_planned": epochs,
        "minutes": round(minutes, 2), "final_loss": float(np.mean(losses[-10:])) if losses else None,
        "images": len(dataset), "data": str(Path(cfg.data).resolve()),
    }
    checkpoint.save_backbone(out, method.backbone, spec, config)
    log.info("wrote %s (%d steps in %.1f min)", out, step, minutes)
    return out
