"""The compact-codes benchmark's seed summary: a goal is judged on the mean of several seeds."""
from __future__ import annotations

import pytest

from benchmarks.compact_codes import SIZES, markdown, summary


def _row(method: str, bits: int, seed: int, mmv: float) -> dict:
    return {"method": method, "bits": bits, "seed": seed, "mMV@5": mmv, "mAP@5": mmv + 0.01, "flat_mMV@5": 0.74,
            "flat_mAP@5": 0.75, "recall@10_vs_flat": 0.5 + seed / 10, "bytes_per_item": bits // 8,
            "flat_bytes_per_item": 512, "latency_ms": {s: 0.1 for s in SIZES} if seed == 0 else {},
            "flat_latency_ms": {}}


def test_summary_gives_each_method_and_code_length_its_mean_and_range_over_seeds():
    rows = [_row(m, bits, seed, mmv) for bits in (16, 64) for seed, mmv in ((0, 0.70), (1, 0.74), (2, 0.72))
            for m in ("spq (own codes)", "spq + FAISS PQ")]
    merged = summary(rows)
    assert [(r["method"], r["bits"]) for r in merged] == [
        ("spq (own codes)", 16), ("spq + FAISS PQ", 16), ("spq (own codes)", 64), ("spq + FAISS PQ", 64)]
    first = merged[0]
    assert first["seeds"] == [0, 1, 2] and "seed" not in first
    assert first["mMV@5"] == {"mean": pytest.approx(0.72), "min": 0.70, "max": 0.74}
    assert first["recall@10_vs_flat"] == {"mean": pytest.approx(0.6), "min": 0.5, "max": 0.7}
    assert first["latency_ms"] == {s: 0.1 for s in SIZES}  # the first seed's timing, not a mean of absent ones
    table = markdown({"seeds": [0, 1, 2], "summary": merged})
    assert ("| spq (own codes) | 16 | 2 | 0.720 (0.700-0.740) | 0.730 (0.710-0.750) | 0.740 (0.740-0.740) | "
            "0.750 (0.750-0.750) |") in table
