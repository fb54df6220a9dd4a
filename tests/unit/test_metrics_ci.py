"""DeLong's AUC interval and the uncertainty figures of ``evaluate_predictions``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adfed.metrics import auc_ci, evaluate_predictions, safe_auc


def test_delong_interval_known_answer() -> None:
    # Prepare: positives 0.9 0.8 0.4, negatives 0.7 0.5 0.3 0.1. By hand: positive
    # placements 1, 1, 1/2 (var 1/12), negative placements 2/3, 2/3, 1, 1 (var 1/27);
    # AUC 5/6, variance (1/12)/3 + (1/27)/4 = 1/27.
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.4, 0.7, 0.5, 0.3, 0.1])
    # Execute
    auc, low, high = auc_ci(y, p)
    # Assert
    half = 1.959963984540054 * math.sqrt(1 / 27)
    assert auc == pytest.approx(5 / 6)
    assert low == pytest.approx(5 / 6 - half)
    assert high == 1.0  # 5/6 + half is above 1: clipped


def test_delong_ties_count_half_and_match_sklearn(rng: np.random.Generator) -> None:
    y = rng.random(500) < 0.2
    p = np.round(rng.random(500) + 0.3 * y, 1)  # many ties
    auc, low, high = auc_ci(y, p)
    assert auc == pytest.approx(safe_auc(y.astype(int), p))
    assert low < auc < high


def test_delong_interval_covers_the_true_auc_about_95_percent(rng: np.random.Generator) -> None:
    # Scores N(0,1) for negatives, N(1,1) for positives: true AUC = Phi(1 / sqrt(2)).
    true_auc = 0.7602499389065233
    covered = 0
    for _ in range(300):
        y = np.r_[np.ones(60, bool), np.zeros(200, bool)]
        p = rng.normal(size=260) + y
        _, low, high = auc_ci(y, p)
        covered += low <= true_auc <= high
    assert 0.90 <= covered / 300 <= 0.99


def test_delong_undefined_cases() -> None:
    assert all(math.isnan(v) for v in auc_ci(np.zeros(4), np.arange(4.0)))
    auc, low, high = auc_ci(np.array([1, 0, 0]), np.array([0.9, 0.1, 0.2]))
    assert auc == 1.0 and math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError, match="level"):
        auc_ci(np.array([1, 0]), np.array([0.5, 0.4]), level=1.5)


def test_evaluate_reports_positives_and_interval(rng: np.random.Generator) -> None:
    n = 2000
    click = rng.random(n) < 0.5
    conversion = click & (rng.random(n) < 0.2)
    observed = rng.random(n) < 0.8
    pcvr = np.clip(0.1 + 0.1 * conversion + 0.3 * rng.random(n), 0, 1)
    out = evaluate_predictions(click, conversion, observed, np.full(n, 0.5), pcvr)
    assert out["test_positives"] == int((conversion & click & observed).sum())
    assert out["auc_ci_low"] < out["auc"] < out["auc_ci_high"]
