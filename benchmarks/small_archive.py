"""Small archives without labels: fine-tuning on the collection itself, its labels hidden.

    python -m benchmarks.small_archive [--encoders simclr dino] [--steps 150] [--seeds 0 1 2]

A lab's first archive is a few hundred images and no labels. Each label-free encoder's `cpu`
preset is fine-tuned from its ImageNet start on the collection (by default the demo's 240
tiles) read through a manifest whose labels are empty, so training cannot see them, for a
step budget (the same on a slow machine as on a fast one), once per seed. Then the
collection is searched leave-one-out with its labels (mMV@5, P@5, mAP@5), beside the colour
histogram and the frozen ImageNet backbone; each recipe's row is the mean and the spread
(min-max) over its seeds. A checkpoint already in --workdir with the same steps is reused.
Writes `small_archive.json`, `.md` and `.png`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks.colour_histogram import colour_histogram_metrics
from benchmarks.frozen_backbone import frozen_backbone
from benchmarks.machine import project_relative
from benchmarks.over_seeds import cell, error_bars, over_seeds
from benchmarks.results_files import figure, write_results
from histoseek.dataset import DatasetItem, read_dataset, write_manifest
from histoseek.errors import HistoseekError
from training import checkpoint
from training.encoders.registry import get_encoder
from training.evaluate import evaluate_backbone
from training.recipes import DEMO_COLLECTION
from training.train import TrainConfig, train

log = logging.getLogger("benchmarks.small_archive")
KS = [5]
METRICS = ("mMV@5", "P@5", "mAP@5")


def unlabelled_copy(collection: Path, out: Path) -> Path:
    """A dataset folder of links to the collection's images and a manifest with no labels."""
    dataset = read_dataset(collection)
    items = []
    for number, item in enumerate(dataset.items):
        link = out / "tiles" / f"{number:05d}{Path(item.path).suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(dataset.absolute(item).resolve())
        items.append(DatasetItem(path=link.relative_to(out).as_posix(), label="", group=f"image-{number}"))
    write_manifest(out, items)
    return out


def trained(encoder: str, data: Path, out: Path, steps: int, seed: int) -> Path:
    """`out` holds `encoder` fine-tuned for `steps` steps with `seed` (trained now unless it does)."""
    if (out / checkpoint.WEIGHTS).is_file() and checkpoint.read_config(out).get("steps") == steps:
        return out
    train(TrainConfig(encoder=encoder, data=str(data), out=str(out), steps=steps, seed=seed, fresh=True))
    return out


def markdown(report: dict) -> str:
    frozen = report["rows"][1]["metrics"]["mMV@5"]["mean"]
    lines = [f"Collection: {report['collection']} ({report['images']} images), labels hidden during training; "
             "leave-one-out retrieval. Fine-tuned rows: mean over the seeds (min-max).", "",
             "| model | seeds | mMV@5 | P@5 | mAP@5 | mMV@5 vs frozen |", "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        m = row["metrics"]
        cells = [cell(m[k], len(row["seeds"]) > 1) for k in METRICS]
        delta = "–" if not row["seeds"] else f"{m['mMV@5']['mean'] - frozen:+.3f}"
        lines.append(f"| {row['model']} | {len(row['seeds']) or '–'} | {' | '.join(cells)} | {delta} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    rows = report["rows"]
    with figure(path, 1, 1, dpi=120, figsize=(8, 3.8)) as ax:
        means = [r["metrics"]["mMV@5"]["mean"] for r in rows]
        ax.bar(range(len(rows)), means, yerr=error_bars([r["metrics"]["mMV@5"] for r in rows]), capsize=3,
               color="tab:olive")
        ax.axhline(rows[1]["metrics"]["mMV@5"]["mean"] + 0.05, color="grey", linestyle="--", linewidth=1,
                   label="frozen + 0.05")
        ax.set_xticks(range(len(rows)), [r["model"] for r in rows], fontsize=7, rotation=20, ha="right")
        ax.set(ylim=(0.5, 1), ylabel="leave-one-out mMV@5", title=f"{report['collection']}, labels hidden in training")
        ax.legend(fontsize=7, loc="lower right")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collection", type=Path, default=DEMO_COLLECTION)
    parser.add_argument("--encoders", nargs="+", default=["simclr", "dino"])
    parser.add_argument("--steps", type=int, nargs="+", default=[150])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("runs/small_archive"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in args.encoders:
        if get_encoder(name).needs_labels:
            raise HistoseekError(f"{name} learns from labels; this benchmark measures label-free encoders")
    collection = read_dataset(args.collection)
    data = unlabelled_copy(args.collection, args.workdir / "unlabelled")
    preset = get_encoder(args.encoders[0]).preset("cpu")
    frozen = evaluate_backbone(*frozen_backbone(preset.backbone, preset.input_size), args.collection, None, KS)
    rows = [{"model": "colour histogram", "seeds": [],
             "metrics": over_seeds([colour_histogram_metrics(collection, collection, KS)], METRICS)},
            {"model": f"frozen {preset.backbone} (ImageNet, no training)", "seeds": [],
             "metrics": over_seeds([frozen["metrics"]], METRICS)}]
    for name in args.encoders:
        for steps in args.steps:
            runs = []
            for seed in args.seeds:
                out = trained(name, data, args.workdir / f"{name}-{steps}steps-seed{seed}", steps, seed)
                runs.append(evaluate_backbone(*checkpoint.load_backbone(out), args.collection, None, KS)["metrics"])
                log.info("%s, %d steps, seed %d: mMV@5 %.3f", name, steps, seed, runs[-1]["mMV@5"])
            rows.append({"model": f"{name}, {steps} steps", "encoder": name, "steps": steps, "seeds": args.seeds,
                         "per_seed": runs, "metrics": over_seeds(runs, METRICS)})
    report = {"collection": project_relative(args.collection), "images": len(collection), "rows": rows}
    table = markdown(report)
    write_results(args.results / "small_archive", report, table, lambda path: plot(report, path))
    print(table)


if __name__ == "__main__":
    main()
