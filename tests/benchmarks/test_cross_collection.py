"""The cross-collection benchmark's rows: 32 queries are too few to judge one run, so each
encoder's row is the mean and range over its seeds."""
from __future__ import annotations

import pytest

from benchmarks.cross_collection import encoder_row, markdown


def _run(seed: int, steps: int, raw: float, normed: float) -> dict:
    return {"seed": seed, "minutes": 2.0, "steps": steps, "metrics": {"mMV@5": raw, "P@5": raw - 0.1},
            "metrics_stain_normalised": {"mMV@5": normed, "P@5": normed - 0.1}}


def test_an_encoder_row_is_the_mean_and_range_of_its_seeds_on_both_query_sets():
    row = encoder_row("clip", [_run(0, 50, 0.6875, 0.75), _run(1, 67, 0.8125, 0.75), _run(2, 50, 0.75, 0.625)])
    assert row["model"] == "clip (50-67 steps)" and row["seeds"] == [0, 1, 2] and len(row["per_seed"]) == 3
    assert row["metrics"]["mMV@5"] == {"mean": pytest.approx(0.75), "min": 0.6875, "max": 0.8125}
    assert row["metrics_stain_normalised"]["mMV@5"] == {"mean": pytest.approx(0.7083), "min": 0.625, "max": 0.75}
    assert encoder_row("dml", [_run(0, 50, 0.5, 0.5)])["model"] == "dml (50 steps)"


def test_the_table_gives_ranges_only_where_several_seeds_made_a_row():
    one = encoder_row("dml", [_run(0, 50, 0.625, 0.5)])
    three = encoder_row("clip", [_run(s, 50, 0.6875 + s / 16, 0.75) for s in range(3)])
    single = {"model": "colour histogram", "seeds": [], "metrics": one["metrics"],
              "metrics_stain_normalised": one["metrics_stain_normalised"]}
    table = markdown({"queries": "q", "query_count": 32, "database": "d", "label_map": "m", "stain_reference": "r",
                      "rows": [single, one, three]})
    assert "| colour histogram | – | 0.625 | 0.525 | 0.500 | 0.400 |" in table
    assert "| dml (50 steps) | 1 | 0.625 | 0.525 | 0.500 | 0.400 |" in table
    assert "| clip (50 steps) | 3 | 0.750 (0.688-0.812) | 0.650 (0.588-0.713) | 0.750 (0.750-0.750) |" in table
