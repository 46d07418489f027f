"""Retrieval quality of every encoder under one training budget, in one run.

    python -m benchmarks.encoder_quality --data ../shared/data/crc5-dev --epochs 4

Each encoder's `cpu` preset fine-tunes its ImageNet start for the same number of epochs on
`<data>/train` (the same images seen; a budget that, unlike minutes, does not depend on
what else the machine runs, so the scores are reproducible with the seed), is evaluated
with `<data>/test` as queries against `<data>/train` as database (mMV@5, P@5, mAP@5, and
the spread of similarities: a collapsed model shows there), and exported to ONNX (size
on disk; a collapsed model is refused and marked). Beside them, the rows a reader needs
to judge them on the same split: the colour-histogram floor and each frozen ImageNet
backbone the presets start from (pooled features, no training). Writes
`encoder_quality.json`, `.md` and `.png` under --results; a row already measured in
--workdir is not measured again, so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from benchmarks.colour_histogram import colour_histogram_metrics
from benchmarks.frozen_backbone import frozen_backbone
from benchmarks.results_files import figure, write_results
from export.export_checkpoint import export_checkpoint
from histoseek.dataset import read_dataset
from histoseek.errors import HistoseekError
from training.encoders.registry import get_encoder, list_encoders
from training.evaluate import evaluate_backbone, evaluate_checkpoint
from training.train import TrainConfig, train

log = logging.getLogger("benchmarks.encoder_quality")
KS = [1, 5, 10]
COLUMNS = ("mMV@5", "P@5", "mAP@5")


def measure_encoder(name: str, data: Path, workdir: Path, epochs: int, seed: int) -> dict:
    result_file = workdir / f"{name}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    ckpt = workdir / name
    if not (ckpt / "weights.safetensors").is_file():  # a finished training is not repeated
        train(TrainConfig(encoder=name, data=str(data / "train"), out=str(ckpt), preset="cpu", epochs=epochs,
                          seed=seed))
    config = json.loads((ckpt / "train_config.json").read_text())
    evaluation = evaluate_checkpoint(ckpt, data / "train", data / "test", KS)
    try:
        version = export_checkpoint(ckpt, workdir / "model_repository")
        onnx_mb = round((version / "model.onnx").stat().st_size / 2**20, 2)
    except HistoseekError as exc:  # a collapsed model: measured, marked, never exported
        log.warning("%s not exported: %s", name, exc)
        onnx_mb = None
    spec = json.loads((ckpt / "encoder.json").read_text())
    result = {
        "encoder": name, "metrics": evaluation["metrics"], "train_minutes": config["minutes"],
        "steps": config["steps"], "embedding_dim": spec["embedding_dim"], "input_size": spec["input_size"],
        "backbone": spec["backbone"], "start": spec["weights_origin"].get("source", "random"),
        "similarity_spread": evaluation["similarity_spread"], "onnx_mb": onnx_mb,
    }
    result_file.write_text(json.dumps(result, indent=2))
    return result


def measure_frozen(architecture: str, input_size: int, data: Path, workdir: Path) -> dict:
    """A frozen ImageNet backbone (globally pooled features, no training) on the same split."""
    result_file = workdir / f"frozen-{architecture}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    trunk, spec = frozen_backbone(architecture, input_size)
    evaluation = evaluate_backbone(trunk, spec, data / "train", data / "test", KS)
    result = {"architecture": architecture, "input_size": input_size, "embedding_dim": spec.embedding_dim,
              "metrics": evaluation["metrics"], "similarity_spread": evaluation["similarity_spread"]}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def markdown_table(rows: list[dict], frozen: dict[str, dict], floor: dict) -> str:
    lines = ["| encoder | backbone, start | mMV@5 | P@5 | mAP@5 | mMV@5 vs its frozen backbone | similarity p5 / median "
             "| training min | steps | embedding | ONNX MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, s = r["metrics"], r["similarity_spread"]
        base = frozen.get(r["backbone"])
        delta = f"{m['mMV@5'] - base['metrics']['mMV@5']:+.3f}" if base else "–"
        onnx = f"{r['onnx_mb']:.1f}" if r["onnx_mb"] is not None else "refused: collapsed"
        lines.append(f"| `{r['encoder']}` | {r['backbone']} @ {r['input_size']} px, {r['start']} | {m['mMV@5']:.3f} | "
                     f"{m['P@5']:.3f} | {m['mAP@5']:.3f} | {delta} | {s['p05']:.2f} / {s['median']:.2f} | "
                     f"{r['train_minutes']:.1f} | {r['steps']} | {r['embedding_dim']} | {onnx} |")
    for f in frozen.values():
        m, s = f["metrics"], f["similarity_spread"]
        lines.append(f"| frozen ImageNet backbone (no training) | {f['architecture']} @ {f['input_size']} px | "
                     f"{m['mMV@5']:.3f} | {m['P@5']:.3f} | {m['mAP@5']:.3f} | – | {s['p05']:.2f} / {s['median']:.2f} "
                     f"| – | – | {f['embedding_dim']} | – |")
    lines.append(f"| colour histogram (floor) | 8x8x8 RGB | {floor['mMV@5']:.3f} | {floor['P@5']:.3f} | "
                 f"{floor['mAP@5']:.3f} | – | – | – | – | 512 | – |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], frozen: dict[str, dict], floor: dict, path: Path, title: str) -> None:
    import numpy as np

    names = [r["encoder"] for r in rows]
    x = np.arange(len(names))
    with figure(path, figsize=(9, 4), dpi=120) as ax:
        for offset, column in zip((-0.27, 0, 0.27), COLUMNS):
            ax.bar(x + offset, [r["metrics"][column] for r in rows], width=0.27, label=column)
        ax.axhline(floor["mMV@5"], color="black", linestyle="--", linewidth=1, label="colour histogram mMV@5")
        for f in frozen.values():
            ax.axhline(f["metrics"]["mMV@5"], color="grey", linestyle=":", linewidth=1.5,
                       label=f"frozen {f['architecture']} mMV@5")
        ax.set_xticks(x, names)
        ax.set_ylim(0, 1)
        ax.set_ylabel("score")
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=8, ncol=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder with train/ and test/ dataset folders")
    parser.add_argument("--epochs", type=int, default=4, help="training budget per encoder")
    parser.add_argument("--encoders", nargs="*", help="default: every registered encoder")
    parser.add_argument("--workdir", type=Path, default=Path("runs/encoder_quality"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    names = args.encoders or [e.name for e in list_encoders()]

    started = time.monotonic()
    floor = colour_histogram_metrics(read_dataset(args.data / "train"), read_dataset(args.data / "test"), KS)
    frozen = {}
    for name in names:
        preset = get_encoder(name).preset("cpu")
        if preset.init == "imagenet" and preset.backbone not in frozen:
            frozen[preset.backbone] = measure_frozen(preset.backbone, preset.input_size, args.data, args.workdir)
            log.info("frozen %s: mMV@5 %.3f", preset.backbone, frozen[preset.backbone]["metrics"]["mMV@5"])
    rows = []
    for i, name in enumerate(names, 1):
        log.info("[%d/%d] %s: %d epochs of training", i, len(names), name, args.epochs)
        rows.append(measure_encoder(name, args.data, args.workdir, args.epochs, args.seed))
        log.info("[%d/%d] %s: mMV@5 %.3f (%.1f min elapsed)", i, len(names), name, rows[-1]["metrics"]["mMV@5"],
                 (time.monotonic() - started) / 60)
    report = {"data": str(args.data), "budget_epochs": args.epochs, "colour_histogram": floor,
              "frozen_backbones": list(frozen.values()), "encoders": rows}
    table = markdown_table(rows, frozen, floor)
    title = f"{args.data.name}: test vs train, cpu presets fine-tuned {args.epochs} epochs each"
    write_results(args.results / "encoder_quality", report, table,
                  lambda path: plot(rows, frozen, floor, path, title))
    print(table)


if __name__ == "__main__":
    main()
