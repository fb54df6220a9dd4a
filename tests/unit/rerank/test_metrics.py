"""Ranking values under the position-bias curve, NDCG and the bootstrap uplift."""

from __future__ import annotations

import numpy as np
import pytest

from adfed.rerank.metrics import (
    activity_bucket,
    ndcg_at_k,
    order_by,
    position_weights,
    uplift,
    value_at_k,
)


def test_value_at_k_weights_positions_by_the_curve() -> None:
    # Prepare: one request, values 1, 3, 2 shown as 1, 0, 2
    value = np.array([[1.0, 3.0, 2.0]])
    order = np.array([[1, 0, 2]])
    # Execute
    got = value_at_k(order, value, 2)
    # Assert: 3 * 1 + 1 * 1/log2(3)
    assert got[0] == pytest.approx(3.0 + 1.0 / np.log2(3.0))
    assert value_at_k(order, value, 10)[0] == pytest.approx(3.0 + 1.0 / np.log2(3.0) + 2.0 / np.log2(4.0))


def test_oracle_order_has_ndcg_one_and_reverse_less() -> None:
    rel = np.random.default_rng(0).random((50, 20))
    assert np.allclose(ndcg_at_k(order_by(rel), rel, 5), 1.0)
    assert (ndcg_at_k(order_by(-rel), rel, 5) < 1.0).all()


def test_uplift_interval_brackets_the_value_and_is_zero_for_equal_orders(rng: np.random.Generator) -> None:
    base = rng.random(400)
    new = base * 1.2 + rng.normal(0, 0.05, 400)
    up = uplift(new, base, rng, reps=300)
    assert up.low < up.value < up.high
    assert up.value == pytest.approx(new.sum() / base.sum() - 1)
    same = uplift(base, base, rng, reps=50)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)


def test_uplift_checks_its_inputs(rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="one length"):
        uplift(np.ones(3), np.ones(4), rng)
    assert np.isnan(uplift(np.zeros(0), np.zeros(0), rng).value)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        position_weights(0)


def test_activity_buckets() -> None:
    assert activity_bucket(np.array([0, 10, 11, 50, 51, 900])).tolist() == [0, 0, 1, 1, 2, 2]
