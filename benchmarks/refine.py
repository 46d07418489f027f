"""One round of relevance feedback, as a pathologist gives it: how much refining lifts a search.

    python -m benchmarks.refine --checkpoint work/checkpoints/dml-crc5 --data ../shared/data/crc5-dev

Through the served path: the checkpoint is exported, served by Triton, `data/train` indexed
and `histoseek serve` started. Every `data/test` tile is searched (`/v1/search`, k=10); the
correct results among the ten are marked relevant and the others not (the simulated
feedback of the issue), and the same tile is sent to `/v1/search/refine` with those marks.
P@5 and mMV@5 before and after, and P@5 of the refined ranking without the results
already shown (what the round finds that is new). The colour histogram and the frozen ImageNet backbone get
the same round offline (server/refine.py's update on their vectors, exact search). Writes
`refine.json`, `.md` and `.png` under --results.
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.bench_search import serve_indexes
from benchmarks.colour_histogram import histogram_embedding
from benchmarks.frozen_backbone import frozen_backbone
from benchmarks.machine import project_relative
from benchmarks.results_files import paired_bars, write_results
from benchmarks.served_models import running_triton
from export.export_checkpoint import export_checkpoint
from histoseek.dataset import Dataset, read_dataset
from histoseek.metrics import majority_label
from server.index.build import build_index
from server.refine import ALPHA, BETA, GAMMA, refined_query
from training import checkpoint
from training.contract import ContractModel
from training.encoders.registry import EncoderSpec
from training.evaluate import embed_dataset

log = logging.getLogger("benchmarks.refine")
K, SHOWN = 5, 10  # precision and vote at 5; feedback on the first 10 results


def _scores(query_label: str, labels: list[str]) -> tuple[float, float]:
    """(P@5, majority vote at 5 right) of one ranked label list."""
    top = labels[:K]
    return sum(label == query_label for label in top) / K, float(majority_label(top)[0] == query_label)


def _unseen(ids: list[int], labels: list[str], marked: set[int]) -> list[str]:
    """The labels of a ranking without the items the user had already marked: what is new."""
    return [label for i, label in zip(ids, labels) if i not in marked]


def _marks(query_label: str, ids: list[int], labels: list[str]) -> tuple[list[int], list[int]]:
    relevant = [i for i, label in zip(ids, labels) if label == query_label]
    return relevant, [i for i, label in zip(ids, labels) if label != query_label]


def served_round(url: str, index: str, queries: Dataset) -> dict:
    """Search, mark, refine for every query through the API; mean scores before and after."""
    before, after, new = [], [], []
    with httpx.Client(base_url=url, timeout=60) as http:
        for item in tqdm(queries.items, desc="search + refine", unit="query"):
            files = {"image": (Path(item.path).name, queries.absolute(item).read_bytes())}
            first = http.post("/v1/search", data={"index": index, "k": str(SHOWN)}, files=files)
            first.raise_for_status()
            results = first.json()["results"]
            ids, labels = [r["id"] for r in results], [r["label"] for r in results]
            relevant, not_relevant = _marks(item.label, ids, labels)
            refined = http.post("/v1/search/refine", files=files, data={
                "index": index, "k": str(2 * SHOWN), "relevant": [str(i) for i in relevant],
                "not_relevant": [str(i) for i in not_relevant]})
            refined.raise_for_status()
            second = refined.json()["results"]
            before.append(_scores(item.label, labels))
            after.append(_scores(item.label, [r["label"] for r in second]))
            new.append(_scores(item.label, _unseen([r["id"] for r in second], [r["label"] for r in second],
                                                   set(ids)))[0])
    return _summary(before, after, new)


def offline_round(database: np.ndarray, db_labels: np.ndarray, queries: np.ndarray, q_labels: list[str]) -> dict:
    """The same round on vectors: exact inner-product search, server/refine.py's update."""
    before, after, new = [], [], []
    for vector, label in zip(queries, q_labels):
        first = np.argsort(-(database @ vector), kind="stable")[:SHOWN]
        relevant, not_relevant = _marks(label, first.tolist(), db_labels[first].tolist())
        moved = refined_query(vector, database[relevant], database[not_relevant])
        second = np.argsort(-(database @ moved), kind="stable")[:2 * SHOWN]
        before.append(_scores(label, db_labels[first].tolist()))
        after.append(_scores(label, db_labels[second[:SHOWN]].tolist()))
        new.append(_scores(label, _unseen(second.tolist(), db_labels[second].tolist(), set(first.tolist())))[0])
    return _summary(before, after, new)


def _summary(before: list[tuple[float, float]], after: list[tuple[float, float]], new: list[float]) -> dict:
    b, a = np.asarray(before), np.asarray(after)
    return {"queries": len(b), "p5_before": round(float(b[:, 0].mean()), 4), "p5_after": round(float(a[:, 0].mean()), 4),
            "mmv5_before": round(float(b[:, 1].mean()), 4), "mmv5_after": round(float(a[:, 1].mean()), 4),
            "p5_unseen_after": round(float(np.mean(new)), 4)}


def markdown(report: dict) -> str:
    lines = [f"One round of simulated feedback on {report['data']} (test queried against train; the correct "
             f"results among the first {SHOWN} marked relevant, the others not; Rocchio α={ALPHA}, β={BETA}, "
             f"γ={GAMMA}).", "",
             "| model | path | P@5 before | P@5 after | lift | P@5 of results not shown before | mMV@5 before | "
             "mMV@5 after |", "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['model']} | {row['path']} | {row['p5_before']:.3f} | {row['p5_after']:.3f} | "
                     f"{row['p5_after'] - row['p5_before']:+.3f} | {row['p5_unseen_after']:.3f} | "
                     f"{row['mmv5_before']:.3f} | {row['mmv5_after']:.3f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    rows = report["rows"]
    paired_bars(path, [r["model"] for r in rows], ("first search", [r["p5_before"] for r in rows]),
                ("after one round of marks", [r["p5_after"] for r in rows]), "P@5",
                "Refining a search (crc5-dev, test vs train)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="the encoder to serve (a checkpoint folder)")
    parser.add_argument("--data", type=Path, required=True, help="a folder with train/ and test/ dataset folders")
    parser.add_argument("--workdir", type=Path, default=Path("runs/refine"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    database, queries = read_dataset(args.data / "train"), read_dataset(args.data / "test")
    db_labels = np.array([item.label for item in database.items])
    q_labels = [item.label for item in queries.items]

    rows = []
    colour = [np.stack([histogram_embedding(d.absolute(i)) for i in d.items]) for d in (database, queries)]
    rows.append({"model": "colour histogram", "path": "offline", **offline_round(colour[0], db_labels, colour[1], q_labels)})
    trunk, spec = frozen_backbone("tf_efficientnet_lite0", 224)
    frozen = [embed_dataset(ContractModel(trunk, spec).eval(), d, spec.input_size) for d in (database, queries)]
    rows.append({"model": "frozen Lite0", "path": "offline", **offline_round(frozen[0], db_labels, frozen[1], q_labels)})

    name = EncoderSpec.load(args.checkpoint / checkpoint.SPEC).name
    shutil.rmtree(args.workdir, ignore_errors=True)
    repo = args.workdir / "model_repository"
    export_checkpoint(args.checkpoint, repo, verify_data=args.data / "test")
    with running_triton(repo, args.workdir / "triton") as triton:
        index = build_index(name, args.data / "train", args.workdir / "indexes" / "crc5-train",
                            triton_url=triton.grpc_url)
        url, api = serve_indexes([index], triton.grpc_url, args.workdir)
        try:
            rows.append({"model": f"{name} ({project_relative(args.checkpoint)})", "path": "served (API)",
                         **served_round(url, index.name, queries)})
        finally:
            api.terminate()
            api.wait()
    report = {"data": project_relative(args.data), "alpha": ALPHA, "beta": BETA, "gamma": GAMMA, "rows": rows}
    write_results(args.results / "refine", report, markdown(report), lambda path: plot(report, path))
    print(markdown(report))


if __name__ == "__main__":
    main()
