"""`histoseek bench slides --load`: N concurrent slide uploads beside a steady stream of patch searches.

A real `histoseek serve` (default limits: 30 s deadline, 8 slide searches queued at most)
in front of a real Triton. For N = 1, 2, 4, 8, 16 concurrent uploads of one query slide
(a mosaic of 256 tiles, the most a query has), with a patch search every 20 ms from a
process of its own: how many were served, refused (and the Retry-After they were given)
or timed out after being admitted; the patch searches' p50/p99 while the admitted mosaics
are embedded, against idle; the server's peak and settled resident memory.

The encoder is a small convolutional network with random weights written with
`onnx.helper` (3 strided convolutions at 128 px, ~11 M multiply-adds a tile): it costs what
a small CNN costs on these cores without a training run; retrieval quality is not measured
here (`histoseek bench slides` does that). Query slides are synthetic, rendered at a
quarter of their size and enlarged, so a 6,144 px slide is a few MB, as light per tile as
a scanner's JPEG-compressed slide.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.results_files import figure, write_results
from benchmarks.slide_load import PatchProbe, PeakRss, burst, p, patch_idle, rss_mb

log = logging.getLogger(__name__)

TILE, MPP = 32, 0.5  # 32 level-0 px a tile on 0.5 µm/px slides: a 6,144 px query has a full 256-tile mosaic
MODEL = "bench_cnn"
INPUT = 128


def _cnn_onnx(path: Path, size: int = INPUT, dim: int = 64, seed: int = 0) -> Path:
    """uint8 NHWC -> 3 strided 3x3 convolutions (16, 32, 64 channels, ReLU) -> mean -> linear -> L2."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights, nodes, previous, channels = [], [], "scaled", 3
    nodes += [helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
              helper.make_node("Transpose", ["pixels"], ["nchw"], perm=[0, 3, 1, 2]),
              helper.make_node("Div", ["nchw", "scale"], ["scaled"])]
    weights.append(numpy_helper.from_array(np.array(255.0, np.float32), "scale"))
    for layer, out in enumerate((16, 32, 64)):
        w = (rng.standard_normal((out, channels, 3, 3)) / np.sqrt(channels * 9)).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{layer}"))
        nodes += [helper.make_node("Conv", [previous, f"w{layer}"], [f"c{layer}"], strides=[2, 2], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{layer}"], [f"r{layer}"])]
        previous, channels = f"r{layer}", out
    head = rng.standard_normal((channels, dim)).astype(np.float32)
    weights += [numpy_helper.from_array(head, "head"), numpy_helper.from_array(np.array([0, -1], np.int64), "flat")]
    nodes += [helper.make_node("GlobalAveragePool", [previous], ["pooled"]),
              helper.make_node("Reshape", ["pooled", "flat"], ["features"]),
              helper.make_node("MatMul", ["features", "head"], ["raw"]),
              helper.make_node("LpNormalization", ["raw"], ["embeddings"], axis=1, p=2)]
    graph = helper.make_graph(nodes, "bench_cnn",
                              [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", size, size, 3])],
                              [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", dim])],
                              initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def _spec() -> dict:
    return {"name": MODEL, "method": "random-cnn", "preset": "bench", "embedding_dim": 64, "input_size": INPUT,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "output_kind": "embedding"}


def _query_slide(path: Path, size: int) -> Path:
    """A synthetic slide rendered at 1/4 and enlarged (few MB), written as a pyramidal TIFF."""
    import tifffile

    from training.data.synthetic_slides import make_slide

    if path.is_file():
        return path
    low = make_slide("tumour", "stroma", size, size, 0.5, 11).render(4, 0, 0, size // 4, size // 4)
    rgb = np.repeat(np.repeat(low, 4, 0), 4, 1)
    partial = path.with_suffix(".partial.tiff")
    with tifffile.TiffWriter(partial) as tiff:
        for level in range(3):
            step = 4 ** level
            tiff.write(np.ascontiguousarray(rgb[::step, ::step]), tile=(256, 256), photometric="rgb",
                       compression="zlib", compressionargs={"level": 1}, resolution=(1e4 / (0.5 * step),) * 2,
                       resolutionunit="CENTIMETER", subfiletype=1 if level else 0, metadata=None)
    partial.replace(path)
    return path


def _prepare(workdir: Path, triton_url: str) -> Path:
    from server.index.build import build_index
    from training.data.prepare_slides import prepare_slides
    from training.data.synthetic_slides import synthesize_slides

    indexes = workdir / "indexes"
    if not (indexes / "slides" / "manifest.json").is_file():
        if not (workdir / "slides").is_dir():
            synthesize_slides(workdir / "slides", 4, classes=4, size=1024, seed=3)
        if not (workdir / "tiles").is_dir():
            prepare_slides(workdir / "slides", workdir / "tiles", tile=TILE, mpp=MPP, mosaic_minimum=8)
        build_index(MODEL, workdir / "tiles", indexes / "slides", triton_url=triton_url, batch=64)
    return indexes


def _free_ports(count: int) -> list[int]:
    from server.triton import free_port

    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def _serve(indexes: Path, triton_url: str, log_file: Path, timeout_s: float) -> tuple[subprocess.Popen, str]:
    """`histoseek serve` as deployed (default limits but the deadline), once /readyz answers."""
    import httpx

    (port,) = _free_ports(1)
    with open(log_file, "ab") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / "histoseek"), "serve", "--indexes", str(indexes),
                                    "--port", str(port), "--triton-url", triton_url,
                                    "--request-timeout", str(timeout_s)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the search API did not start; see {log_file}")
        time.sleep(0.2)


def bench_slide_load_command(*, concurrency: list[int], slide_size: int, workdir: Path, results: Path,
                             request_timeouts: tuple[float, ...] = (30.0,)) -> str:
    """One run per deadline, each on a fresh `histoseek serve` (its rate learnt anew)."""
    from export.repository import write_model_version
    from server import triton

    workdir.mkdir(parents=True, exist_ok=True)
    repo = workdir / "model_repository"
    if not (repo / MODEL / "config.pbtxt").is_file():
        write_model_version(repo, _spec(), _cnn_onnx(workdir / "bench_cnn.onnx"))
    ports = dict(zip(("http_port", "grpc_port", "metrics_port"), _free_ports(3)))
    info = triton.start(repo, run_dir=workdir / "triton", **ports)
    try:
        indexes = _prepare(workdir, info.grpc_url)
        query = _query_slide(workdir / f"query_{slide_size}.tiff", slide_size)
        patch = next((workdir / "tiles").glob("*/*.png"))
        runs = []
        for timeout_s in request_timeouts:
            process, url = _serve(indexes, info.grpc_url, workdir / "api.log", timeout_s)
            try:
                runs.append(_measure(url, process.pid, query, patch, concurrency, workdir, timeout_s))
            finally:
                process.terminate()
                process.wait(30)
    finally:
        triton.stop(workdir / "triton")
    report = {"slide_size": slide_size, "slide_mb": round(query.stat().st_size / 1e6, 1), "tile": TILE, "mpp": MPP,
              "model": f"{MODEL} (random 3-layer CNN at {INPUT} px)", "runs": runs}
    markdown = _markdown(report)
    write_results(results / "slide_load", report, markdown, lambda path: _plot(report, path))
    return markdown


def _measure(url: str, pid: int, query: Path, patch: Path, concurrency: list[int], workdir: Path,
             timeout_s: float) -> dict:
    data = query.read_bytes()
    patch_idle(url, patch.read_bytes(), 10)  # warm
    with PatchProbe(url, patch, workdir / "probe_idle") as idle_probe:
        time.sleep(5)
    idle = [s for _, s in idle_probe.latencies]
    start_rss = rss_mb(pid)
    (alone,) = burst(url, data, 1)  # the server measures its rate on it
    rows = []
    for count in concurrency:
        with PatchProbe(url, patch, workdir / f"probe_{count}") as probe, PeakRss(pid) as peak:
            answers = burst(url, data, count)
        time.sleep(2)
        served = [a for a in answers if a.status == 200]
        refused = [a for a in answers if a.refused]
        during = probe.between(min(a.ended for a in served), max(a.ended for a in served)) if len(served) > 2 else \
            probe.between(min(a.uploaded for a in answers), max(a.ended for a in answers))
        rows.append({
            "concurrent": count, "served": len(served), "refused": len(refused),
            "timed_out": sum(a.timed_out for a in answers),
            "other": sum(a.status not in (200, 503) for a in answers),
            "retry_after_s": sorted({a.retry_after for a in refused if a.retry_after is not None}),
            "slowest_refusal_s": round(max((a.seconds for a in refused), default=0.0), 3),
            "slowest_served_s": round(max((a.seconds for a in served), default=0.0), 2),
            "patch_p50_ms": round(p(during, 50) * 1000, 1), "patch_p99_ms": round(p(during, 99) * 1000, 1),
            "patch_samples": len(during),
            "peak_rss_mb": round(peak.peak, 1), "settled_rss_mb": round(rss_mb(pid), 1),
        })
        log.info("%s", rows[-1])
    return {"request_timeout_s": timeout_s, "query_tiles": alone.tiles, "alone_s": round(alone.seconds, 2),
            "alone_status": alone.status,
            "idle": {"patch_p50_ms": round(p(idle, 50) * 1000, 1), "patch_p99_ms": round(p(idle, 99) * 1000, 1),
                     "samples": len(idle)},
            "start_rss_mb": round(start_rss, 1), "rows": rows}


def _markdown(report: dict) -> str:
    lines = [
        "## Slide searches under load (`histoseek bench slides --load`)", "",
        f"One query slide ({report['slide_size']:,} px, {report['slide_mb']} MB, a mosaic of 256 tiles of "
        f"{report['tile']} px at {report['mpp']} µm/px; encoder {report['model']}) uploaded N times at once to "
        "`histoseek serve` (default limits but the deadline), beside a patch search every 20 ms.",
    ]
    for run in report["runs"]:
        lines += _run_table(run)
    lines += ["", "Patch p50/p99 under load: the patch searches that began and ended while the admitted slide "
                  "searches were being embedded (from the first answered to the last; with one slide, while it ran)."]
    return "\n".join(lines)


def _status(status: int) -> str:
    return "served" if status == 200 else "timed out: nothing was measured yet" if status == 503 else str(status)


def _run_table(report: dict) -> list[str]:
    idle = report["idle"]
    lines = [
        "", f"**Deadline {report['request_timeout_s']:g} s** (`--request-timeout`). The first slide search of the "
        f"server: {report['alone_s']} s ({_status(report.get('alone_status', 200))}). Patch searches idle: p50 {idle['patch_p50_ms']} ms, "
        f"p99 {idle['patch_p99_ms']} ms. Server RSS before: {report['start_rss_mb']} MB.", "",
        "| concurrent | served | refused (Retry-After s) | timed out | slowest refusal | slowest served "
        "| patch p50 / p99 under load | peak RSS | settled RSS |",
        "|---:|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in report["rows"]:
        retry = ", ".join(map(str, r["retry_after_s"])) or "-"
        lines.append(f"| {r['concurrent']} | {r['served']} | {r['refused']} ({retry}) | {r['timed_out']} | "
                     f"{r['slowest_refusal_s']} s | {r['slowest_served_s']} s | {r['patch_p50_ms']} / "
                     f"{r['patch_p99_ms']} ms | {r['peak_rss_mb']} MB | {r['settled_rss_mb']} MB |")
    return lines


def _plot(report: dict, path: Path) -> None:
    runs = report["runs"]
    with figure(path, len(runs), 3, dpi=100, figsize=(13, 3.6 * len(runs)), squeeze=False) as axes:
        for run, row_axes in zip(runs, axes):
            _plot_run(run, row_axes)


def _plot_run(report: dict, axes) -> None:
    rows = report["rows"]
    xs = [r["concurrent"] for r in rows]
    left, middle, right = axes
    deadline = f" ({report['request_timeout_s']:g} s deadline)"
    left.bar([str(x) for x in xs], [r["served"] for r in rows], label="served")
    left.bar([str(x) for x in xs], [r["refused"] for r in rows], bottom=[r["served"] for r in rows],
             label="refused at once (503 + Retry-After)")
    left.bar([str(x) for x in xs], [r["timed_out"] for r in rows],
             bottom=[r["served"] + r["refused"] for r in rows], label="timed out", color="red")
    left.set(xlabel="concurrent slide uploads", ylabel="requests", title="Slide searches" + deadline)
    left.legend(fontsize=8)
    middle.plot(xs, [r["patch_p50_ms"] for r in rows], "o-", label="p50 under load")
    middle.plot(xs, [r["patch_p99_ms"] for r in rows], "s-", label="p99 under load")
    middle.axhline(report["idle"]["patch_p99_ms"], color="grey", ls="--", label="p99 idle")
    middle.axhline(3 * report["idle"]["patch_p99_ms"], color="red", ls=":", label="3x p99 idle")
    middle.set(xscale="log", xticks=xs, xticklabels=[str(x) for x in xs], xlabel="concurrent slide uploads",
               ylabel="ms", title="Patch searches beside them")
    middle.legend(fontsize=8)
    right.plot(xs, [r["peak_rss_mb"] for r in rows], "o-", label="peak")
    right.plot(xs, [r["settled_rss_mb"] for r in rows], "s-", label="settled")
    right.axhline(report["start_rss_mb"] + 100, color="red", ls=":", label="start + 100 MB")
    right.set(xscale="log", xticks=xs, xticklabels=[str(x) for x in xs], xlabel="concurrent slide uploads",
              ylabel="MB", title="Server resident memory")
    right.legend(fontsize=8)
