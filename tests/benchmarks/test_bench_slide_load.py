"""`histoseek bench slides --load`' parts that need no server: its encoder obeys the export
contract, and its report becomes a table and a figure (the load itself is tested against a
real server in tests/server/slides/test_slide_admission.py)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from benchmarks.bench_slide_load import INPUT, _cnn_onnx, _markdown, _plot


def test_the_benchmark_encoder_obeys_the_contract(tmp_path):
    session = ort.InferenceSession(str(_cnn_onnx(tmp_path / "cnn.onnx")), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (3, INPUT, INPUT, 3), dtype=np.uint8)
    (out,) = session.run(["embeddings"], {"images": images})
    assert out.shape == (3, 64) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5) and not np.allclose(out[0], out[1])


def test_report_table_and_figure(tmp_path):
    row = {"concurrent": 16, "served": 9, "refused": 7, "timed_out": 0, "other": 0, "retry_after_s": [3, 4],
           "slowest_refusal_s": 0.4, "slowest_served_s": 2.9, "patch_p50_ms": 15.0, "patch_p99_ms": 40.0,
           "patch_samples": 50, "peak_rss_mb": 250.0, "settled_rss_mb": 200.0}
    run = {"request_timeout_s": 3.0, "query_tiles": 256, "alone_s": 0.6, "start_rss_mb": 180.0,
           "idle": {"patch_p50_ms": 12.0, "patch_p99_ms": 25.0, "samples": 200},
           "rows": [{**row, "concurrent": 1, "served": 1, "refused": 0, "retry_after_s": []}, row]}
    report = {"slide_size": 6144, "slide_mb": 10.6, "tile": 32, "mpp": 0.5, "model": "bench_cnn", "runs": [run, run]}
    table = _markdown(report)
    assert "| 16 | 9 | 7 (3, 4) | 0 | 0.4 s | 2.9 s | 15.0 / 40.0 ms | 250.0 MB | 200.0 MB |" in table
    assert table.count("**Deadline 3 s**") == 2
    _plot(report, tmp_path / "load.png")
    assert (tmp_path / "load.png").stat().st_size > 10_000
