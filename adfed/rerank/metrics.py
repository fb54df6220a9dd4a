"""The exact value of an ordering of candidates, given their true probabilities.

An order is an int array [R, N]: ``order[r, i]`` is the candidate shown at position
``i + 1`` of request ``r``. With the truth of every candidate (``p_click``, ``p_cvr``,
and its ``bid``), the value of the first ``k`` positions is exact, not sampled:

- **position bias** (the examination model): the ad at position ``i`` (1-based) is seen
  with probability ``w(i) = 1 / log2(i + 1)`` (1, 0.63, 0.5, 0.43, 0.39, ...: DCG's
  discount, the usual cascade-free examination curve), and a seen ad is clicked with its
  ``p_click`` and then converts with its ``p_cvr``.
- **expected conversions@k** = ``sum_{i<=k} w(i) p_click p_cvr`` of the ad there.
- **expected revenue@k** = ``sum_{i<=k} w(i) p_click p_cvr bid``: advertisers pay their
  bid per conversion (the same payment the cloud's eCPM = bid x pCTR x pCVR assumes).
- **NDCG@k** with the true pCTCVR as relevance (linear gain, the same discount): the
  expected conversions@k over those of the best order (the oracle's).

Uplifts are ratios of sums over requests (``sum device / sum cloud - 1``), with a
percentile bootstrap over requests for their interval.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def position_weights(k: int) -> np.ndarray:
    """``w(i) = 1 / log2(i + 1)`` for positions ``i = 1..k``, float64 [k]."""
    if k < 1:
        raise ValueError(f"k must be an int >= 1; got {k}")
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def order_by(scores: np.ndarray) -> np.ndarray:
    """Descending order of each row of ``scores`` [R, N] (ties: earlier candidate first),
    int64 [R, N]."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")


def value_at_k(order: np.ndarray, value: np.ndarray, k: int) -> np.ndarray:
    """Per request, ``sum_{i<=k} w(i) value[order[i]]``, float64 [R].

    order : int [R, N]; value : float [R, N] (the candidates' true worth: pCTCVR for
    conversions, pCTCVR x bid for revenue). ``k`` above N counts N positions.
    """
    k = min(k, order.shape[1])
    shown = np.take_along_axis(np.asarray(value, dtype=np.float64), order[:, :k], axis=1)
    return shown @ position_weights(k)


def ndcg_at_k(order: np.ndarray, relevance: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k per request with linear gains, float64 [R] (1 where every gain is 0)."""
    ideal = value_at_k(order_by(relevance), relevance, k)
    got = value_at_k(order, relevance, k)
    return np.divide(got, ideal, out=np.ones_like(got), where=ideal > 0)


@dataclasses.dataclass(frozen=True)
class Uplift:
    """``sum(new) / sum(base) - 1`` over requests, with a percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {prefix: self.value, f"{prefix}_low": self.low, f"{prefix}_high": self.high}


def _ratio(new: np.ndarray, base: np.ndarray) -> float:
    total = float(base.sum())
    return float(new.sum()) / total - 1.0 if total > 0 else float("nan")


def uplift(new: np.ndarray, base: np.ndarray, rng: np.random.Generator, *, reps: int = 1000,
           level: float = 0.95) -> Uplift:
    """Uplift of per-request values ``new`` over ``base`` (float [R] each, the same
    requests), with a ``level`` percentile bootstrap interval from ``reps`` resamples
    of the requests. No requests: all ``nan``."""
    new, base = np.asarray(new, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if new.shape != base.shape or new.ndim != 1:
        raise ValueError(f"new and base must be float arrays [R] of one length; got {new.shape} and {base.shape}")
    if reps < 1:
        raise ValueError(f"reps must be an int >= 1; got {reps}")
    if not len(new):
        return Uplift(float("nan"), float("nan"), float("nan"))
    idx = rng.integers(0, len(new), size=(reps, len(new)))
    sums_new, sums_base = new[idx].sum(axis=1), base[idx].sum(axis=1)
    boot = np.divide(sums_new, sums_base, out=np.full(reps, np.nan), where=sums_base > 0) - 1.0
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.nanpercentile(boot, [tail, 100.0 - tail]) if np.isfinite(boot).any() else (np.nan, np.nan)
    return Uplift(_ratio(new, base), float(low), float(high))


#: user activity buckets by training impressions: (name, lowest, highest)
ACTIVITY_BUCKETS = (("1-10 impressions", 0, 10), ("11-50 impressions", 11, 50), ("over 50 impressions", 51, None))


def activity_bucket(impressions: np.ndarray) -> np.ndarray:
    """The index into :data:`ACTIVITY_BUCKETS` of each count, int64 [R]."""
    out = np.zeros(len(impressions), dtype=np.int64)
    for i, (_, low, _) in enumerate(ACTIVITY_BUCKETS):
        out[np.asarray(impressions) >= low] = i
    return out
