"""Latency samples and their summary, the same way for every benchmark."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def summarise(seconds: list[float], items_per_call: int | None = None) -> dict:
    """p50/p95/p99/mean in milliseconds; with `items_per_call`, items per second from the mean
    call time (meaningless for calls that overlap, so those leave it out)."""
    ms = np.asarray(seconds) * 1000
    mean = float(ms.mean())
    summary = {
        "p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3), "mean_ms": round(mean, 3), "runs": len(ms),
    }
    if items_per_call is not None:
        summary["items_per_s"] = round(items_per_call * 1000 / mean, 1)
    return summary


def time_in_rounds(calls: dict[str, Callable[[], object]], runs: int, warmup: int, rounds: int = 5,
                   pause_s: float = 0.2) -> dict[str, list[float]]:
    """Seconds per call of each function, `runs` in all, measured in blocks: every round runs each
    function's block in turn, so a slow spell of a shared machine falls on every path alike.

    Calls of different paths are never interleaved one by one: onnxruntime's (and Triton's)
    worker threads spin for a while after each run, and would steal the cores from whatever
    runs next; each block starts after a pause and its own warm-up calls instead.
    """
    samples: dict[str, list[float]] = {name: [] for name in calls}
    per_round = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]
    for count in per_round:
        for name, call in calls.items():
            time.sleep(pause_s)
            for _ in range(warmup):
                call()
            for _ in range(count):
                started = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - started)
    return samples
