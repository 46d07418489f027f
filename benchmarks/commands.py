"""The two `histoseek bench` commands: set up what is measured, measure, write the results."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from benchmarks import bench_encoders, bench_search, encoders_report, search_report
from benchmarks.machine import machine_stamp
from benchmarks.results_files import write_results
from benchmarks.served_models import encoder_names, prepare_models, running_triton
from histoseek.dataset import read_dataset
from histoseek.errors import HistoseekError
from server.index.build import build_index
from server.index.folder import MANIFEST_FILE
from training.data.synthetic import synthesize

log = logging.getLogger(__name__)


def bench_encoders_command(*, encoders: list[str] | None, preset: str, checkpoints: Path | None, batches: list[int],
                           runs: int, warmup: int, concurrency: list[int], requests_per_client: int,
                           workdir: Path, results: Path) -> str:
    names = encoder_names(encoders)
    started = time.monotonic()
    models = prepare_models(names, preset, workdir, checkpoints)
    rows = bench_encoders.run(models, workdir / "model_repository", workdir / "triton", batches=batches, runs=runs,
                              warmup=warmup, concurrency=concurrency, requests_per_client=requests_per_client)
    settings = {"preset": preset, "batches": batches, "runs": runs, "warmup": warmup, "concurrency": concurrency,
                "requests_per_client": requests_per_client}
    table = encoders_report.markdown(rows, settings, machine_stamp()["gpu"])
    write_results(results / "encoder_latency", {"settings": settings, "encoders": rows,
                                                "goals": encoders_report.goals(rows)},
                  table, lambda path: encoders_report.plot(rows, path))
    log.info("%d encoders measured in %.1f min; results in %s", len(rows), (time.monotonic() - started) / 60, results)
    return table


def _png_queries(count: int, workdir: Path) -> list[bytes]:
    """`count` 256 px PNG tiles, as a user would upload them (not seen by the index)."""
    folder = workdir / f"query_tiles_{count}"
    if not folder.is_dir():
        synthesize(folder, classes=6, per_class=math.ceil(count / 6), size=256, seed=12345)
    dataset = read_dataset(folder)
    return [dataset.absolute(item).read_bytes() for item in dataset.items[:count]]


def _synthetic_indexes(names: list[str], items: int, workdir: Path, triton_url: str) -> list[Path]:
    tiles = workdir / f"index_tiles_{items}"
    if not tiles.is_dir():
        log.info("synthesising %d tiles for the indexes", items)
        synthesize(tiles, classes=6, per_class=math.ceil(items / 6), size=64, seed=0)
    indexes = []
    for name in names:
        out = workdir / f"indexes_{items}" / name
        if not (out / MANIFEST_FILE).is_file():
            log.info("building a flat index of %d items for %s through Triton", items, name)
            build_index(name, tiles, out, triton_url=triton_url, batch=32, repo=workdir / "model_repository")
        indexes.append(out)
    return indexes


def bench_search_command(*, indexes: list[Path] | None, triton_url: str | None, encoders: list[str] | None,
                         preset: str, checkpoints: Path | None, items: int, queries: int, sizes: list[int],
                         types: list[str], workdir: Path, results: Path) -> str:
    started = time.monotonic()
    query_images = _png_queries(queries, workdir)
    settings = {"queries": queries, "faiss_sizes": sizes, "faiss_types": types}
    if indexes:
        if not triton_url:
            raise HistoseekError("--index needs --triton-url: the Triton that serves those indexes' models")
        report = bench_search.run(indexes, triton_url, workdir, query_images, sizes, types)
    else:
        names = encoder_names(encoders)
        prepare_models(names, preset, workdir, checkpoints)
        settings |= {"preset": preset, "items": items}
        with running_triton(workdir / "model_repository", workdir / "triton") as info:
            built = _synthetic_indexes(names, items, workdir, info.grpc_url)
            report = bench_search.run(built, info.grpc_url, workdir, query_images, sizes, types)
    table = search_report.markdown(report, settings)
    write_results(results / "search_latency", {"settings": settings, **report}, table,
                  lambda path: search_report.plot(report, path))
    log.info("search benchmark done in %.1f min; results in %s", (time.monotonic() - started) / 60, results)
    return table
