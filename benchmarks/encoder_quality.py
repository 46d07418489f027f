"""Retrieval quality of every encoder under one training budget, in one run.

    python -m benchmarks.encoder_quality --data ../shared/data/crc5-dev --epochs 8

Each encoder's `cpu` preset trains for the same number of epochs on `<data>/train` (the
same images seen; a budget that, unlike minutes, does not depend on what else the
machine runs, so the scores are reproducible with the seed), is
evaluated with `<data>/test` as queries against `<data>/train` as database (mMV@5, P@5,
mAP@5), and exported to ONNX (size on disk). The colour-histogram floor is measured on
the same split. Writes `encoder_quality.json`, `.md` and `.png` under --results; an
encoder already measured in --workdir is not trained again, so an interrupted run
continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from benchmarks.colour_histogram import colour_histogram_metrics
from benchmarks.results_files import figure, write_results
from export.export_checkpoint import export_checkpoint
from histoseek.dataset import read_dataset
from training.encoders.registry import list_encoders
from training.evaluate import evaluate_checkpoint
from training.train import TrainConfig, train

log = logging.getLogger("benchmarks.encoder_quality")
KS = [1, 5, 10]
COLUMNS = ("mMV@5", "P@5", "mAP@5")


def measure_encoder(name: str, data: Path, workdir: Path, epochs: int, seed: int) -> dict:
    result_file = workdir / f"{name}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    ckpt = workdir / name
    train(TrainConfig(encoder=name, data=str(data / "train"), out=str(ckpt), preset="cpu", epochs=epochs,
                      seed=seed))
    config = json.loads((ckpt / "train_config.json").read_text())
    metrics = evaluate_checkpoint(ckpt, data / "train", data / "test", KS)["metrics"]
    version = export_checkpoint(ckpt, workdir / "model_repository")
    spec = json.loads((ckpt / "encoder.json").read_text())
    result = {
        "encoder": name, "metrics": metrics, "train_minutes": config["minutes"], "steps": config["steps"],
        "embedding_dim": spec["embedding_dim"], "input_size": spec["input_size"], "backbone": spec["backbone"],
        "onnx_mb": round((version / "model.onnx").stat().st_size / 2**20, 2),
    }
    result_file.write_text(json.dumps(result, indent=2))
    return result


def markdown_table(rows: list[dict], floor: dict) -> str:
    lines = ["| encoder | backbone | mMV@5 | P@5 | mAP@5 | training min | steps | embedding | ONNX MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| `{r['encoder']}` | {r['backbone']} @ {r['input_size']} px | {m['mMV@5']:.3f} | "
                     f"{m['P@5']:.3f} | {m['mAP@5']:.3f} | {r['train_minutes']:.1f} | {r['steps']} | "
                     f"{r['embedding_dim']} | {r['onnx_mb']:.1f} |")
    lines.append(f"| colour histogram (floor) | 8x8x8 RGB | {floor['mMV@5']:.3f} | {floor['P@5']:.3f} | "
                 f"{floor['mAP@5']:.3f} | – | – | 512 | – |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], floor: dict, path: Path, title: str) -> None:
    import numpy as np

    names = [r["encoder"] for r in rows]
    x = np.arange(len(names))
    with figure(path, figsize=(9, 4), dpi=120) as ax:
        for offset, column in zip((-0.27, 0, 0.27), COLUMNS):
            ax.bar(x + offset, [r["metrics"][column] for r in rows], width=0.27, label=column)
        ax.axhline(floor["mMV@5"], color="black", linestyle="--", linewidth=1, label="colour histogram mMV@5")
        ax.set_xticks(x, names)
        ax.set_ylim(0, 1)
        ax.set_ylabel("score")
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=8, ncol=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder with train/ and test/ dataset folders")
    parser.add_argument("--epochs", type=int, default=8, help="training budget per encoder")
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
    rows = []
    for i, name in enumerate(names, 1):
        log.info("[%d/%d] %s: %d epochs of training", i, len(names), name, args.epochs)
        rows.append(measure_encoder(name, args.data, args.workdir, args.epochs, args.seed))
        log.info("[%d/%d] %s: mMV@5 %.3f (%.1f min elapsed)", i, len(names), name, rows[-1]["metrics"]["mMV@5"],
                 (time.monotonic() - started) / 60)
    report = {"data": str(args.data), "budget_epochs": args.epochs, "colour_histogram": floor, "encoders": rows}
    table = markdown_table(rows, floor)
    title = f"{args.data.name}: test vs train, cpu presets, {args.epochs} epochs each"
    write_results(args.results / "encoder_quality", report, table, lambda path: plot(rows, floor, path, title))
    print(table)


if __name__ == "__main__":
    main()
