"""The refinement benchmark's scoring: marks, P@5 / vote, and the offline round on vectors."""
from __future__ import annotations

import numpy as np

from benchmarks.refine import _marks, _scores, markdown, offline_round


def test_marks_and_scores():
    assert _marks("a", [4, 7, 9], ["a", "b", "a"]) == ([4, 9], [7])
    assert _scores("a", ["a", "a", "b", "a", "c", "b"]) == (0.6, 1.0)
    assert _scores("a", ["b", "b", "a", "c", "c"]) == (0.2, 0.0)


def test_feedback_pulls_a_query_towards_its_own_class():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    labels = np.repeat(np.array(["x", "y", "z"]), 40)
    database = centres[np.repeat(np.arange(3), 40)] + rng.normal(scale=1.5, size=(120, 16))
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    # Queries halfway between their class and another: the first search is often wrong.
    queries = 0.55 * centres[[0, 1, 2] * 10] + 0.45 * centres[[1, 2, 0] * 10] + rng.normal(scale=1.0, size=(30, 16))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    result = offline_round(database, labels, queries, ["x", "y", "z"] * 10)
    assert result["queries"] == 30
    assert result["p5_after"] > result["p5_before"] + 0.1, result
    table = markdown({"data": "toy", "rows": [{"model": "m", "path": "offline", **result}]})
    assert "| m | offline |" in table and f"{result['p5_after'] - result['p5_before']:+.3f}" in table
