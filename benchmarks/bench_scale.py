"""`histoseek bench scale`: embedding on Ray against one process, and the index backends at scale.

1. Embedding throughput: `histoseek index build` of the same real tiles through the same
   Triton, single-process and on a local Ray cluster (started once, `ray start --head`,
   so that its start-up is not counted) with 1 and 2 embedding actors; the Ray builds'
   vectors are compared with the single-process build's.
2. FAISS and Milvus Lite at `--items` items (benchmarks/scale_indexes.py): build time,
   query p50/p99 and recall@10 per index type, and filtered searches at 1/10/50 %.
3. A sizing of a 10^9-tile archive from those measured rates (benchmarks/scale_report.py).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from benchmarks import scale_indexes, scale_report
from benchmarks.results_files import write_results
from histoseek.dataset import read_dataset
from histoseek.errors import HistoseekError
from histoseek.processes import kill_tree
from server.index.backends.faiss_backend import stored_vectors
from server.index.build import build_index
from server.triton import free_port

log = logging.getLogger(__name__)
FAISS_TYPES = ("flat", "hnsw", "ivfpq", "pq")
MILVUS_LITE_TYPES = ("flat", "hnsw", "ivf_flat", "ivf_sq8")


@contextmanager
def local_ray_cluster(cpus: int) -> Iterator[str]:
    """A one-node Ray cluster in its own processes (`ray start --head --block`) on loopback;
    its address. Token authentication is off for it and for this driver: the cluster lives
    for the benchmark only and listens on 127.0.0.1. It is stopped by killing its processes
    by pid (`ray stop` would stop every Ray on the machine)."""
    import ray

    port = free_port()
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # its own, and short: Ray's socket paths are
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
                             f"--num-cpus={cpus}", "--include-dashboard=false", "--node-ip-address=127.0.0.1",
                             f"--temp-dir={temp}", "--disable-usage-stats"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # up once a driver can join it
            if head.poll() is not None or time.monotonic() > deadline:
                raise HistoseekError(f"the local Ray cluster did not start (ray start exited with {head.poll()})")
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
                ray.shutdown()
                break
            except ConnectionError:
                time.sleep(1)
        yield address
    finally:
        kill_tree([head])
        shutil.rmtree(temp, ignore_errors=True)
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE")
        else:
            os.environ["RAY_AUTH_MODE"] = previous


def embedding_throughput(encoder: str, data: Path, triton_url: str, repo: Path, workers: list[int],
                         workdir: Path, cpus: int) -> list[dict]:
    tiles = len(read_dataset(data))
    builds = workdir / "throughput"
    shutil.rmtree(builds, ignore_errors=True)

    def timed(label: str, out: Path, **ray) -> dict:
        started = time.perf_counter()
        build_index(encoder, data, out, triton_url=triton_url, repo=repo, batch=32, **ray)
        seconds = time.perf_counter() - started
        log.info("%s: %d tiles in %.1f s", label, tiles, seconds)
        return {"mode": label, "tiles": tiles, "seconds": round(seconds, 1), "tiles_per_s": round(tiles / seconds, 1)}

    rows = [timed("single process", builds / "single")]
    reference = stored_vectors(builds / "single")
    with local_ray_cluster(cpus) as address:
        for count in workers:
            out = builds / f"ray_{count}"
            row = timed(f"Ray, {count} actor{'s' * (count > 1)}", out, ray=address, ray_workers=count)
            row["max_abs_diff_vs_single"] = float(np.abs(stored_vectors(out) - reference).max())
            rows.append(row)
    return rows


def _embeddings(index_dir: Path) -> tuple[np.ndarray, list[str]]:
    """The vectors of a built flat index and their items' labels, in id order."""
    from server.index.folder import IndexFolder

    folder = IndexFolder(index_dir)
    try:
        items = folder.store.lookup(range(folder.store.count()))
    finally:
        folder.close()
    return stored_vectors(index_dir), [items[i].label for i in sorted(items)]


def bench_scale_command(*, checkpoint: Path, data: Path, items: int, queries: int, workers: list[int],
                        faiss_types: list[str], milvus_types: list[str], workdir: Path, results: Path) -> str:
    from benchmarks.served_models import running_triton
    from export.export_checkpoint import export_checkpoint
    from export.repository import latest_version_dir

    if not (Path(checkpoint) / "encoder.json").is_file():
        raise HistoseekError(f"--checkpoint {checkpoint} is not a checkpoint folder; train one with "
                             f"`histoseek train --encoder dml --data DIR --out {checkpoint}`")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = json.loads((Path(checkpoint) / "encoder.json").read_text())
    name, repo = spec["name"], workdir / "model_repository"
    if latest_version_dir(repo / name) is None:
        export_checkpoint(Path(checkpoint), repo, verify_data=Path(data))
    cpus = max(1, len(os.sched_getaffinity(0)))
    report: dict = {"encoder": f"{name} ({spec.get('preset', '')}) from {checkpoint}", "data": str(data),
                    "settings": {"items": items, "queries": queries, "workers": workers, "cpus": cpus, "k": 10}}
    with running_triton(repo, workdir / "triton") as info:
        report["embedding"] = embedding_throughput(name, Path(data), info.grpc_url, repo, workers, workdir, cpus)
    single = workdir / "throughput" / "single"
    # items.sqlite (rows, 128 px JPEG thumbnails) per item: what the folder adds to any backend.
    tiles = report["embedding"][0]["tiles"]
    report["catalogue_bytes_per_item"] = round((single / "items.sqlite").stat().st_size / tiles)
    real, labels = _embeddings(single)
    # Tiles held out of the sampling are the queries: real vectors the collection was not made around.
    order = np.random.default_rng(1).permutation(len(real))
    held_out, centres = order[:min(queries, len(real) // 5)], order[min(queries, len(real) // 5):]
    vectors, item_rows = scale_indexes.collection(real[centres], [labels[i] for i in centres], items)
    indexes = workdir / "indexes"
    report["indexes"] = [scale_indexes.measure("faiss", kind, vectors, item_rows, real[held_out], indexes)
                         for kind in faiss_types]
    for kind in milvus_types:
        uri = str(indexes / f"milvus_{kind}.db")
        shutil.rmtree(uri, ignore_errors=True)
        report["indexes"].append(scale_indexes.measure("milvus", kind, vectors, item_rows, real[held_out], indexes,
                                                       milvus_uri=uri))
    report["sizing"] = scale_report.sizing(report)
    table = scale_report.markdown(report)
    write_results(Path(results) / "scale", report, table, lambda path: scale_report.plot(report, path))
    return table
