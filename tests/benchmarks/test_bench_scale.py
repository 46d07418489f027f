"""`histoseek bench scale`' parts on small inputs (the whole run embeds 2,000 real tiles and
builds eight 100k-item indexes: its results are in benchmarks/results/scale.*)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from benchmarks import scale_indexes, scale_report
from benchmarks.bench_scale import embedding_throughput
from histoseek.processes import descendants


@pytest.fixture(scope="module")
def small_collection():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 16)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    vectors, items = scale_indexes.collection(real, [f"class{i % 3}" for i in range(60)], 3000)
    return vectors, items, real[:12]


@pytest.mark.parametrize("backend, kind", [("faiss", "flat"), ("faiss", "hnsw"), ("milvus", "flat")])
def test_backends_are_measured_through_the_index_folder(tmp_path, small_collection, backend, kind):
    vectors, items, queries = small_collection
    assert {i.source for i in items} <= {f"site-{s:02d}" for s in range(100)} and len({i.label for i in items}) == 3
    row = scale_indexes.measure(backend, kind, vectors, items, queries, tmp_path,
                                milvus_uri=str(tmp_path / "m.db") if backend == "milvus" else None)
    assert (row["backend"], row["type"], row["items"]) == (backend, kind, 3000)
    assert row["recall@10"] >= (1.0 if kind == "flat" else 0.9) and 0 < row["p50_ms"] <= row["p99_ms"]
    assert [f["percent"] for f in row["filtered"]] == [1, 10, 50]
    for f in row["filtered"]:  # never outside the filter, never short (30+ items match at 1 %)
        assert f["outside_filter"] == 0 and f["short_results"] == 0 and f["recall@10"] >= 0.9
    assert row["code_bytes_per_item"] or row["index_bytes_per_item"]


@pytest.mark.slow
def _running_rays() -> set[int]:
    return {pid for pid, args in descendants([1]).items()
            if ("raylet" in args or "gcs_server" in args) and "<defunct>" not in args}  # zombies: dead, unreaped


def test_embedding_throughput_on_ray_equals_one_process(tmp_path, synth_data, triton_server, triton_repo):
    before = _running_rays()
    rows = embedding_throughput("tiny", synth_data, triton_server.grpc_url, triton_repo, [1], tmp_path, cpus=1)
    assert [r["mode"] for r in rows] == ["single process", "Ray, 1 actor"]
    assert all(r["tiles"] == 24 and r["tiles_per_s"] > 0 for r in rows)
    assert rows[1]["max_abs_diff_vs_single"] <= 1e-5
    assert not _running_rays() - before  # the benchmark's cluster is gone with it


def test_report_table_sizing_and_figure(tmp_path):
    filtered = [{"percent": p, "p50_ms": 1.0, "p99_ms": 2.0, "recall@10": 0.9, "short_results": 0,
                 "outside_filter": 0} for p in (1, 10, 50)]
    report = {
        "encoder": "dml (cpu)", "data": "tiles", "catalogue_bytes_per_item": 7800,
        "settings": {"items": 100_000, "queries": 200, "workers": [1, 2], "cpus": 2, "k": 10},
        "embedding": [{"mode": "single process", "tiles": 2000, "seconds": 20.0, "tiles_per_s": 100.0},
                      {"mode": "Ray, 1 actor", "tiles": 2000, "seconds": 25.0, "tiles_per_s": 80.0,
                       "max_abs_diff_vs_single": 0.0}],
        "indexes": [{"backend": b, "type": t, "items": 100_000, "build_s": 1.0, "p50_ms": 0.5, "p99_ms": 1.0,
                     "recall@10": 0.95, "filtered": filtered, "code_bytes_per_item": c, "index_bytes_per_item": c}
                    for b, t, c in (("faiss", "flat", 520), ("milvus", "hnsw", 1300))],
    }
    report["sizing"] = sizing = scale_report.sizing(report)
    assert sizing["embedding_node_hours"] == round(1e9 / 100 / 3600) and sizing["gpu_rate_needed_10_nodes_one_week"] == 165
    assert [r["archive_tb"] for r in sizing["indexes"]] == [0.52, 1.3] and sizing["catalogue_tb"] == 7.8
    table = scale_report.markdown(report)
    assert "| Ray, 1 actor | 2,000 | 25.0 | 80.0 | 0.0e+00 |" in table and "| milvus | hnsw | 1300 | 1.3 | 5 |" in table
    scale_report.plot(report, tmp_path / "scale.png")
    with Image.open(tmp_path / "scale.png") as image:
        assert image.size[0] > 800
