"""Cost of the pretrained encoders here, and the frozen ImageNet row through the served path.

For every model of the table (training/foundation_table.py): parameters and GFLOPs per
tile at its input size, counted on the meta device (no memory). For the models that
export in a few minutes on this machine: the model exported through `export_checkpoint`
(the product's only export path, ONNX verified against PyTorch) from random weights,
which cost the same as the published ones, its ONNX size, and tiles/s through Triton
(gRPC, batch 8). Models left out say why. Then the frozen ImageNet Lite0 indexes the
demo collection with no training step (export -> Triton -> index build -> served
leave-one-out evaluation); its mMV@5 must equal the frozen row of demo_quality.md.

    python -m benchmarks.foundation_models [--models plip uni …] [--workdir runs/foundation]
    # one more model, keeping the rows an earlier run measured:
    python -m benchmarks.foundation_models --models uni2-h --keep benchmarks/results/foundation_models.json
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import project_relative
from benchmarks.results_files import figure, write_results
from export.export_checkpoint import export_checkpoint
from export.onnx_files import onnx_bytes
from export.repository import latest_version_dir
from histoseek.dataset import read_dataset, sample_images
from server import triton
from server.evaluate_served import evaluate_index
from server.index.build import build_index
from training import checkpoint, foundation_models, foundation_weights
from training.encoders.registry import get_encoder
from training.foundation_table import MODELS, PRESET, foundation_model
from training.recipes import DEMO_COLLECTION

log = logging.getLogger("benchmarks.foundation_models")
# Exported and timed here by default: the ones whose export (trace, 32 verification tiles in
# PyTorch and onnxruntime) takes a few minutes on 2 cores. The ViT-H/ViT-g ones (2.5-4.5 GB of
# weights, 340-610 GFLOPs a tile) would take tens of minutes and most of this machine's memory.
MEASURED = ["imagenet-lite0", "imagenet-lite2", "plip", "quiltnet-b-32", "conch", "uni", "phikon-v2"]
BATCH = 8


def random_checkpoint(name: str, out: Path) -> Path:
    """A checkpoint folder of `name` with random weights (the ImageNet ones: their real weights)."""
    if foundation_model(name).library == "imagenet":
        return foundation_weights.write_checkpoint(name, None, out)
    torch.manual_seed(0)
    backbone = foundation_models.build(foundation_model(name))
    spec = get_encoder(name).spec(PRESET, weights_origin={"source": "random (benchmark)"})
    checkpoint.save_backbone(out, backbone, spec, {"encoder": name, "data": None})
    return out


def tiles_per_second(url: str, name: str, images: np.ndarray, seconds: float = 20.0) -> dict:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    inputs = grpcclient.InferInput("images", list(images.shape), "UINT8")
    inputs.set_data_from_numpy(images)
    call = lambda: client.infer(name, [inputs], outputs=[grpcclient.InferRequestedOutput("embeddings")])  # noqa: E731
    call()  # warm-up: the first run allocates
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 50):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return {"tiles_per_s": round(len(images) / float(np.mean(times)), 2), "calls": len(times),
            "batch": len(images), "mean_ms": round(1000 * float(np.mean(times)), 1)}


def run(names: list[str], workdir: Path, collection: Path, keep: dict | None = None) -> dict:
    """`keep`: an earlier report whose measured rows stand for the models not in `names`."""
    kept = {r["model"]: r for r in (keep or {}).get("rows", []) if "triton" in r and r["model"] not in names}
    repo = workdir / "model_repository"
    rows = []
    for model in MODELS:
        row = {"model": model.name, "title": model.title, "params_m": round(model.params_m, 1),
               "gflops_per_tile": round(foundation_models.count_gflops(model), 2), "input_size": model.input_size,
               "embedding_dim": model.embedding_dim, "cpu_ok": model.cpu_ok}
        if model.name in kept:
            row = kept[model.name] | {"from_earlier_run": True}
        elif model.name in names:
            started = time.perf_counter()
            ckpt = random_checkpoint(model.name, workdir / "checkpoints" / model.name)
            version = export_checkpoint(ckpt, repo, verify_data=collection, force=True)
            row |= {"onnx_mb": round(onnx_bytes(version / "model.onnx") / 2**20, 1),
                    "external_data": (version / "model.onnx.data").exists(),
                    "export_s": round(time.perf_counter() - started, 1)}
            log.info("%s exported in %.0f s", model.name, row["export_s"])
        else:
            giant = model.params_m > 500
            row |= {"onnx_mb_estimate": round(model.params_m * 1e6 * 4 / 2**20, 1),
                    "not_measured": "ViT-H/ViT-g: 2.5-4.5 GB of fp32 weights and 340-610 GFLOPs a tile; export "
                                    "(trace, 32 verification tiles twice) and serving take tens of minutes on 2 cores"
                                    if giant else "not in --models for this run"}
        rows.append(row)
    ports = {"http_port": 18200, "grpc_port": 18201, "metrics_port": 18202}
    run_dir = workdir / "triton_run"
    info = triton.start(repo, run_dir=run_dir, **ports)
    try:
        url = f"localhost:{info.grpc_port}"
        images = sample_images(collection, 224, count=BATCH)
        for row in rows:
            if row["model"] in names:
                size = foundation_model(row["model"]).input_size
                batch = images if size == 224 else sample_images(collection, size, count=BATCH)
                row["triton"] = tiles_per_second(url, row["model"], batch)
                log.info("%s: %s", row["model"], row["triton"])
        frozen = (keep or {}).get("frozen_lite0_loo")
        if "imagenet-lite0" in names:
            index = build_index("imagenet-lite0", collection, workdir / "index_lite0", index_type="flat",
                                triton_url=url, protocol="grpc", batch=32)
            frozen = evaluate_index(index, collection, [1, 5, 10], url)
    finally:
        triton.stop(run_dir)
    return {"collection": project_relative(collection), "batch": BATCH, "rows": rows, "frozen_lite0_loo": frozen}


def markdown(report: dict) -> str:
    lines = ["| model | params (M) | GFLOPs / tile | input | dim | ONNX size (MB) | tiles/s, Triton gRPC, batch 8 |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        size = f"{r['onnx_mb']:.0f}" + (" (external data)" if r.get("external_data") else "") if "onnx_mb" in r \
            else f"~{r['onnx_mb_estimate']:.0f} (4 B × params, not exported)"
        speed = f"{r['triton']['tiles_per_s']:.2f}" if "triton" in r else "not measured (see below)"
        lines.append(f"| {r['model']} | {r['params_m']:.1f} | {r['gflops_per_tile']:.1f} | {r['input_size']} | "
                     f"{r['embedding_dim']} | {size} | {speed} |")
    reasons: dict[str, list[str]] = {}
    for r in report["rows"]:
        if "not_measured" in r:
            reasons.setdefault(r["not_measured"], []).append(r["model"])
    for reason, models in reasons.items():
        lines.append(f"\nNot exported or timed here: {', '.join(models)} ({reason}).")
    frozen = report.get("frozen_lite0_loo")
    if frozen:
        m = frozen["metrics"]
        lines.append(f"\nFrozen ImageNet Lite0 (`imagenet-lite0`, no training) on {report['collection']}, served "
                     f"leave-one-out (export -> Triton -> index build -> evaluate --index): mMV@5 {m['mMV@5']:.3f}, "
                     f"P@5 {m['P@5']:.3f}, mAP@5 {m['mAP@5']:.3f} (demo_quality.md's frozen row: 0.833 / 0.748 / 0.841).")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    rows = report["rows"]
    with figure(path, 1, 2, figsize=(12, 4), dpi=120) as (left, right):
        left.barh([r["model"] for r in rows], [r["gflops_per_tile"] for r in rows], color="tab:purple")
        left.set(xscale="log", xlabel="GFLOPs per tile (log)", title="cost of one tile")
        timed = [r for r in rows if "triton" in r]
        right.barh([r["model"] for r in timed], [r["triton"]["tiles_per_s"] for r in timed], color="tab:green")
        right.set(xscale="log", xlabel="tiles/s (log)", title=f"Triton gRPC, batch {report['batch']}, this machine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MEASURED, help="models to export and time here")
    parser.add_argument("--workdir", type=Path, default=Path("runs/foundation_models"))
    parser.add_argument("--collection", type=Path, default=DEMO_COLLECTION)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--keep", type=Path, help="an earlier report (JSON): its measured rows stand for the "
                                                  "models not in --models")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    read_dataset(args.collection)  # fails early on a wrong folder
    keep = json.loads(args.keep.read_text()) if args.keep else None
    report = run(args.models, args.workdir, args.collection, keep)
    if keep:
        report["earlier_run"] = keep.get("machine", {}).get("command")
    table = markdown(report)
    write_results(args.results / "foundation_models", report, table, lambda path: plot(report, path))
    print(table)


if __name__ == "__main__":
    main()
