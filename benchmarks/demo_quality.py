"""What a new user's first searches get: the quickstart's model on the demo collection.

    python -m benchmarks.demo_quality [--encoder dml] [--train-minutes 2]

Trains exactly as `histoseek quickstart` does (the encoder's `cpu` preset from its ImageNet
start, on `demo/collection/kather2016` for the same minutes), then scores leave-one-out
retrieval over the 240 tiles (mMV@5, P@5, mAP@5; every tile queries the other 239) beside
the colour histogram and the frozen ImageNet backbone, and the similarities a user sees:
the spread of pairwise similarities and the first and fifth result's similarity. The
model is fitted to these very tiles (`dml` with their labels), so this is what the demo
shows, not how the encoder generalises: that is what `benchmarks/encoder_quality.py`
measures (test queried against train). Writes `demo_quality.json`, `.md` and `.png`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from benchmarks.colour_histogram import colour_histogram_metrics
from benchmarks.frozen_backbone import frozen_backbone
from benchmarks.machine import project_relative
from benchmarks.results_files import figure, write_results
from training.contract import ContractModel
from histoseek.collapse import similarity_spread
from histoseek.dataset import read_dataset
from histoseek.metrics import embedding_retrieval_metrics
from training import checkpoint
from training.encoders.registry import EncoderSpec, get_encoder
from training.evaluate import embed_dataset
from training.recipes import DEMO_COLLECTION, QUICKSTART_EPOCHS, QUICKSTART_MIN_STEPS, QUICKSTART_MINUTES
from training.train import TrainConfig, train

log = logging.getLogger("benchmarks.demo_quality")
KS = [1, 5, 10]


def result_similarities(embeddings: np.ndarray) -> dict[str, float]:
    """Mean similarity of the first and the fifth result, over every tile as a query."""
    sims = embeddings @ embeddings.T
    np.fill_diagonal(sims, -np.inf)
    top = -np.sort(-sims, axis=1)[:, :5]
    return {"top1_mean": round(float(top[:, 0].mean()), 4), "top5_mean": round(float(top[:, 4].mean()), 4)}


def row(name: str, model: torch.nn.Module, spec: EncoderSpec, dataset) -> tuple[dict, np.ndarray]:
    embeddings = embed_dataset(ContractModel(model, spec).eval(), dataset, spec.input_size)
    metrics = embedding_retrieval_metrics(dataset, embeddings, dataset, embeddings, KS)
    return {"model": name, "metrics": metrics, "similarity_spread": similarity_spread(embeddings),
            **result_similarities(embeddings)}, embeddings


def markdown(report: dict) -> str:
    lines = ["| model | mMV@5 | P@5 | mAP@5 | 1st result similarity (mean) | 5th result similarity (mean) | "
             "pairwise similarity p5 / median / p95 |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        m, s = r["metrics"], r.get("similarity_spread")
        sims = (f"{r['top1_mean']:.2f} | {r['top5_mean']:.2f} | {s['p05']:.2f} / {s['median']:.2f} / {s['p95']:.2f}"
                if s else "– | – | –")
        lines.append(f"| {r['model']} | {m['mMV@5']:.3f} | {m['P@5']:.3f} | {m['mAP@5']:.3f} | {sims} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, pairwise: dict[str, np.ndarray], path: Path) -> None:
    with figure(path, 1, 2, figsize=(11, 4), dpi=120) as (left, right):
        names = [r["model"] for r in report["rows"]]
        left.bar(range(len(names)), [r["metrics"]["mMV@5"] for r in report["rows"]], color="tab:pink")
        left.set_xticks(range(len(names)), names, fontsize=7, rotation=10)
        left.set(ylim=(0, 1), ylabel="leave-one-out mMV@5", title="demo collection (240 tiles, 8 classes)")
        for name, values in pairwise.items():
            right.hist(values, bins=60, range=(-0.2, 1), alpha=0.5, label=name, density=True)
        right.set(xlabel="cosine similarity of two tiles", ylabel="density", title="how alike tiles look")
        right.legend(fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="dml")
    parser.add_argument("--train-minutes", type=float, default=QUICKSTART_MINUTES)
    parser.add_argument("--min-steps", type=int, default=QUICKSTART_MIN_STEPS)
    parser.add_argument("--collection", type=Path, default=DEMO_COLLECTION)
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo_quality"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dataset = read_dataset(args.collection)
    ckpt = args.workdir / args.encoder
    train(TrainConfig(encoder=args.encoder, data=str(args.collection), out=str(ckpt), epochs=QUICKSTART_EPOCHS,
                      max_minutes=args.train_minutes, min_steps=args.min_steps, fresh=True))
    model, spec = checkpoint.load_backbone(ckpt)
    config = checkpoint.read_config(ckpt)
    preset = get_encoder(args.encoder).preset("cpu")
    frozen, frozen_emb = row(f"frozen {preset.backbone} (ImageNet, no training)",
                             *frozen_backbone(preset.backbone, preset.input_size), dataset)
    tuned, tuned_emb = row(f"{args.encoder} fine-tuned {config['minutes']:.1f} min ({config['steps']} steps)",
                           model, spec, dataset)
    colour = {"model": "colour histogram", "metrics": colour_histogram_metrics(dataset, dataset, KS)}
    report = {"collection": project_relative(args.collection), "encoder": args.encoder, "train_minutes": config["minutes"],
              "steps": config["steps"], "rows": [colour, frozen, tuned]}
    upper = np.triu_indices(len(dataset), k=1)
    pairwise = {r["model"]: (e @ e.T)[upper] for r, e in ((frozen, frozen_emb), (tuned, tuned_emb))}
    table = markdown(report)
    write_results(args.results / "demo_quality", report, table, lambda path: plot(report, pairwise, path))
    print(table)


if __name__ == "__main__":
    main()
