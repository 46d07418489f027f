"""`histoseek bench search`: `/v1/search` end to end, and FAISS search time against index size.

End to end: the API runs as its own process (`histoseek serve`, as deployed) over the
index folders; queries are PNG uploads of 256 px tiles sent one at a time over loopback
HTTP, so a latency is decode + preprocess + Triton embedding + FAISS search + the HTTP
and JSON around them. The API's own per-stage timings come back in each response.

FAISS: for every embedding dimension measured, collections of 1k to 1M vectors sampled
around the vectors stored in the encoder's index, in each index type as
`histoseek index build` makes it (same defaults), searched one query at a time on one
thread as the server does; recall@10 against the exact flat index of the same vectors.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

import faiss
import httpx
import numpy as np

from benchmarks.timing import summarise
from benchmarks.vectors import realistic, recall_at_10
from histoseek.errors import HistoseekError
from histoseek.imaging import decode_image, resize_and_crop
from histoseek.processes import histoseek_command, wait_http
from server.embedder import Embedder
from server.index.backends.faiss_backend import FAISS_FILE
from server.index.folder import IndexFolder
from server.index.types import code_bytes_per_item, new_faiss_index
from server.triton import free_port

log = logging.getLogger(__name__)
STAGES = ("decode", "preprocess", "embed", "search", "total")
GOAL_P50_MS = 100.0


def serve_indexes(indexes: list[Path], triton_url: str, workdir: Path) -> tuple[str, subprocess.Popen]:
    """`histoseek serve` over exactly these index folders (linked into one folder), on a free port."""
    served = workdir / "served_indexes"
    shutil.rmtree(served, ignore_errors=True)
    served.mkdir(parents=True)
    for index in indexes:
        (served / index.name).symlink_to(index.resolve(), target_is_directory=True)
    port = free_port()
    command = histoseek_command("serve", "--indexes", served, "--triton-url", triton_url, "--port", port)
    log_path = workdir / "api.log"
    with open(log_path, "wb") as log_file:  # the API writes to its own copy of the file descriptor
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/readyz", "the search API", process, output=str(log_path))
    except BaseException:
        process.kill()
        raise
    return url, process


def measure_endpoint(url: str, index: str, queries: list[bytes], warmup: int = 5) -> dict:
    """Sequential searches: client-side latency percentiles and the API's median stage timings."""
    seconds, stages = [], {s: [] for s in STAGES}
    warm = [queries[i % len(queries)] for i in range(warmup)]
    with httpx.Client(base_url=url, timeout=60) as client:
        for i, image in enumerate(warm + queries):
            started = time.perf_counter()
            response = client.post("/v1/search", files={"image": ("query.png", image, "image/png")},
                                   data={"index": index, "k": "10"})
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise HistoseekError(f"search on {index} failed ({response.status_code}): {response.text}")
            if i >= warmup:
                seconds.append(elapsed)
                for stage in STAGES:
                    stages[stage].append(response.json()["timings_ms"][stage])
    summary = summarise(seconds)
    return {**summary, "server_median_ms": {s: round(float(np.median(v)), 3) for s, v in stages.items()},
            "goal_p50_under_100ms": summary["p50_ms"] < GOAL_P50_MS}


def base_vectors(folder: IndexFolder, triton_url: str, queries: list[bytes]) -> np.ndarray:
    """The index's own stored vectors (thousands of distinct points, as a real collection has);
    the query tiles' embeddings when the index type cannot give its vectors back."""
    index = faiss.read_index(str(folder.path / FAISS_FILE))
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    try:
        return inner.reconstruct_n(0, inner.ntotal)
    except RuntimeError:  # e.g. an IVF index without a direct map
        embedder = Embedder(triton_url, folder.manifest["encoder"])
        size = int(embedder.spec()["input_size"])
        return embedder.embed(np.stack([resize_and_crop(decode_image(q), size) for q in queries]))


def faiss_sweep(dim: int, base: np.ndarray, sizes: list[int], types: list[str], seed: int = 0,
                n_queries: int = 200) -> list[dict]:
    """ms per query (one at a time, one thread) and recall@10 vs flat, per index type and size."""
    rng = np.random.default_rng(seed)
    queries = realistic(base, n_queries, 1, rng)
    threads = faiss.omp_get_max_threads()
    rows = []
    try:
        for size in sizes:
            vectors = realistic(base, size, 1, rng)
            exact = None
            for kind in types:
                built = time.perf_counter()
                index, params = new_faiss_index(kind, dim, vectors[: min(size, 100_000)])
                index.add_with_ids(vectors, np.arange(size))
                build_s = time.perf_counter() - built
                faiss.omp_set_num_threads(1)  # as `histoseek serve` searches
                index.search(queries[:5], 10)
                seconds, found = [], []
                for q in queries:
                    started = time.perf_counter()
                    found.append(index.search(q[None], 10)[1][0])
                    seconds.append(time.perf_counter() - started)
                faiss.omp_set_num_threads(threads)
                found = np.stack(found)
                exact = found if kind == "flat" else exact
                summary = summarise(seconds)
                rows.append({"dimension": dim, "type": kind, "items": size, "p50_ms": summary["p50_ms"],
                             "p99_ms": summary["p99_ms"], "build_s": round(build_s, 2), "params": params,
                             "code_bytes_per_item": code_bytes_per_item(index),
                             "recall@10_vs_flat": round(recall_at_10(found, exact), 4) if exact is not None else None})
                log.info("FAISS %s d=%d, %d items: p50 %.3f ms, recall@10 %s (built in %.1fs)", kind, dim, size,
                         summary["p50_ms"], rows[-1]["recall@10_vs_flat"], build_s)
    finally:
        faiss.omp_set_num_threads(threads)
    return rows


def run(indexes: list[Path], triton_url: str, workdir: Path, queries: list[bytes], sizes: list[int],
        types: list[str]) -> dict:
    folders = [IndexFolder(path) for path in indexes]
    url, api = serve_indexes(indexes, triton_url, workdir)
    endpoint = []
    try:
        for i, folder in enumerate(folders, 1):
            log.info("[%d/%d] /v1/search on %s (%d items, %s), %d queries", i, len(folders), folder.name,
                     folder.store.count(), folder.manifest["index_type"], len(queries))
            row = measure_endpoint(url, folder.name, queries)
            endpoint.append({"index": folder.name, "encoder": folder.manifest["encoder"],
                             "type": folder.manifest["index_type"], "items": folder.store.count(),
                             "dimension": folder.manifest["dimension"], **row})
            log.info("%s: p50 %.1f ms, p99 %.1f ms", folder.name, row["p50_ms"], row["p99_ms"])
    finally:
        api.terminate()
        api.wait(30)
    sweeps, seen = [], set()
    if "flat" in types:  # recall is measured against flat, so flat comes first
        types = ["flat"] + [t for t in types if t != "flat"]
    for folder in folders:
        dim = folder.manifest["dimension"]
        if dim not in seen:
            seen.add(dim)
            sweeps += faiss_sweep(dim, base_vectors(folder, triton_url, queries), sizes, types)
    return {"endpoint": endpoint, "faiss": sweeps}
