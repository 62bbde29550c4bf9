"""Exact per-batch mixing (`jaxasr.data.mixing`)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from jaxasr.data.mixing import batch_plan, exact_counts, paper_mixture


def test_equal_weights():
    assert exact_counts({"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}, 8) == {"a": 2, "b": 2, "c": 2, "d": 2}


def test_paper_mixture_counts():
    assert exact_counts(paper_mixture(0.6), 20) == {
        "source_audio": 6, "source_text": 4, "target_audio": 6, "target_text": 4}


def test_unnormalized_weights():
    assert exact_counts({"a": 1, "b": 3}, 8) == {"a": 2, "b": 6}
    assert exact_counts({"x": 0.1, "y": 0.2, "z": 0.7}, 10) == {"x": 1, "y": 2, "z": 7}


def test_ties_go_by_name_not_insertion_order():
    assert exact_counts({"c": 1, "b": 1, "a": 1}, 4) == {"a": 2, "b": 1, "c": 1}
    assert exact_counts({"c": 1, "a": 1, "b": 1}, 5) == {"a": 2, "b": 2, "c": 1}


def test_largest_remainder_sums_and_stays_within_one_row():
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(1, 6))
        weights = {f"c{i}": float(w) for i, w in enumerate(rng.uniform(0.2, 1.0, k))}
        batch = int(rng.integers(k * 5, 200))
        counts = exact_counts(weights, batch)
        assert sum(counts.values()) == batch
        total = sum(weights.values())
        for name, c in counts.items():
            assert abs(c - weights[name] / total * batch) < 1
        # The rows left after flooring go to the largest remainders.
        quota = {n: w / total * batch for n, w in weights.items()}
        got_extra = [quota[n] - np.floor(quota[n]) for n in counts if counts[n] > np.floor(quota[n])]
        no_extra = [quota[n] - np.floor(quota[n]) for n in counts if counts[n] == np.floor(quota[n])]
        if got_extra and no_extra:
            assert min(got_extra) >= max(no_extra) - 1e-9


def test_batch_too_small_names_component():
    with pytest.raises(ValueError, match="too small.*'b'"):
        exact_counts({"a": 0.95, "b": 0.05}, 8)
    assert exact_counts({"a": 0.95, "b": 0.05}, 20) == {"a": 19, "b": 1}


@pytest.mark.parametrize("weight", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_weight_names_component(weight):
    with pytest.raises(ValueError, match="'bad'"):
        exact_counts({"good": 1.0, "bad": weight}, 8)


@pytest.mark.parametrize("batch_size", [0, -4, 2.5])
def test_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        exact_counts({"a": 1.0}, batch_size)


def test_paper_mixture_shares():
    assert paper_mixture(0.6) == pytest.approx(
        {"source_audio": 0.3, "source_text": 0.2, "target_audio": 0.3, "target_text": 0.2})
    assert paper_mixture(0.6, target_share=0.25) == pytest.approx(
        {"source_audio": 0.45, "source_text": 0.3, "target_audio": 0.15, "target_text": 0.1})
    assert sum(paper_mixture(0.37, 0.8).values()) == pytest.approx(1.0)
    assert paper_mixture(1.0) == {"source_audio": 0.5, "target_audio": 0.5}  # zero shares are dropped
    assert paper_mixture(0.0) == {"source_text": 0.5, "target_text": 0.5}


@pytest.mark.parametrize("p", [-0.1, 1.2])
def test_paper_mixture_rejects_bad_p(p):
    with pytest.raises(ValueError, match="p"):
        paper_mixture(p)


def test_batch_plan_exact_and_shuffled():
    counts = exact_counts(paper_mixture(0.6), 20)
    plans = [batch_plan(counts, i, seed=3) for i in range(50)]
    for plan in plans:
        assert Counter(plan) == Counter(counts)
    assert len({tuple(p) for p in plans}) == 50  # each batch has its own row order
    assert batch_plan(counts, 7, seed=3) == plans[7]  # rebuildable from (seed, index) alone
    assert batch_plan(counts, 7, seed=4) != plans[7]
    # Rows are shuffled: every component lands at every position now and then.
    for pos in range(20):
        assert {p[pos] for p in plans} == set(counts)


def test_batch_plan_ignores_insertion_order():
    counts = {"a": 3, "b": 2, "c": 1}
    assert batch_plan(counts, 5, 0) == batch_plan(dict(reversed(counts.items())), 5, 0)


def test_batch_plan_rejects_bad_counts():
    with pytest.raises(ValueError, match="'b'"):
        batch_plan({"a": 2, "b": -1}, 0, 0)
    with pytest.raises(ValueError, match="'b'"):
        batch_plan({"a": 2, "b": 1.5}, 0, 0)
