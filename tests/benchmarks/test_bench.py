"""`histoseek bench encoders|search` end to end: real export, real Triton, real API process, real FAISS."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from benchmarks.commands import bench_encoders_command, bench_search_command
from server.index.build import build_index

pytestmark = pytest.mark.slow  # exports a model and starts Triton and the API


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def _results(folder, stem):
    report = json.loads((folder / f"{stem}.json").read_text())
    with Image.open(folder / f"{stem}.png") as plot:
        assert plot.size[0] > 800
    return report, (folder / f"{stem}.md").read_text()


def test_bench_encoders_measures_every_path_batch_and_concurrency(workdir, tmp_path):
    table = bench_encoders_command(encoders=["simclr"], preset="scratch", checkpoints=None, batches=[1, 3], runs=5,
                                   warmup=1, concurrency=[1, 3], requests_per_client=4, workdir=workdir,
                                   results=tmp_path)
    report, markdown = _results(tmp_path, "encoder_latency")
    assert markdown.startswith(table.rstrip("\n")) and "Measured on" in markdown and "**not measured**" in markdown
    assert report["machine"]["cores"] >= 1 and "onnxruntime" in report["machine"]["versions"]
    (row,) = report["encoders"]
    assert row["encoder"] == "simclr" and row["weights"] == "random init (latency only)"
    assert 0.2 < row["gflops_per_image"] < 0.4  # ResNet-18 at 64 px: 1.82 GFLOPs at 224 px x (64/224)^2
    for batch in ("1", "3"):
        paths = row["latency"][batch]
        assert set(paths) == {"eager", "onnxruntime", "triton_http", "triton_grpc"}
        for stats in paths.values():
            assert stats["runs"] == 5 and 0 < stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"]
        ratio = row["ratios"][batch]
        assert ratio["onnxruntime_speedup_over_eager"] == pytest.approx(
            paths["eager"]["p50_ms"] / paths["onnxruntime"]["p50_ms"], rel=1e-2)
        assert ratio["grpc_overhead_ms"] == pytest.approx(
            paths["triton_grpc"]["p50_ms"] - paths["onnxruntime"]["p50_ms"], abs=1e-2)
    assert [c["clients"] for c in row["concurrency"]] == [1, 3]
    for level in row["concurrency"]:
        assert level["requests"] == 4 * level["clients"] and level["images_per_s"] > 0
        assert 1 <= level["mean_batch_formed"] <= level["clients"]  # from Triton's own statistics
    assert row["concurrency"][0]["mean_batch_formed"] == 1
    (goal,) = report["goals"]
    assert goal["grpc_overhead_met"] == (row["ratios"]["1"]["grpc_overhead_ms"] <= 1.0)


def test_bench_search_on_synthetic_indexes(workdir, tmp_path):
    bench_search_command(indexes=None, triton_url=None, encoders=["simclr"], preset="scratch", checkpoints=None,
                         items=80, queries=6, sizes=[300, 1000], types=["hnsw", "flat", "pq"], workdir=workdir,
                         results=tmp_path)
    report, markdown = _results(tmp_path, "search_latency")
    (endpoint,) = report["endpoint"]
    assert endpoint["items"] == 84 and endpoint["type"] == "flat"  # 6 classes x ceil(80 / 6)
    assert endpoint["runs"] == 6 and endpoint["p50_ms"] > 0
    stages = endpoint["server_median_ms"]
    assert stages["embed"] > 0 and stages["total"] >= stages["embed"]
    assert endpoint["goal_p50_under_100ms"] == (endpoint["p50_ms"] < 100)
    faiss_rows = report["faiss"]
    assert [(r["type"], r["items"]) for r in faiss_rows] == [
        ("flat", 300), ("hnsw", 300), ("pq", 300), ("flat", 1000), ("hnsw", 1000), ("pq", 1000)]
    for r in faiss_rows:
        assert r["dimension"] == 512 and r["p50_ms"] > 0
        if r["type"] == "flat":
            assert r["recall@10_vs_flat"] == 1.0 and r["code_bytes_per_item"] == 2048
        else:
            assert 0 < r["recall@10_vs_flat"] <= 1.0
    assert "| simclr | `simclr` | flat | 84 |" in markdown


def test_bench_search_on_a_users_index(tmp_path, synth_data, triton_server):
    index = build_index("tiny", synth_data, tmp_path / "mine", triton_url=triton_server.grpc_url, batch=8)
    bench_search_command(indexes=[index], triton_url=triton_server.grpc_url, encoders=None, preset="cpu",
                         checkpoints=None, items=0, queries=4, sizes=[100], types=["flat"], workdir=tmp_path / "work",
                         results=tmp_path / "results")
    report, _ = _results(tmp_path / "results", "search_latency")
    assert [(r["index"], r["items"], r["runs"]) for r in report["endpoint"]] == [("mine", 24, 4)]
    assert [r["recall@10_vs_flat"] for r in report["faiss"]] == [1.0]


def test_unknown_encoder_and_missing_triton_url_are_clear_errors(tmp_path):
    run = subprocess.run([sys.executable, "-m", "histoseek_cli", "bench", "encoders", "--encoders", "nope",
                          "--workdir", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "unknown encoder 'nope'; registered: barlowtwins" in run.stderr
    run = subprocess.run([sys.executable, "-m", "histoseek_cli", "bench", "search", "--index", str(tmp_path),
                          "--workdir", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "--index needs --triton-url" in run.stderr
