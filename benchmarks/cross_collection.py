"""Other labs' tiles: queries from one collection against a database of another.

    python -m benchmarks.cross_collection [--encoders dml simclr …] [--seeds 0 1 2] [--train-minutes 2]

The 32 CRC-VAL-HE-7K tiles of `../shared/data` (Kather et al. 2018: another lab, another
scanner, other cuts) query the demo collection (Kather et al. 2016), their labels said in its
vocabulary by `configs/label_maps/crc-val-he-7k_to_kather2016.csv`. Every encoder is trained
as the quickstart trains it (its `cpu` preset, on the demo collection, for the same
minutes and at least as many steps; a checkpoint already in --workdir is reused), beside the colour histogram and the
frozen ImageNet backbone. Each row twice: the queries as they are, and Macenko-normalised
to the stain of the collection's most typical tile (the one whose mean optical density is
nearest the collection's median). Writes `cross_collection.json`, `.md` and `.png`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.colour_histogram import colour_histogram_metrics
from benchmarks.frozen_backbone import frozen_backbone
from benchmarks.machine import project_relative
from benchmarks.over_seeds import cell, error_bars, over_seeds
from benchmarks.results_files import paired_bars, write_results
from histoseek.dataset import Dataset, read_dataset
from histoseek.label_map import read_label_map, relabel
from training import checkpoint
from training.data.tiling import StainNormalizer
from training.encoders.registry import get_encoder, list_encoders
from training.evaluate import evaluate_backbone
from training.recipes import DEMO_COLLECTION, QUICKSTART_EPOCHS, QUICKSTART_MIN_STEPS, QUICKSTART_MINUTES
from training.train import TrainConfig, train

log = logging.getLogger("benchmarks.cross_collection")
ROOT = Path(__file__).resolve().parent.parent
KS = [5]
METRICS = ("mMV@5", "P@5")
QUERY_SETS = ("metrics", "metrics_stain_normalised")


def typical_tile(database: Dataset) -> Path:
    """The tile whose mean optical density (per channel) is nearest the collection's median."""
    paths = [database.absolute(item) for item in database.items]
    density = np.stack([(-np.log((np.asarray(Image.open(p).convert("RGB"), np.float64) + 1) / 256)).mean(axis=(0, 1))
                        for p in paths])
    return paths[int(np.argmin(np.linalg.norm(density - np.median(density, axis=0), axis=1)))]


def stain_normalised(queries: Dataset, reference: Path, out: Path) -> Path:
    """A copy of the query folder (a folder per class) Macenko-normalised to `reference`;
    a tile whose stains cannot be estimated is copied as it is (counted in the log)."""
    normalise, kept = StainNormalizer(reference), 0
    for item in queries.items:
        target = out / item.path
        target.parent.mkdir(parents=True, exist_ok=True)
        rgb = np.asarray(Image.open(queries.absolute(item)).convert("RGB"))
        try:
            rgb = normalise(rgb)
        except ValueError:
            kept += 1
        Image.fromarray(rgb.astype(np.uint8)).save(target.with_suffix(".png"))
    log.info("stain-normalised %d queries to %s (%d left as they were)", len(queries) - kept, reference, kept)
    return out


def encoder_row(name: str, runs: list[dict]) -> dict:
    """One encoder's row: its runs (one per seed: steps, and scores on each query set) and
    the mean and range of each score over them."""
    fewest, most = min(run["steps"] for run in runs), max(run["steps"] for run in runs)
    return {"model": f"{name} ({fewest if fewest == most else f'{fewest}-{most}'} steps)", "encoder": name,
            "seeds": [run["seed"] for run in runs], "per_seed": runs,
            **{key: over_seeds([run[key] for run in runs], METRICS) for key in QUERY_SETS}}


def markdown(report: dict) -> str:
    lines = [f"Queries: {report['queries']} ({report['query_count']} tiles), database: {report['database']}, labels "
             f"mapped by {report['label_map']}; stain reference {report['stain_reference']}. Fine-tuned rows: mean "
             "over the seeds (min-max).", "",
             "| model | seeds | mMV@5 | P@5 | mMV@5, queries stain-normalised | P@5, stain-normalised |",
             "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        cells = [cell(row[key][name], len(row["seeds"]) > 1) for key in QUERY_SETS for name in METRICS]
        lines.append(f"| {row['model']} | {len(row['seeds']) or '–'} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    rows = report["rows"]
    paired_bars(path, [r["model"].split(" (")[0] for r in rows],
                ("queries as they are", [r["metrics"]["mMV@5"]["mean"] for r in rows]),
                ("stain-normalised", [r["metrics_stain_normalised"]["mMV@5"]["mean"] for r in rows]),
                "mMV@5 (mean over seeds, min-max)", "CRC-VAL-HE-7K tiles against the demo collection",
                spreads=tuple(error_bars([r[key]["mMV@5"] for r in rows]) for key in QUERY_SETS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", type=Path, default=DEMO_COLLECTION)
    parser.add_argument("--queries", type=Path, default=ROOT.parent / "shared" / "data" / "crc-val-he-7k-sample")
    parser.add_argument("--label-map", type=Path,
                        default=ROOT / "configs" / "label_maps" / "crc-val-he-7k_to_kather2016.csv")
    parser.add_argument("--encoders", nargs="*", help="default: every registered fine-tuning encoder; the flag "
                        "alone: only the colour and frozen rows")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-minutes", type=float, default=QUICKSTART_MINUTES)
    parser.add_argument("--min-steps", type=int, default=QUICKSTART_MIN_STEPS)
    parser.add_argument("--workdir", type=Path, default=Path("runs/cross_collection"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    database, mapping = read_dataset(args.database), read_label_map(args.label_map)
    reference = typical_tile(database)
    normed_dir = stain_normalised(read_dataset(args.queries), reference, args.workdir / "queries_stain_normalised")
    query_folders = dict(zip(QUERY_SETS, (args.queries, normed_dir)))

    def scored(backbone, spec) -> dict:
        return {key: evaluate_backbone(backbone, spec, args.database, folder, KS, label_map=mapping)["metrics"]
                for key, folder in query_folders.items()}

    def one_run(model: str, run: dict) -> dict:
        return {"model": model, "seeds": [], **{key: over_seeds([run[key]], METRICS) for key in QUERY_SETS}}

    rows = [one_run("colour histogram", {
        key: colour_histogram_metrics(database, relabel(read_dataset(folder), mapping, database.labels), KS)
        for key, folder in query_folders.items()})]
    frozen = get_encoder("dml").preset("cpu")
    rows.append(one_run(f"frozen {frozen.backbone} (ImageNet, no training)",
                        scored(*frozen_backbone(frozen.backbone, frozen.input_size))))
    names = [e.name for e in list_encoders() if "cpu" in e.presets] if args.encoders is None else args.encoders
    for name in names:
        runs = []
        for seed in args.seeds:
            out = args.workdir / f"{name}-seed{seed}"
            if not (out / checkpoint.WEIGHTS).is_file():
                train(TrainConfig(encoder=name, data=str(args.database), out=str(out), epochs=QUICKSTART_EPOCHS,
                                  max_minutes=args.train_minutes, min_steps=args.min_steps, seed=seed, fresh=True))
            config = checkpoint.read_config(out)
            runs.append({"seed": seed, "minutes": round(config["minutes"], 2), "steps": config["steps"],
                         **scored(*checkpoint.load_backbone(out))})
            log.info("%s, seed %d (%d steps): mMV@5 %.3f, stain-normalised %.3f", name, seed, config["steps"],
                     runs[-1]["metrics"]["mMV@5"], runs[-1]["metrics_stain_normalised"]["mMV@5"])
        rows.append(encoder_row(name, runs))
    report = {"database": project_relative(args.database), "queries": project_relative(args.queries),
              "query_count": len(read_dataset(args.queries)), "label_map": project_relative(args.label_map),
              "stain_reference": project_relative(reference), "rows": rows}
    table = markdown(report)
    write_results(args.results / "cross_collection", report, table, lambda path: plot(report, path))
    print(table)


if __name__ == "__main__":
    main()
