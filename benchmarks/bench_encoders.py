"""`histoseek bench encoders`: one encoder's forward pass along every serving path.

For each encoder, in one run and on identical uint8 inputs: PyTorch eager (the exported
contract module: normalisation, backbone, L2), onnxruntime in this process, and Triton
over HTTP and gRPC on loopback (raw tritonclient calls: the transport and the server, no
HistoSeek code). The paths are timed in blocks taken in turn over several rounds, so a
noisy spell of the machine lands on all of them (see `timing.time_in_rounds`). Then Triton under 1, 4 and 16 concurrent gRPC clients
sending single images, with dynamic batching on as exported; the batch sizes Triton
actually formed are read from its statistics. FLOPs per image come from PyTorch's
FlopCounterMode, so throughput can be read against the hardware.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.served_models import ServedModel, running_triton
from benchmarks.timing import summarise, time_in_rounds
from training.contract import ContractModel
from training import checkpoint

log = logging.getLogger(__name__)
PATHS = ("eager", "onnxruntime", "triton_http", "triton_grpc")


def _triton_call(client, module, model: str, images: np.ndarray):
    inputs = module.InferInput("images", list(images.shape), "UINT8")
    inputs.set_data_from_numpy(images)
    return lambda: client.infer(model, [inputs], outputs=[module.InferRequestedOutput("embeddings")])


def flops_per_image(module: torch.nn.Module, size: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(torch.zeros(1, size, size, 3, dtype=torch.uint8))
    return float(counter.get_total_flops())


def measure_paths(model: ServedModel, info, batches: list[int], runs: int, warmup: int, seed: int = 0) -> dict:
    backbone, spec = checkpoint.load_backbone(model.checkpoint)
    eager = ContractModel(backbone, spec).eval()
    # The session the served model.py makes: same providers, worker threads that do not spin.
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model.onnx), sess_options=options, providers=ort.get_available_providers())
    http = httpclient.InferenceServerClient(info.http_url)
    grpc = grpcclient.InferenceServerClient(info.grpc_url)
    rng = np.random.default_rng(seed)
    by_batch = {}
    for batch in batches:
        images = rng.integers(0, 256, (batch, spec.input_size, spec.input_size, 3), dtype=np.uint8)
        tensor = torch.from_numpy(images)

        def run_eager():
            with torch.inference_mode():
                return eager(tensor)

        calls = {
            "eager": run_eager,
            "onnxruntime": lambda: session.run(["embeddings"], {"images": images}),
            "triton_http": _triton_call(http, httpclient, model.name, images),
            "triton_grpc": _triton_call(grpc, grpcclient, model.name, images),
        }
        samples = time_in_rounds(calls, runs, warmup)
        by_batch[str(batch)] = {path: summarise(samples[path], batch) for path in PATHS}
        row = by_batch[str(batch)]
        log.info("%s batch %d: p50 eager %.2f, onnxruntime %.2f, HTTP %.2f, gRPC %.2f ms", model.name, batch,
                 *(row[p]["p50_ms"] for p in PATHS))
    http.close()
    grpc.close()
    return {"latency": by_batch, "ratios": ratios(by_batch),
            "gflops_per_image": round(flops_per_image(eager, spec.input_size) / 1e9, 4)}


def ratios(by_batch: dict) -> dict:
    """Per batch: onnxruntime's speed-up over eager, Triton's added milliseconds over onnxruntime (p50)."""
    out = {}
    for batch, row in by_batch.items():
        ort_p50 = row["onnxruntime"]["p50_ms"]
        out[batch] = {
            "onnxruntime_speedup_over_eager": round(row["eager"]["p50_ms"] / ort_p50, 3),
            "grpc_overhead_ms": round(row["triton_grpc"]["p50_ms"] - ort_p50, 3),
            "http_overhead_ms": round(row["triton_http"]["p50_ms"] - ort_p50, 3),
        }
    return out


def _inference_counts(client, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def measure_concurrency(model: ServedModel, info, levels: list[int], requests_per_client: int, seed: int = 0) -> list:
    """Single-image gRPC requests from `level` threads, each with its own client."""
    size = model.spec.input_size
    image = np.random.default_rng(seed).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    monitor = grpcclient.InferenceServerClient(info.grpc_url)
    rows = []
    for level in levels:
        clients = [grpcclient.InferenceServerClient(info.grpc_url) for _ in range(level)]
        calls = [_triton_call(c, grpcclient, model.name, image) for c in clients]
        for call in calls:  # warm-up: every connection open before timing
            call()
        barrier = threading.Barrier(level)

        def client_loop(call) -> list[float]:
            barrier.wait()
            seconds = []
            for _ in range(requests_per_client):
                started = time.perf_counter()
                call()
                seconds.append(time.perf_counter() - started)
            return seconds

        before = _inference_counts(monitor, model.name)
        started = time.perf_counter()
        with ThreadPoolExecutor(level) as pool:
            samples = [s for client_samples in pool.map(client_loop, calls) for s in client_samples]
        wall = time.perf_counter() - started
        after = _inference_counts(monitor, model.name)
        executions = max(1, after[1] - before[1])
        row = {"clients": level, "requests": len(samples), **summarise(samples),
               "images_per_s": round(len(samples) / wall, 1),
               "mean_batch_formed": round((after[0] - before[0]) / executions, 2)}
        rows.append(row)
        log.info("%s %d clients: %.1f img/s, p50 %.2f ms, p99 %.2f ms, mean batch %.2f", model.name, level,
                 row["images_per_s"], row["p50_ms"], row["p99_ms"], row["mean_batch_formed"])
        for client in clients:
            client.close()
    monitor.close()
    return rows


def run(models: list[ServedModel], repo: Path, run_dir: Path, *, batches: list[int], runs: int, warmup: int,
        concurrency: list[int], requests_per_client: int) -> list[dict]:
    results = []
    with running_triton(repo, run_dir) as info:
        for i, model in enumerate(models, 1):
            log.info("[%d/%d] %s (%s)", i, len(models), model.name, model.weights)
            row = {"encoder": model.name, "backbone": model.spec.backbone, "input_size": model.spec.input_size,
                   "embedding_dim": model.spec.embedding_dim, "weights": model.weights,
                   **measure_paths(model, info, batches, runs, warmup),
                   "concurrency": measure_concurrency(model, info, concurrency, requests_per_client)}
            results.append(row)
    return results
