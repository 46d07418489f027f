"""SPQ's own product-quantization codes against PQ fitted after the fact to a float encoder.

    python -m benchmarks.compact_codes --data ../shared/data/crc5-dev --epochs 4 \\
        [--float-checkpoint runs/encoder_quality/dml] [--bits 16 32 64]

For 16, 32 and 64 bits per item: `spq` trained at that code length (its codebooks loaded
into a faiss.IndexPQ), against a FAISS IndexPQ trained by k-means with the same number of
bits (M = bits/8 sub-quantizers of 256 centroids) on SPQ's own float descriptor, and, with
--float-checkpoint, on that float encoder's embeddings.
Retrieval (mMV@5, mAP@5) with test as queries against train, bytes per item, recall@10
of each compact index against the exact flat index of the same encoder, and search
latency per query at 10k, 100k and 1M items (database vectors sampled around the real
train embeddings, re-normalised the way the encoder's output is). Single training runs differ
by a few hundredths, so each code length trains once per --seeds and the table gives the mean
and range of the retrieval columns over them (latency: the first seed's index, one machine):
`compact_codes.json`, `.md` and `.png` under --results.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks.over_seeds import cell, error_bars, over_seeds
from benchmarks.results_files import figure, write_results
from benchmarks.vectors import realistic, recall_at_10
from training.contract import ContractModel
from histoseek.dataset import Dataset, read_dataset
from histoseek.metrics import retrieval_metrics
from server.index.types import code_bytes_per_item, new_faiss_index
from training import checkpoint
from training.evaluate import embed_dataset
from training.train import TrainConfig, train

log = logging.getLogger("benchmarks.compact_codes")
BITS = (16, 32, 64)
SIZES = (10_000, 100_000, 1_000_000)


def embed(ckpt: Path, train_set: Dataset, test_set: Dataset) -> tuple[np.ndarray, np.ndarray, object]:
    backbone, spec = checkpoint.load_backbone(ckpt)
    model = ContractModel(backbone, spec).eval()
    return (embed_dataset(model, train_set, spec.input_size), embed_dataset(model, test_set, spec.input_size),
            backbone)


def scores(index: faiss.Index, db: np.ndarray, queries: np.ndarray, db_labels, q_labels, k: int = 10) -> tuple:
    index.add_with_ids(db, np.arange(len(db), dtype=np.int64))
    _, ids = index.search(queries, k)
    metrics = retrieval_metrics(q_labels, [[db_labels[j] for j in row] for row in ids], [5])
    return metrics, ids


def latency_ms(index: faiss.Index, queries: np.ndarray) -> float:
    index.search(queries[:5], 10)  # warm-up
    started = time.perf_counter()
    for q in queries:
        index.search(q[None], 10)
    return (time.perf_counter() - started) / len(queries) * 1000


def run(args) -> dict:
    rng = np.random.default_rng(0)
    train_set, test_set = read_dataset(args.data / "train"), read_dataset(args.data / "test")
    db_labels, q_labels = [i.label for i in train_set.items], [i.label for i in test_set.items]
    rows = []

    def exact_flat(db, q) -> tuple:
        """The exact flat index's metrics and results: what a compact index of the same vectors is compared with."""
        return scores(faiss.IndexIDMap2(faiss.IndexFlatIP(db.shape[1])), db, q, db_labels, q_labels)

    def measure(method: str, bits: int, db, q, compact: faiss.Index, books: int, sweep_flat: bool, flat: tuple,
                seed: int, timed: bool = True):
        flat_metrics, exact = flat
        metrics, found = scores(compact, db, q, db_labels, q_labels)
        latencies, flat_latencies = {}, {}
        queries = realistic(db, 100, books, rng) if timed else None
        for size in SIZES if timed else ():
            vectors = realistic(db, size, books, rng)
            big = faiss.clone_index(compact)
            big.reset()
            big.add_with_ids(vectors, np.arange(size, dtype=np.int64))
            latencies[size] = round(latency_ms(big, queries), 3)
            if sweep_flat:
                flat = faiss.IndexFlatIP(db.shape[1])
                flat.add(vectors)
                flat_latencies[size] = round(latency_ms(flat, queries), 3)
            log.info("%s %d bits: %d items, %.3f ms/query", method, bits, size, latencies[size])
        rows.append({"method": method, "bits": bits, "seed": seed, "mMV@5": metrics["mMV@5"], "mAP@5": metrics["mAP@5"],
                     "flat_mMV@5": flat_metrics["mMV@5"], "flat_mAP@5": flat_metrics["mAP@5"],
                     "bytes_per_item": code_bytes_per_item(compact), "flat_bytes_per_item": 4 * db.shape[1],
                     "recall@10_vs_flat": round(recall_at_10(found, exact), 4), "latency_ms": latencies,
                     "flat_latency_ms": flat_latencies})

    for bits in args.bits:
        for seed in args.seeds:
            ckpt = args.workdir / f"spq{bits}-seed{seed}"
            if not (ckpt / "weights.safetensors").is_file():
                train(TrainConfig(encoder="spq", data=str(args.data / "train"), out=str(ckpt), epochs=args.epochs,
                                  bits=bits, seed=seed))
            db, q, backbone = embed(ckpt, train_set, test_set)
            codebooks = backbone.export_arrays()["codebooks.npy"]
            flat, timed = exact_flat(db, q), seed == args.seeds[0]
            index, _ = new_faiss_index("pq", db.shape[1], db, codebooks=codebooks)
            measure("spq (own codes)", bits, db, q, index, codebooks.shape[0], sweep_flat=False, flat=flat,
                    seed=seed, timed=timed)
            # The bar SPQ's codes must clear: k-means PQ of the same bits on SPQ's own descriptor.
            index, _ = new_faiss_index("pq", db.shape[1], db, {"M": bits // 8, "nbits": 8})
            measure("spq + FAISS PQ", bits, db, q, index, codebooks.shape[0], sweep_flat=False, flat=flat,
                    seed=seed, timed=timed)

    if args.float_checkpoint:
        float_db, float_q, _ = embed(args.float_checkpoint, train_set, test_set)
        float_flat = exact_flat(float_db, float_q)  # the same vectors at every code length
        name = json.loads((args.float_checkpoint / "encoder.json").read_text())["name"]
        for bits in args.bits:
            index, _ = new_faiss_index("pq", float_db.shape[1], float_db, {"M": bits // 8, "nbits": 8})
            measure(f"{name} + FAISS PQ", bits, float_db, float_q, index, 1, sweep_flat=bits == args.bits[0],
                    flat=float_flat, seed=args.seeds[0])
    return {"data": str(args.data), "epochs": args.epochs, "bits": list(args.bits), "seeds": list(args.seeds),
            "rows": rows, "summary": summary(rows)}


SCORES = ("mMV@5", "mAP@5", "flat_mMV@5", "flat_mAP@5", "recall@10_vs_flat")


def summary(rows: list[dict]) -> list[dict]:
    """One row per method and code length: the first seed's row (sizes, latency) with each score
    replaced by its mean, min and max over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["bits"]), []).append(row)
    return [{key: value for key, value in runs[0].items() if key != "seed"}
            | {"seeds": [r["seed"] for r in runs]} | over_seeds(runs, SCORES) for runs in groups.values()]


def markdown(report: dict) -> str:
    lines = [f"Mean (range) over seeds {', '.join(map(str, report['seeds']))} for spq; latency from the first seed.",
             "", "| method | bits | bytes/item | mMV@5 | mAP@5 | flat mMV@5 | flat mAP@5 | recall@10 vs flat | "
             "ms/query 10k | 100k | 1M |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["summary"]:
        lat = [r["latency_ms"][s] for s in SIZES]
        scores = [cell(r[key], len(r["seeds"]) > 1) for key in SCORES]
        lines.append(f"| {r['method']} | {r['bits']} | {r['bytes_per_item']} | {' | '.join(scores)} | "
                     + " | ".join(f"{v:.3f}" for v in lat) + " |")
    for r in report["summary"]:
        if r["flat_latency_ms"]:
            lat = [r["flat_latency_ms"][s] for s in SIZES]
            lines.append(f"| {r['method'].split(' +')[0]} flat (exact) | {32 * r['flat_bytes_per_item'] // 4} | "
                         f"{r['flat_bytes_per_item']} | {r['flat_mMV@5']['mean']:.3f} | {r['flat_mAP@5']['mean']:.3f} | "
                         "– | – | 1.000 | "
                         + " | ".join(f"{v:.3f}" for v in lat) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    with figure(path, 1, 2, figsize=(11, 4), dpi=120) as (left, right):
        for method in dict.fromkeys(r["method"] for r in report["summary"]):
            rows = [r for r in report["summary"] if r["method"] == method]
            for key, style in (("mAP@5", dict(marker="o")), ("mMV@5", dict(marker="s", linestyle="--"))):
                stats = [r[key] for r in rows]  # bars: the range over seeds
                left.errorbar([r["bits"] for r in rows], [s["mean"] for s in stats], yerr=error_bars(stats),
                              capsize=3, label=f"{method} {key}", **style)
            for r in rows:
                right.plot(SIZES, [r["latency_ms"][s] for s in SIZES], marker="o",
                           label=f"{method}, {r['bits']} bits")
        for r in report["summary"]:
            if r["flat_latency_ms"]:
                right.plot(SIZES, [r["flat_latency_ms"][s] for s in SIZES], marker="x", color="black",
                           label="flat (exact)")
        left.set(xlabel="bits per item", ylabel="score", xticks=report["bits"],
                 title="retrieval, test vs train (mean, range over seeds)")
        right.set(xscale="log", yscale="log", xlabel="items in the index", ylabel="ms per query",
                  title="search latency, one query at a time")
        left.legend(fontsize=7)
        right.legend(fontsize=6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder with train/ and test/ dataset folders")
    parser.add_argument("--float-checkpoint", type=Path,
                        help="a trained float encoder (e.g. dml) whose embeddings get PQ of the same bits as well")
    parser.add_argument("--epochs", type=int, default=4, help="spq training epochs per code length")
    parser.add_argument("--bits", type=int, nargs="+", default=list(BITS), choices=BITS,
                        help="code lengths to compare (an spq checkpoint already in --workdir/spq<bits>-seed<seed> "
                        "is reused)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/compact_codes"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one spq training per seed and code length")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    report = run(args)
    table = markdown(report)
    write_results(args.results / "compact_codes", report, table, lambda path: plot(report, path))
    print(table)


if __name__ == "__main__":
    main()
