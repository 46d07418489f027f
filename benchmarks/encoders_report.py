"""Tables, goals and plots of `histoseek bench encoders` results."""
from __future__ import annotations

from pathlib import Path

from benchmarks.bench_encoders import PATHS
from benchmarks.results_files import figure

LABELS = {"eager": "PyTorch eager", "onnxruntime": "onnxruntime", "triton_http": "Triton HTTP",
          "triton_grpc": "Triton gRPC"}
# The goals on 2 CPU cores.
MAX_GRPC_OVERHEAD_MS = 1.0
MIN_ORT_SPEEDUP = 1.2


def goals(rows: list[dict]) -> list[dict]:
    """Each goal, per encoder: the figure and whether it is met (batch 1 for overhead, every batch for speed-up)."""
    out = []
    for r in rows:
        overhead = r["ratios"]["1"]["grpc_overhead_ms"] if "1" in r["ratios"] else None
        speedups = {b: v["onnxruntime_speedup_over_eager"] for b, v in r["ratios"].items()}
        out.append({
            "encoder": r["encoder"],
            "grpc_overhead_ms_batch1": overhead,
            "grpc_overhead_met": overhead is not None and overhead <= MAX_GRPC_OVERHEAD_MS,
            "onnxruntime_speedup": speedups,
            "onnxruntime_speedup_met": all(s >= MIN_ORT_SPEEDUP for s in speedups.values()),
        })
    return out


def _mark(met: bool) -> str:
    return "met" if met else "**not met**"


def markdown(rows: list[dict], settings: dict, gpu: str | None) -> str:
    batches = list(rows[0]["latency"])
    first = batches[0]
    lines = [f"### Latency at batch {first} (p50 / p99 ms)", "",
             "| encoder | backbone | GFLOPs/img | " + " | ".join(LABELS[p] for p in PATHS)
             + " | onnxruntime ÷ eager | gRPC − onnxruntime ms | HTTP − onnxruntime ms |",
             "|---|---|---|" + "---|" * len(PATHS) + "---|---|---|"]
    for r in rows:
        lat, ratio = r["latency"][first], r["ratios"][first]
        cells = " | ".join(f"{lat[p]['p50_ms']:.2f} / {lat[p]['p99_ms']:.2f}" for p in PATHS)
        lines.append(f"| `{r['encoder']}` | {r['backbone']} @ {r['input_size']} px | {r['gflops_per_image']:.3f} | "
                     f"{cells} | {ratio['onnxruntime_speedup_over_eager']:.2f}× | {ratio['grpc_overhead_ms']:+.2f} | "
                     f"{ratio['http_overhead_ms']:+.2f} |")
    lines += ["", "### Throughput (images/s) by batch size", "",
              "| encoder | path | " + " | ".join(f"batch {b}" for b in batches) + " | p50 ms at largest | GFLOP/s at largest |",
              "|---|---|" + "---|" * len(batches) + "---|---|"]
    last = batches[-1]
    for r in rows:
        for p in PATHS:
            rates = " | ".join(f"{r['latency'][b][p]['items_per_s']:.0f}" for b in batches)
            best = r["latency"][last][p]
            lines.append(f"| `{r['encoder']}` | {LABELS[p]} | {rates} | {best['p50_ms']:.1f} | "
                         f"{best['items_per_s'] * r['gflops_per_image']:.1f} |")
    lines += ["", "### Triton under concurrent gRPC clients (one image per request, dynamic batching on)", "",
              "| encoder | clients | requests | images/s | p50 ms | p95 ms | p99 ms | mean batch formed |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for c in r["concurrency"]:
            lines.append(f"| `{r['encoder']}` | {c['clients']} | {c['requests']} | {c['images_per_s']:.1f} | "
                         f"{c['p50_ms']:.2f} | {c['p95_ms']:.2f} | {c['p99_ms']:.2f} | {c['mean_batch_formed']:.2f} |")
    lines += ["", "### Goals", "", "| encoder | gRPC overhead at batch 1 (≤ 1 ms) | onnxruntime ÷ eager (≥ 1.2× at every batch) |",
              "|---|---|---|"]
    for g in goals(rows):
        speedups = ", ".join(f"b{b} {s:.2f}×" for b, s in g["onnxruntime_speedup"].items())
        overhead = g["grpc_overhead_ms_batch1"]
        lines.append(f"| `{g['encoder']}` | {overhead:+.2f} ms {_mark(g['grpc_overhead_met'])} | "
                     f"{speedups}: {_mark(g['onnxruntime_speedup_met'])} |")
    weights = sorted({r["weights"] for r in rows})
    lines += ["", f"Settings: {settings['runs']} timed runs per path and batch, in 5 rounds of one block per path, "
              f"each block after a 0.2 s pause and {settings['warmup']} warm-up runs; {settings['requests_per_client']} requests per concurrent client. "
              f"Weights: {'; '.join(weights)}.",
              "", "GPU (onnxruntime CUDA/TensorRT in FP16, faiss-gpu, Triton at batch 64–256): "
              + (f"measured on {gpu}." if gpu else "**not measured** — this machine has no GPU; "
                 "rerun the same command on a GPU machine after `make setup` with `--batch 1 16 64` (Triton's "
                 "exported `max_batch_size` is 64: raise `MAX_BATCH_SIZE` in `export/triton_config.py` for 128–256).")]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import numpy as np

    names = [r["encoder"] for r in rows]
    batches = list(rows[0]["latency"])
    x = np.arange(len(names))
    width = 0.8 / len(PATHS)
    with figure(path, 1, 3, figsize=(17, 4.5), dpi=110) as axes:
        for i, p in enumerate(PATHS):
            axes[0].bar(x + (i - 1.5) * width, [r["latency"][batches[0]][p]["p50_ms"] for r in rows], width,
                        label=LABELS[p])
            axes[1].bar(x + (i - 1.5) * width, [r["latency"][batches[-1]][p]["items_per_s"] for r in rows], width,
                        label=LABELS[p])
        axes[0].set_title(f"p50 latency at batch {batches[0]} (ms)")
        axes[1].set_title(f"images/s at batch {batches[-1]}")
        for ax in axes[:2]:
            ax.set_xticks(x, names, rotation=30)
            ax.legend(fontsize=8)
        for r in rows:
            clients = [c["clients"] for c in r["concurrency"]]
            axes[2].plot(clients, [c["images_per_s"] for c in r["concurrency"]], marker="o", label=r["encoder"])
        axes[2].set_xscale("log", base=2)
        axes[2].set_xlabel("concurrent gRPC clients (batch 1 each)")
        axes[2].set_title("Triton images/s, dynamic batching")
        axes[2].legend(fontsize=8, ncol=2)
