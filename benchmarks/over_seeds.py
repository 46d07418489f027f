"""Scores over several training seeds: single runs differ by a few hundredths, so a goal is
judged on the mean, with the range beside it."""
from __future__ import annotations

import numpy as np


def over_seeds(runs: list[dict], names) -> dict[str, dict[str, float]]:
    """Mean, min and max of each named score over the runs (one dict of scores per seed)."""
    return {name: {"mean": round(float(np.mean([r[name] for r in runs])), 4),
                   "min": round(float(min(r[name] for r in runs)), 4),
                   "max": round(float(max(r[name] for r in runs)), 4)} for name in names}


def cell(stats: dict[str, float], several: bool) -> str:
    """A table cell: the mean, and its range when more than one seed made it."""
    return f"{stats['mean']:.3f}" + (f" ({stats['min']:.3f}-{stats['max']:.3f})" if several else "")


def error_bars(stats: list[dict[str, float]]) -> np.ndarray:
    """matplotlib's `yerr` (2 x N: below, above the mean) for the ranges of `stats`."""
    return np.array([[s["mean"] - s["min"], s["max"] - s["mean"]] for s in stats]).T
