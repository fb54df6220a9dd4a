"""Reporting a tag to the cloud under local differential privacy, and debiasing there.

Randomized response (Warner 1965): a phone reports its tag bit truthfully with
probability ``p = e^eps / (1 + e^eps)`` and flipped otherwise, which is ``eps``-LDP for
that one report (a phone that reports C tags spends ``C * eps`` by composition). The
cloud sees only reports; since ``E[report] = (1 - p) + (2p - 1) * prevalence``, the
unbiased estimate of a tag's prevalence is ``(mean report - (1 - p)) / (2p - 1)``, whose
standard deviation is ``sqrt(p (1 - p) / n) / (2p - 1)`` at prevalence 0 or 1 (at most
that plus the sampling term).
"""

from __future__ import annotations

import numpy as np


def keep_probability(epsilon: float) -> float:
    """p = e^eps / (1 + e^eps), the probability of a truthful report."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be a float > 0; got {epsilon}")
    return float(1.0 / (1.0 + np.exp(-epsilon)))


def randomize(bits: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Each bit (bool, any shape) reported by randomized response with ``epsilon``."""
    flip = rng.random(np.shape(bits)) >= keep_probability(epsilon)
    return np.logical_xor(np.asarray(bits, dtype=bool), flip)


def debiased_prevalence(reports: np.ndarray, epsilon: float) -> np.ndarray:
    """The unbiased estimate of each column's prevalence from randomized reports (bool
    [n, C] -> float64 [C]; may fall outside [0, 1], as an unbiased estimate must).

    Raises
    ------
    ValueError : no reports.
    """
    reports = np.asarray(reports, dtype=np.float64)
    if reports.shape[0] == 0:
        raise ValueError("debiased_prevalence needs at least one report")
    p = keep_probability(epsilon)
    return (reports.mean(axis=0) - (1.0 - p)) / (2.0 * p - 1.0)


def prevalence_error(bits: np.ndarray, epsilons: tuple[float, ...], rng: np.random.Generator,
                     repeats: int = 20) -> list[dict[str, float]]:
    """Mean absolute error of the debiased prevalence against the prevalence of ``bits``
    (bool [n, C], the tags the phones hold), over columns and ``repeats`` draws, per
    epsilon; with the theory's standard deviation at prevalence 0."""
    true = np.asarray(bits, dtype=np.float64).mean(axis=0)
    rows = []
    for eps in epsilons:
        errs = [np.abs(debiased_prevalence(randomize(bits, eps, rng), eps) - true).mean() for _ in range(repeats)]
        p = keep_probability(eps)
        rows.append({"epsilon": eps, "mean_abs_error": float(np.mean(errs)),
                     "sd_theory": float(np.sqrt(p * (1 - p) / len(bits)) / (2 * p - 1))})
    return rows
