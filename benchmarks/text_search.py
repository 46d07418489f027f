"""Search by text on real colorectal tiles, through the API: P@10 of each class's prompt.

    python -m benchmarks.text_search --data ../shared/data/crc5-dev [--train-minutes 12] [--checkpoint DIR]

Trains HistoSeek's `clip` (cpu preset: ImageNet EfficientNet-Lite0 image tower, a small
text tower from random weights, both fine-tuned against one prompt per class) on
`<data>/train` for a time budget, or takes a checkpoint already trained so; exports both
towers into a fresh model repository, starts Triton on free ports, indexes `<data>/test`
(500 tiles) through it, serves the API, and sends `POST /v1/search/text` the prompt of each
class. P@10: the share of the 10 results whose label is the prompt's class. Goal (issue
20): mean over the five classes >= 0.8. Beside it, R-precision: P@R with R the number of
the class's tiles in the index (100 each in crc5-dev test), which asks the text to rank the
whole class first, not only its ten clearest tiles. Writes text_search.json, .md and .png.

The prompts are the ones the text tower was trained on (`a histopathology image of
<class words>`, with the words of `CLASS_NAMES`): a text tower trained from random weights
on five prompts knows those five, not English.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.bench_search import serve_indexes
from benchmarks.machine import project_relative
from benchmarks.results_files import figure, write_results
from benchmarks.served_models import running_triton
from export.export_checkpoint import export_checkpoint
from histoseek.errors import HistoseekError
from server.index.build import build_index
from training import checkpoint
from training.train import TrainConfig, train

log = logging.getLogger("benchmarks.text_search")
# crc5-dev's folder names and what they mean (shared/data/README.md).
CLASS_NAMES = {"AC": "adenocarcinoma", "H": "healthy mucosa", "S": "serrated adenoma", "T": "tubular adenoma",
               "V": "villous adenoma"}
K = 10
GOAL = 0.8


def text_search(url: str, index: str, text: str, k: int = K, **filters) -> dict:
    response = httpx.post(f"{url}/v1/search/text", data={"text": text, "index": index, "k": str(k), **filters},
                          timeout=60)
    if response.status_code != 200:
        raise HistoseekError(f"text search failed ({response.status_code}): {response.text}")
    return response.json()


def measure(url: str, index: str, prompts: dict[str, str], class_sizes: dict[str, int]) -> list[dict]:
    rows = []
    for label, prompt in prompts.items():
        started = time.perf_counter()
        answer = text_search(url, index, prompt)
        seconds = time.perf_counter() - started
        found = [r["label"] for r in answer["results"]]
        size = class_sizes[label]
        whole = [r["label"] for r in text_search(url, index, prompt, k=size)["results"]]
        rows.append({"class": label, "prompt": prompt, "p_at_10": sum(f == label for f in found) / K,
                     "r_precision": round(sum(f == label for f in whole) / size, 4), "class_size": size,
                     "result_labels": found, "top_score": answer["results"][0]["score"],
                     "client_ms": round(seconds * 1000, 1), "server_ms": answer["timings_ms"]})
    return rows


def markdown(report: dict) -> str:
    lines = ["| class | prompt | P@10 | labels of the 10 results | R-precision |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        counts = ", ".join(f"{label} {n}" for label, n in sorted(
            {x: r["result_labels"].count(x) for x in r["result_labels"]}.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {r['class']} | {r['prompt']} | {r['p_at_10']:.1f} | {counts} | {r['r_precision']:.2f} |")
    lines.append(f"| **mean** | | **{report['mean_p_at_10']:.2f}** | goal ≥ {GOAL} "
                 f"({'met' if report['goal_met'] else 'not met'}) | {report['mean_r_precision']:.2f} |")
    t = report["training"]
    lines.append("")
    lines.append(f"`clip` cpu preset, {t['steps']} steps in {t['minutes']} min on {t['images']} tiles of "
                 f"{t['data']}; index: {report['index_count']} tiles of {report['index_data']} "
                 f"(flat, through Triton); queries through `POST /v1/search/text`, k={K}; median API time "
                 f"{report['median_server_ms']:.1f} ms (tokenize + embed + search).")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    with figure(path, 1, 1, figsize=(6, 3.2), dpi=120) as ax:
        at = np.arange(len(report["rows"]))
        ax.bar(at - 0.2, [r["p_at_10"] for r in report["rows"]], 0.4, color="#4c72b0", label="P@10")
        ax.bar(at + 0.2, [r["r_precision"] for r in report["rows"]], 0.4, color="#a1c9f4", label="R-precision")
        ax.set_xticks(at, [r["class"] for r in report["rows"]])
        ax.axhline(GOAL, color="#c44e52", linestyle="--", label=f"goal: mean P@10 {GOAL}")
        ax.axhline(report["mean_p_at_10"], color="#55a868", label=f"mean P@10 {report['mean_p_at_10']:.2f}")
        ax.set_ylim(0, 1.05)
        ax.set_title("Search by text on crc5-dev test (clip cpu, through the API)")
        ax.legend(loc="lower right", fontsize=8)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="crc5-dev: train/ and test/ folders per class")
    p.add_argument("--work", type=Path, default=Path("runs/text_search"))
    p.add_argument("--checkpoint", type=Path, help="a clip checkpoint trained on <data>/train (skips training)")
    p.add_argument("--train-minutes", type=float, default=12.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/text_search"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = args.work.resolve()
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = train(TrainConfig(encoder="clip", data=str(args.data / "train"), out=str(work / "checkpoint"),
                                 max_minutes=args.train_minutes, class_names=CLASS_NAMES, fresh=True))
    config = checkpoint.read_config(ckpt)
    repo = work / "model_repository"
    if repo.exists():
        import shutil

        shutil.rmtree(repo)
    export_checkpoint(ckpt, repo)
    text = json.loads((repo / "clip_text" / "1" / "text.json").read_text())
    prompts = text["prompts"]
    with running_triton(repo, work / "triton") as info:
        index = build_index("clip", args.data / "test", work / "indexes" / "crc5-test", triton_url=info.grpc_url,
                            repo=repo)
        url, api = serve_indexes([index], info.grpc_url, work)
        try:
            from histoseek.dataset import read_dataset

            labels = [item.label for item in read_dataset(args.data / "test").items]
            rows = measure(url, index.name, prompts, {label: labels.count(label) for label in prompts})
            count = httpx.get(f"{url}/v1/indexes", timeout=30).json()[0]["count"]
        finally:
            api.terminate()
            api.wait(30)
    mean = float(np.mean([r["p_at_10"] for r in rows]))
    report = {
        "rows": rows, "mean_p_at_10": round(mean, 4), "goal": GOAL, "goal_met": mean >= GOAL,
        "mean_r_precision": round(float(np.mean([r["r_precision"] for r in rows])), 4),
        "median_server_ms": float(np.median([r["server_ms"]["total"] for r in rows])),
        "training": {"steps": config.get("steps"), "minutes": config.get("minutes"), "images": config.get("images"),
                     "data": project_relative(config.get("data", "?")), "final_loss": config.get("final_loss"),
                     "checkpoint": project_relative(ckpt)},
        "index_data": project_relative(args.data / "test"), "index_count": count,
        "text_export_max_abs_diff": text["verify_max_abs_diff"],
    }
    write_results(args.out, report, markdown(report), lambda path: plot(report, path))
    print(markdown(report))


if __name__ == "__main__":
    main()
