"""Randomized response and the cloud's debiased prevalence."""

from __future__ import annotations

import numpy as np
import pytest

from adfed.tags.ldp import debiased_prevalence, keep_probability, prevalence_error, randomize


def test_keep_probability_and_its_check() -> None:
    assert keep_probability(np.log(3.0)) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="epsilon must be a float > 0; got 0"):
        keep_probability(0)


def test_debiased_prevalence_is_unbiased(rng: np.random.Generator) -> None:
    # Prepare: 3 tags of prevalence 0.05, 0.3, 0.9 over 20,000 phones
    bits = rng.random((20_000, 3)) < np.array([0.05, 0.3, 0.9])
    # Execute: the mean estimate over 40 independent report rounds at eps = 1
    est = np.mean([debiased_prevalence(randomize(bits, 1.0, rng), 1.0) for _ in range(40)], axis=0)
    # Assert: within 4 standard errors of the phones' true prevalence
    sd = np.sqrt(keep_probability(1.0) * (1 - keep_probability(1.0)) / 20_000) / (2 * keep_probability(1.0) - 1)
    assert np.abs(est - bits.mean(axis=0)).max() < 4 * sd / np.sqrt(40)


def test_error_falls_with_epsilon(rng: np.random.Generator) -> None:
    bits = rng.random((5_000, 4)) < 0.2
    rows = prevalence_error(bits, (0.5, 2.0, 8.0), rng, repeats=10)
    errors = [r["mean_abs_error"] for r in rows]
    assert errors[0] > errors[1] > errors[2]
    assert all(r["mean_abs_error"] < 2 * r["sd_theory"] for r in rows)


def test_no_reports_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one report"):
        debiased_prevalence(np.zeros((0, 2), dtype=bool), 1.0)
