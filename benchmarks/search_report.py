"""Tables, goal and plots of `histoseek bench search` results."""
from __future__ import annotations

from pathlib import Path

from benchmarks.bench_search import GOAL_P50_MS, STAGES
from benchmarks.results_files import figure


def markdown(report: dict, settings: dict) -> str:
    lines = ["### `/v1/search` end to end (one query at a time, 256 px PNG uploads, k=10)", "",
             "| index | encoder | type | items | p50 ms | p95 ms | p99 ms | "
             + " | ".join(f"server {s} ms" for s in STAGES) + f" | p50 < {GOAL_P50_MS:.0f} ms |",
             "|---|---|---|---|---|---|---|" + "---|" * len(STAGES) + "---|"]
    for r in report["endpoint"]:
        stages = " | ".join(f"{r['server_median_ms'][s]:.2f}" for s in STAGES)
        lines.append(f"| {r['index']} | `{r['encoder']}` | {r['type']} | {r['items']:,} | {r['p50_ms']:.1f} | "
                     f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {stages} | "
                     f"{'met' if r['goal_p50_under_100ms'] else '**not met**'} |")
    lines += ["", "### FAISS search against index size (one query at a time, one thread, k=10)", "",
              "| dimension | type | items | p50 ms | p99 ms | recall@10 vs flat | code bytes/item | build s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["faiss"]:
        recall = "–" if r["recall@10_vs_flat"] is None else f"{r['recall@10_vs_flat']:.3f}"
        lines.append(f"| {r['dimension']} | {r['type']} | {r['items']:,} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                     f"{recall} | {r['code_bytes_per_item']} | {r['build_s']:.1f} |")
    lines += ["", f"Settings: {settings['queries']} queries per index after 5 warm-up queries"
              + (f"; indexes of {settings['items']:,} synthetic 64 px tiles embedded through Triton, "
                 f"`{settings['preset']}` presets" if "items" in settings else "")
              + "; FAISS collections sampled around the vectors stored in each dimension's first index (with random-init encoders these are close together, a hard case for quantisation: see the compact-codes table for recall on trained embeddings). "
              "GPU (faiss-gpu): **not measured** unless a GPU is named below."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    with figure(path, 1, 2, figsize=(14, 4.5), dpi=110) as (left, right):
        names = [r["index"] for r in report["endpoint"]]
        bottom = [0.0] * len(names)
        for stage in STAGES[:-1]:
            values = [r["server_median_ms"][stage] for r in report["endpoint"]]
            left.bar(names, values, bottom=bottom, label=f"server {stage}")
            bottom = [b + v for b, v in zip(bottom, values)]
        left.plot(names, [r["p50_ms"] for r in report["endpoint"]], "k_", markersize=20, label="client p50 (HTTP)")
        left.axhline(GOAL_P50_MS, color="red", linestyle="--", linewidth=1, label="goal p50")
        left.set_ylabel("ms")
        left.set_title("/v1/search: median stage times and client p50")
        left.tick_params(axis="x", rotation=30)
        left.legend(fontsize=8)
        # Colour says the index type, line style the dimension.
        kinds = list(dict.fromkeys(r["type"] for r in report["faiss"]))
        for dim, style in zip(sorted({r["dimension"] for r in report["faiss"]}), ("-", "--", ":", "-.")):
            for colour, kind in enumerate(kinds):
                rows = [r for r in report["faiss"] if r["dimension"] == dim and r["type"] == kind]
                right.plot([r["items"] for r in rows], [r["p50_ms"] for r in rows], marker="o", linestyle=style,
                           color=f"C{colour}", label=f"{kind}, d={dim}")
        right.set_xscale("log")
        right.set_yscale("log")
        right.set_xlabel("items in the index")
        right.set_ylabel("p50 ms per query")
        right.set_title("FAISS search time against size")
        right.legend(fontsize=7, ncol=2)
