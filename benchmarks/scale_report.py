"""Tables, sizing and plot of `histoseek bench scale` results."""
from __future__ import annotations

from pathlib import Path

from benchmarks.results_files import figure

ARCHIVE = 10**9  # tiles: 10^5-10^6 slides of a hospital archive
NODE_RAM_BYTES = 256 * 2**30  # memory one index node gives the vectors (of, say, 384 GiB)


def sizing(report: dict) -> dict:
    """A 10^9-tile archive on paper, from the rates and sizes measured here."""
    best = max(report["embedding"], key=lambda r: r["tiles_per_s"])
    node_hours = ARCHIVE / best["tiles_per_s"] / 3600
    indexes = []
    for r in report["indexes"]:
        per_item = r.get("index_bytes_per_item") or r.get("code_bytes_per_item")
        if per_item is None:
            continue
        total = per_item * ARCHIVE
        indexes.append({"backend": r["backend"], "type": r["type"], "bytes_per_item": per_item,
                        "archive_tb": round(total / 1e12, 2), "nodes_at_256_gib": max(1, -(-int(total) // NODE_RAM_BYTES))})
    return {"tiles": ARCHIVE, "embedding_rate_per_node": best["tiles_per_s"], "embedding_node": best["mode"],
            "embedding_node_hours": round(node_hours), "nodes_for_one_week": max(1, round(node_hours / 168)),
            # what one GPU node would have to sustain to embed the archive in a week on 10 of them
            "gpu_rate_needed_10_nodes_one_week": round(ARCHIVE / (10 * 7 * 24 * 3600)),
            "indexes": indexes, "catalogue_bytes_per_item": report["catalogue_bytes_per_item"],
            "catalogue_tb": round(report["catalogue_bytes_per_item"] * ARCHIVE / 1e12, 1)}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"Encoder: {report['encoder']}; tiles: `{report['data']}`; {s['cpus']} CPU cores, no GPU.", "",
             "### Embedding throughput (`histoseek index build`, the same Triton)", "",
             "| mode | tiles | seconds | tiles/s | max abs diff vs single process |", "|---|---|---|---|---|"]
    for r in report["embedding"]:
        diff = f"{r['max_abs_diff_vs_single']:.1e}" if "max_abs_diff_vs_single" in r else "–"
        lines.append(f"| {r['mode']} | {r['tiles']:,} | {r['seconds']} | {r['tiles_per_s']} | {diff} |")
    header = " | ".join(f"{p} %: p50 ms / recall" for p in (1, 10, 50))
    lines += ["", f"### Index backends at {s['items']:,} items (one query at a time, k = {s['k']}, "
                  f"{s['queries']} real queries)", "",
              f"| backend | type | build s | p50 ms | p99 ms | recall@10 | filtered {header} | bytes/item |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["indexes"]:
        filtered = " | ".join(f"{f['p50_ms']:.2f} / {f['recall@10']:.3f}" + (" (short)" if f["short_results"] else "")
                              + (f" ({f['outside_filter']} outside!)" if f["outside_filter"] else "")
                              for f in r["filtered"])
        size = r.get("index_bytes_per_item") or r.get("code_bytes_per_item") or "–"
        lines.append(f"| {r['backend']} | {r['type']} | {r['build_s']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['recall@10']:.3f} | {filtered} | {size} |")
    z = report["sizing"]
    lines += ["", f"### A {z['tiles']:.0e}-tile archive, sized from these measurements", "",
              f"- Embedding at {z['embedding_rate_per_node']} tiles/s per node (best row above, a {s['cpus']}-core CPU "
              "node): "
              f"{z['embedding_node_hours']:,} node-hours, i.e. {z['nodes_for_one_week']:,} such nodes for a week. "
              f"Ten GPU nodes would each have to sustain {z['gpu_rate_needed_10_nodes_one_week']:,} tiles/s to "
              "finish in a week (a requirement, not measured: no GPU here).",
              "", "| backend | type | bytes/item | archive TB | index nodes (256 GiB each) |", "|---|---|---|---|---|"]
    for r in z["indexes"]:
        lines.append(f"| {r['backend']} | {r['type']} | {r['bytes_per_item']} | {r['archive_tb']} | "
                     f"{r['nodes_at_256_gib']:,} |")
    lines += ["", f"The index folder's `items.sqlite` (item rows and 128 px JPEG thumbnails) adds "
                  f"{z['catalogue_bytes_per_item']:,} bytes per item to every backend: {z['catalogue_tb']} TB for the "
                  "archive, on disk, not in memory."]
    lines += ["", "Filtered searches admit 1, 10 or 50 % of the items by a `source` field drawn independently of "
                  "the vectors; recall is against an exact search of the admitted items; \"(short)\" marks fewer "
                  "than k results although k items matched, \"(N outside!)\" results the filter should have left "
                  "out (none unless marked)."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    with figure(path, 1, 2, figsize=(13, 4.5), dpi=110) as (left, right):
        names = [f"{r['backend']}\n{r['type']}" for r in report["indexes"]]
        width = 0.2
        for offset, (label, values) in enumerate(
                [("no filter", [r["p50_ms"] for r in report["indexes"]])]
                + [(f"{p} % admitted", [next(f["p50_ms"] for f in r["filtered"] if f["percent"] == p)
                                         for r in report["indexes"]]) for p in (1, 10, 50)]):
            left.bar([i + (offset - 1.5) * width for i in range(len(names))], values, width, label=label)
        left.set_xticks(range(len(names)), names, fontsize=8)
        left.set_ylabel("p50 ms per query")
        left.set_yscale("log")
        left.set_title(f"search time at {report['settings']['items']:,} items")
        left.legend(fontsize=8)
        for colour, backend in enumerate(sorted({r["backend"] for r in report["indexes"]})):
            rows = [r for r in report["indexes"] if r["backend"] == backend]
            right.scatter([r["p50_ms"] for r in rows], [r["recall@10"] for r in rows], color=f"C{colour}",
                          label=backend)
            for r in rows:
                right.annotate(r["type"], (r["p50_ms"], r["recall@10"]), fontsize=8)
        right.set_xscale("log")
        right.set_xlabel("p50 ms per query")
        right.set_ylabel("recall@10 vs exact")
        right.set_title("recall against speed")
        right.legend(fontsize=8)
