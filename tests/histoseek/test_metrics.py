"""Retrieval metrics against values computed by hand."""
import numpy as np
import pytest

from histoseek.metrics import exact_neighbours, majority_label, retrieval_metrics


def test_metrics_match_hand_computed_values():
    # Query "a": ranking a, b, a, a, b -> relevant at ranks 1, 3, 4.
    # P@5 = 3/5; AP@5 = (1/1 + 2/3 + 3/4) / 3; majority a (3 of 5) -> vote right.
    # Query "b": ranking a, a, b, a, c -> relevant at rank 3 only.
    # P@5 = 1/5; AP@5 = (1/3) / 1; majority a -> vote wrong.
    ranked = [["a", "b", "a", "a", "b"], ["a", "a", "b", "a", "c"]]
    m = retrieval_metrics(["a", "b"], ranked, [1, 5])
    assert m["P@1"] == pytest.approx((1 + 0) / 2)
    assert m["P@5"] == pytest.approx((3 / 5 + 1 / 5) / 2)
    assert m["mAP@5"] == pytest.approx(((1 + 2 / 3 + 3 / 4) / 3 + 1 / 3) / 2)
    assert m["mMV@5"] == pytest.approx(0.5)
    assert m["mAP@1"] == pytest.approx(0.5)


def test_majority_tie_goes_to_the_better_ranked_label():
    assert majority_label(["b", "a", "a", "b"]) == ("b", 0.5)
    assert majority_label([]) == ("", 0.0)


def test_no_relevant_result_scores_zero():
    m = retrieval_metrics(["x"], [["a", "b"]], [2])
    assert m["P@2"] == 0 and m["mAP@2"] == 0 and m["mMV@2"] == 0


def test_exact_neighbours_excludes_the_query_group_and_ranks_by_similarity():
    rng = np.random.default_rng(0)
    db = rng.normal(size=(50, 8)).astype(np.float32)
    groups = [f"g{i // 5}" for i in range(50)]  # groups of five
    nn = exact_neighbours(db, groups, db, groups, k=10)
    sims = db @ db.T
    for i, row in enumerate(nn):
        assert all(groups[j] != groups[i] for j in row), "own group must be excluded"
        allowed = [j for j in range(50) if groups[j] != groups[i]]
        expected = sorted(allowed, key=lambda j: -sims[i, j])[:10]
        assert list(row) == expected


def test_exact_neighbours_pads_with_minus_one_when_candidates_run_out():
    db = np.eye(3, dtype=np.float32)
    nn = exact_neighbours(db, ["a", "a", "b"], db, ["a", "a", "b"], k=3)
    assert list(nn[0]) == [2, -1, -1]
    assert list(nn[2]) == [0, 1, -1] or list(nn[2]) == [1, 0, -1]
