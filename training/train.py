"""`histoseek train`: one training loop for every registered encoder.

The loop is generic; what differs between methods lives in the encoder's file (views,
heads, loss, momentum updates). Augmentations are seeded per (seed, epoch, sample), so a
run is reproducible and a resumed run continues exactly where it stopped. The budget is in
steps (`--steps`, or the preset's epochs); with `--max-minutes` the schedules (learning
rate, momentum, temperatures) follow the clock, so a time budget still gets a whole
schedule (such a run is not bit-reproducible), and `--min-steps` keeps a slow machine from
stopping early: the clock ends training only once that many steps are done, because the
quality depends on the steps (the demo recipe: 55 steps, leave-one-out mMV@5 0.979; the
same two minutes gave a slower machine 28 steps and 0.908). After the first steps the
log says how long the run needs on this machine.
Training starts from the preset's pretrained weights unless `--init` says otherwise
(training/pretrained.py), fine-tunes them as the preset says (training/finetune.py), and
watches a fixed probe set of real tiles for collapse after every epoch.
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

from training.contract import ContractModel
from histoseek.dataset import sample_images
from histoseek import collapse
from histoseek.dataset import Dataset, read_split
from histoseek.errors import HistoseekError
from histoseek.imaging import load_image
from training import checkpoint, finetune, pretrained
from training.encoders.registry import get_encoder
from training.evaluate import embed_dataset

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    encoder: str
    data: str
    out: str
    preset: str = "cpu"
    epochs: int | None = None  # default: the preset's
    steps: int | None = None  # a step budget instead of epochs
    max_minutes: float | None = None
    min_steps: int | None = None  # with max_minutes: the clock stops training only after these
    batch_size: int | None = None  # default: the preset's
    init: str | None = None  # default: the preset's start ("imagenet" for the cpu presets); "none": random
    split: str | None = None  # train on one split of a prepared dataset
    seed: int = 0
    workers: int = 2
    fresh: bool = False  # ignore an existing resume state
    bits: int | None = None  # code length, for encoders that quantize (spq)
    class_names: dict[str, str] | None = None  # words for the class labels in text prompts (clip)


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


def schedule_progress(step: int, total_steps: int, elapsed_s: float, budget_s: float | None,
                      min_steps: int | None) -> float:
    """How far along the schedule is (1.0: done): by steps, or by the clock when there is a
    time budget, the clock never ending it before `min_steps` (the schedule then follows
    whichever of clock and steps is behind)."""
    done = step / total_steps
    if not budget_s:
        return min(1.0, done)
    by_clock = elapsed_s / budget_s
    if min_steps:
        by_clock = min(by_clock, step / min_steps)
    return min(1.0, max(done, by_clock))


ESTIMATE_AFTER_STEPS = 3  # the first step also warms up data loading: the estimate waits for a few steps
DESCRIPTOR_SAMPLE = 16_384


def _announce(step: int, seconds_per_step: float, total_steps: int, budget_s: float | None,
              min_steps: int | None) -> None:
    """Say how long the run needs on this machine, once the first steps are timed."""
    if budget_s and min_steps and min_steps * seconds_per_step > budget_s:
        log.info("%.1f s a step here: the %d steps the recipe needs take about %.1f min, more than the %.1f-min "
                 "budget; training goes on until they are done", seconds_per_step, min_steps,
                 min_steps * seconds_per_step / 60, budget_s / 60)
    elif budget_s:
        log.info("%.1f s a step here: the %.1f-min budget gives about %d steps", seconds_per_step, budget_s / 60,
                 min(total_steps, int(budget_s / seconds_per_step)))
    else:
        log.info("%.1f s a step here: the remaining %d of %d steps take about %.1f min", seconds_per_step,
                 total_steps - step, total_steps, (total_steps - step) * seconds_per_step / 60)


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


def _origin_text(origin: dict) -> str:
    if origin["source"] == "imagenet":
        return f"ImageNet weights of {origin['architecture']} ({origin['package']} {origin['package_version']})"
    if origin["source"] == "file":
        return f"the weights file {origin['file']}"
    if origin["source"] == "timm":
        return f"timm's pretrained {origin['model']}"
    return "random weights"


@torch.no_grad()
def _probe_spread(method: torch.nn.Module, spec, probe: torch.Tensor, preset) -> dict:
    """Similarity spread of the probe tiles through the exported graph (collapse check)."""
    model = ContractModel(method.backbone, spec).eval()
    spread = collapse.similarity_spread(model(probe).numpy())
    finetune.train_mode(method, preset)
    return spread


def _descriptor_sample(dataset: Dataset, seed: int) -> Dataset:
    """At most DESCRIPTOR_SAMPLE of the training tiles, for fits after training: 64 points
    for each of SPQ's 256 codewords per sub-space, and an embedding pass of a few minutes
    on 2 cores however large the collection."""
    if len(dataset) <= DESCRIPTOR_SAMPLE:
        return dataset
    return Dataset(dataset.root, random.Random(seed).sample(dataset.items, DESCRIPTOR_SAMPLE))


def train(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> Path:
    """Train and write the checkpoint folder; `on_step(step)` is a hook called after each step."""
    encoder = get_encoder(cfg.encoder)
    options = {"bits": cfg.bits} if cfg.bits is not None else {}
    if cfg.class_names:
        options["class_names"] = dict(cfg.class_names)
    options = options or None
    preset = encoder.preset(cfg.preset, options)
    out = Path(cfg.out)
    dataset = read_split(cfg.data, cfg.split)
    if encoder.needs_labels:
        _require_labels(cfg.encoder, cfg.data, dataset)
    batch_size = min(cfg.batch_size or preset.batch_size, len(dataset))
    steps_per_epoch = len(dataset) // batch_size  # drop_last: losses need full batches
    if cfg.steps is not None and cfg.steps < 1 or cfg.min_steps is not None and cfg.min_steps < 1:
        raise HistoseekError("--steps and --min-steps must be at least 1")
    if cfg.steps and cfg.epochs:
        raise HistoseekError("give the budget as --steps or as --epochs, not both")
    if cfg.min_steps and not cfg.max_minutes:
        raise HistoseekError("--min-steps bounds a time budget: give --max-minutes too (or --steps alone)")
    total_steps = cfg.steps or (cfg.epochs or preset.epochs) * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    if cfg.min_steps and cfg.min_steps > total_steps:
        raise HistoseekError(f"--min-steps {cfg.min_steps} is more than the run's {total_steps} steps; raise "
                             "--steps or --epochs")
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None

    torch.manual_seed(cfg.seed)
    backbone = encoder.build_backbone(preset)
    origin = pretrained.initialise(encoder, backbone, cfg.init or preset.init)
    log.info("%s/%s starts from %s", cfg.encoder, cfg.preset, _origin_text(origin))
    finetune.freeze_early_stages(encoder.trunk(backbone), preset.frozen_stages)
    method = encoder.build_method(backbone, preset, tuple(dataset.labels))
    optimizer = torch.optim.AdamW(finetune.parameter_groups(method, encoder.trunk(backbone), preset),
                                  weight_decay=preset.weight_decay)

    state = None if cfg.fresh else checkpoint.load_resume_state(out)
    step, elapsed = 0, 0.0
    if state is not None:
        if [state["config"].get(k) for k in ("encoder", "preset", "bits", "class_names")] != \
                [cfg.encoder, cfg.preset, cfg.bits, cfg.class_names]:  # class names change clip's prompts
            bits = f" ({state['config']['bits']} bits)" if state["config"].get("bits") else ""
            raise HistoseekError(f"{out} holds a {state['config']['encoder']}/{state['config']['preset']}{bits} run; "
                                 "choose another --out or pass --fresh")
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        log.info("resuming %s at step %d/%d (%.1f min done)", out, step, total_steps, elapsed / 60)

    spec = encoder.spec(cfg.preset, labels=tuple(dataset.labels) if encoder.needs_labels else (), options=options,
                        weights_origin=origin)
    probe = torch.from_numpy(sample_images(dataset, spec.input_size, count=64))
    spreads: list[dict] = []
    views_dataset = ViewDataset(dataset, encoder.train_transform(preset), cfg.seed)
    wd_end = preset.options.get("weight_decay_end", preset.weight_decay)
    warmup = min(preset.warmup_epochs * steps_per_epoch / total_steps, 0.5)
    losses: list[float] = []
    started = time.monotonic() - elapsed

    def progress() -> float:
        return schedule_progress(step, total_steps, time.monotonic() - started, budget_s, cfg.min_steps)

    timed_from = step  # steps before this one were done by an earlier run (resumed)

    def save_state() -> None:
        checkpoint.save_resume_state(out, {
            "config": asdict(cfg), "method": method.state_dict(), "optimizer": optimizer.state_dict(),
            "step": step, "elapsed": time.monotonic() - started,
        })

    finetune.train_mode(method, preset)
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
                    group["lr"] = group["base_lr"] * _lr_factor(p, warmup)
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
                bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{rate:.1f}", step=f"{step}/{total_steps}",
                                probe_p5=f"{spreads[-1]['p05']:.2f}{' COLLAPSED' if spreads[-1]['collapsed'] else ''}"
                                if spreads else "-")
                if step - timed_from == ESTIMATE_AFTER_STEPS + 1:
                    first_timed = time.monotonic()
                elif step - timed_from == 2 * ESTIMATE_AFTER_STEPS + 1:
                    _announce(step, (time.monotonic() - first_timed) / ESTIMATE_AFTER_STEPS, total_steps, budget_s,
                              cfg.min_steps)
                if on_step:
                    on_step(step)
                if progress() >= 1.0:
                    break
            save_state()
            spreads.append(_probe_spread(method, spec, probe, preset))
            recent = losses[-steps_per_epoch:]
            log.info("epoch %d: loss %.4f, %d steps, %.1f min; probe %s", epoch + 1,
                     float(np.mean(recent)) if recent else float("nan"), step, (time.monotonic() - started) / 60,
                     collapse.describe(spreads[-1]))
            if spreads[-1]["collapsed"]:
                log.warning("the model has collapsed (all probe tiles embed alike); `histoseek export` will refuse "
                            "it: retrain with a lower learning rate, from --init imagenet, or another encoder")
    except KeyboardInterrupt:
        save_state()
        log.warning("interrupted at step %d: state saved, rerun the same command to resume", step)
        raise

    method.after_training(lambda: embed_dataset(ContractModel(method.backbone, spec).eval(),
                                                _descriptor_sample(dataset, cfg.seed), spec.input_size,
                                                workers=cfg.workers))
    minutes = (time.monotonic() - started) / 60
    config = {
        "train": asdict(cfg), "preset": asdict(preset), "steps": step, "epochs_planned": epochs,
        "minutes": round(minutes, 2), "final_loss": float(np.mean(losses[-10:])) if losses else None,
        "images": len(dataset), "data": str(Path(cfg.data).resolve()), "weights_origin": origin,
        "probe_spread": spreads[-1] if spreads else _probe_spread(method, spec, probe, preset),
    }
    checkpoint.save_backbone(out, method.backbone, spec, config, text_tower=method.text_tower())
    log.info("wrote %s (%d steps in %.1f min)", out, step, minutes)
    return out
