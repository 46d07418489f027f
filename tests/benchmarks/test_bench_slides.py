"""`histoseek bench slides`' measuring parts on small inputs (the whole run trains an encoder
and renders a 40,000 px slide: far too long for a test; its results are in benchmarks/results)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks.bench_slides import _around, markdown, plot, search_time


def _mosaics(count: int, dim: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    mosaics = [rng.normal(size=(int(rng.integers(16, 24)), dim)) for _ in range(count)]
    return [(m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32) for m in mosaics]


def test_archives_grow_around_real_mosaics_and_are_timed_exact_and_compact():
    real = _mosaics(12)
    rows = search_time(real, [12, 300])
    assert [(r["archive_slides"], r["index"]) for r in rows] == [(12, "flat"), (12, "ivfpq"), (300, "flat"),
                                                                 (300, "ivfpq")]
    assert rows[0]["vectors"] == sum(len(m) for m in real) and rows[2]["vectors"] > 300 * 16
    assert all(r["ms_per_query_slide"] > 0 for r in rows)
    assert rows[3]["bytes_per_vector"] < rows[2]["bytes_per_vector"] / 2  # the compact one is compact
    near = _around(real[0], np.random.default_rng(1))
    cosines = (near * real[0]).sum(axis=1)
    assert np.allclose(np.linalg.norm(near, axis=1), 1, atol=1e-5) and 0.8 < cosines.mean() < 0.98


def test_report_table_and_figure(tmp_path):
    report = {
        "encoder": "simclr (cpu)",
        "retrieval": {"slides": 40, "labels": ["a", "b", "c", "d"], "mosaic_top5_majority_vote": 0.95,
                      "single_tile_top5_majority_vote": 0.8, "query_ms_median": 300.0},
        "ingest": [{"side": 40_000, "slide_mb": 2600.0, "tiles": 10_000, "tiles_per_s": 90.0, "peak_rss_mb": 300.0}],
        "search_time": [{"archive_slides": n, "vectors": 20 * n, "index": kind, "ms_per_query_slide": 1.0 + n / 1000,
                         "bytes_per_vector": 5000 if kind == "flat" else 800}
                        for n in (100, 1000) for kind in ("flat", "ivfpq")],
    }
    table = markdown(report)
    assert "| slide mosaic (Yottixel median of best matches) | 0.950 |" in table and "40,000 x 40,000" in table
    plot(report, tmp_path / "slides.png")
    with Image.open(tmp_path / "slides.png") as image:
        assert image.size[0] > 800
