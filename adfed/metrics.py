"""Evaluation metrics for pCTR / pCVR predictions (AUC, logloss, calibration, oracle).

Which rows each metric uses (ESMM's conventions):

- CVR metrics (``auc``, ``logloss``, ``ece``, ``pred_rate``, ``obs_rate``): clicked
  impressions whose conversion label is observed; label = conversion, score = pCVR.
- CTCVR metrics (``ctcvr_auc``, ``ctcvr_logloss``): every impression whose label is
  observed; label = click ∧ conversion, score = pCTR × pCVR.
- CTR metrics (``ctr_auc``): every impression (clicks are always observed).
- Oracle metrics: the same rows and labels scored with the generator's true
  probabilities; the best any model can do on this sample.
- Expected metrics (``auc_expected``, ``oracle_auc_expected``; needs both truths): CVR
  AUC over every impression whose label is observed, each counted as a positive with
  weight p_click·p_cvr and as a negative with weight p_click·(1 - p_cvr): the same
  population quantity as ``auc`` without the noise of the sampled labels.

Uncertainty: ``test_positives`` is the number of positives behind ``auc`` (conversions
among the clicked, observed rows) and ``auc_ci_low`` / ``auc_ci_high`` its 95 % DeLong
interval (:func:`auc_ci`). With few positives the AUC is noisy whatever the model.

A metric that is undefined on the given rows (no rows, or a single class for AUC) is
``nan``, never an exception: small clients often have no positive label.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import log_loss, roc_auc_score

logger = logging.getLogger(__name__)

ECE_BINS = 10


def _as_1d(name: str, x: np.ndarray, n: int | None = None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array; got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} must have length {n} like click; got {arr.shape[0]}")
    return arr


def _as_prob(name: str, p: np.ndarray, n: int | None = None) -> np.ndarray:
    arr = _as_1d(name, p, n).astype(np.float64)
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
        raise ValueError(f"{name} must be finite probabilities in [0, 1]; got NaN, inf or out of range")
    return arr


def safe_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC of scores ``p`` against binary labels ``y``; ``nan`` with fewer than 2 classes."""
    y = np.asarray(y)
    if y.size == 0 or np.unique(y).size < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def safe_logloss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy (natural log); ``nan`` on no rows. Works with one class."""
    y = np.asarray(y)
    if y.size == 0:
        return float("nan")
    return float(log_loss(y, np.asarray(p, dtype=np.float64), labels=[0, 1]))


def ece(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error with ``bins`` equal-count bins.

    Rows are sorted by ``p`` and split into ``bins`` consecutive chunks of (nearly) equal
    size; ECE = Σ_b (n_b / n) · |mean(p_b) − mean(y_b)|. ``nan`` on no rows.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.size == 0:
        return float("nan")
    if bins < 1:
        raise ValueError(f"ece bins must be an int >= 1; got {bins}")
    order = np.argsort(p, kind="stable")
    total = 0.0
    for chunk in np.array_split(order, min(bins, y.size)):
        total += chunk.size * abs(p[chunk].mean() - y[chunk].mean())
    return float(total / y.size)


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else float("nan")


def auc_ci(y: np.ndarray, p: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """ROC AUC with DeLong's confidence interval.

    DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more
    correlated receiver operating characteristic curves", Biometrics 44(3); computed with
    midranks (Sun & Xu 2014, O(n log n)). Each positive's *placement* is the share of
    negatives it outscores (ties count half), each negative's the share of positives that
    outscore it; AUC is their mean and its variance is
    ``var(placements of positives) / m + var(placements of negatives) / n`` (sample
    variances; m positives, n negatives). The interval is the normal one,
    ``auc ± z · se``, clipped to [0, 1].

    Parameters
    ----------
    y : binary labels [n].
    p : scores [n], any monotone scale.
    level : coverage of the interval, in (0, 1).

    Returns
    -------
    (auc, low, high); all ``nan`` with a single class, and ``(auc, nan, nan)`` with fewer
    than two positives or two negatives (no variance to estimate).

    Raises
    ------
    ValueError : ``level`` outside (0, 1), or arrays of different lengths.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be a float in (0, 1); got {level}")
    y = _as_1d("y", y).astype(bool)
    p = _as_1d("p", p, y.shape[0]).astype(np.float64)
    pos, neg = p[y], p[~y]
    m, n = pos.size, neg.size
    if m == 0 or n == 0:
        nan = float("nan")
        return nan, nan, nan
    ranks = rankdata(np.concatenate([pos, neg]))
    v_pos = (ranks[:m] - rankdata(pos)) / n  # negatives below each positive
    v_neg = 1.0 - (ranks[m:] - rankdata(neg)) / m  # positives above each negative
    auc = float(v_pos.mean())
    if m < 2 or n < 2:
        return auc, float("nan"), float("nan")
    se = float(np.sqrt(v_pos.var(ddof=1) / m + v_neg.var(ddof=1) / n))
    half = float(norm.ppf(0.5 + level / 2.0)) * se
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def expected_auc(score: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray) -> float:
    """AUC of ``score`` in expectation over the labels: row i is a positive with weight
    ``w_pos[i]`` and a negative with weight ``w_neg[i]`` (e.g. P(click ∧ conversion) and
    P(click ∧ no conversion) from a generator's truth).

    The expected CVR AUC on every impression of the test rows weighs each by its chance
    of being a clicked (non-)conversion instead of using the one sampled outcome, so it
    measures the same population quantity as ``auc`` without the label-sampling noise
    (``auc`` on a 20k-user world rests on ~150 test conversions). ``nan`` when either
    total weight is zero.
    """
    score = _as_1d("score", score)
    n = score.shape[0]
    w_pos = _as_1d("w_pos", w_pos, n).astype(np.float64)
    w_neg = _as_1d("w_neg", w_neg, n).astype(np.float64)
    if n == 0 or w_pos.sum() <= 0 or w_neg.sum() <= 0:
        return float("nan")
    y = np.concatenate([np.ones(n), np.zeros(n)])
    return float(roc_auc_score(y, np.concatenate([score, score]),
                               sample_weight=np.concatenate([w_pos, w_neg])))


def evaluate_predictions(
    click: np.ndarray,
    conversion: np.ndarray,
    label_observed: np.ndarray,
    pctr: np.ndarray,
    pcvr: np.ndarray,
    truth_p_click: np.ndarray | None = None,
    truth_p_cvr: np.ndarray | None = None,
) -> dict[str, float]:
    """All evaluation figures for one set of impressions (see the module docstring).

    Parameters
    ----------
    click, conversion : int/bool [n]; ``conversion`` counts only where ``click`` is 1.
    label_observed : bool [n]; False where the device never reported conversions.
    pctr, pcvr : float [n] model probabilities.
    truth_p_click, truth_p_cvr : float [n] generator truth, or ``None``.

    Returns
    -------
    ``auc``, ``auc_ci_low``, ``auc_ci_high`` (95 %, :func:`auc_ci`), ``test_positives``
    (conversions among the clicked, observed rows: the positives behind ``auc``),
    ``logloss``, ``ctcvr_auc``, ``ctcvr_logloss``, ``ctr_auc``, ``ece``,
    ``pred_rate``, ``obs_rate``; with ``truth_p_cvr`` also ``oracle_auc`` and
    ``oracle_logloss``; with both truths also ``oracle_ctcvr_auc`` and the label-noise-free
    ``auc_expected`` / ``oracle_auc_expected`` (:func:`expected_auc` over every
    impression whose label is observed).

    Raises
    ------
    ValueError : arrays of different lengths, or probabilities that are NaN, infinite
        or outside [0, 1].
    """
    click = _as_1d("click", click).astype(bool)
    n = click.shape[0]
    conversion = _as_1d("conversion", conversion, n).astype(bool)
    observed = _as_1d("label_observed", label_observed, n).astype(bool)
    pctr = _as_prob("pctr", pctr, n)
    pcvr = _as_prob("pcvr", pcvr, n)

    cvr_rows = click & observed
    y_cvr = conversion[cvr_rows].astype(np.int64)
    y_ctcvr = (click & conversion)[observed].astype(np.int64)
    pctcvr = (pctr * pcvr)[observed]
    _, ci_low, ci_high = auc_ci(y_cvr, pcvr[cvr_rows])
    out = {
        "auc": safe_auc(y_cvr, pcvr[cvr_rows]),
        "auc_ci_low": ci_low,
        "auc_ci_high": ci_high,
        "test_positives": int(y_cvr.sum()),
        "logloss": safe_logloss(y_cvr, pcvr[cvr_rows]),
        "ctcvr_auc": safe_auc(y_ctcvr, pctcvr),
        "ctcvr_logloss": safe_logloss(y_ctcvr, pctcvr),
        "ctr_auc": safe_auc(click.astype(np.int64), pctr),
        "ece": ece(y_cvr, pcvr[cvr_rows]),
        "pred_rate": _mean(pcvr[cvr_rows]),
        "obs_rate": _mean(y_cvr.astype(np.float64)),
    }
    if truth_p_cvr is not None:
        t_cvr = _as_prob("truth_p_cvr", truth_p_cvr, n)
        out["oracle_auc"] = safe_auc(y_cvr, t_cvr[cvr_rows])
        out["oracle_logloss"] = safe_logloss(y_cvr, t_cvr[cvr_rows])
        if truth_p_click is not None:
            t_click = _as_prob("truth_p_click", truth_p_click, n)
            out["oracle_ctcvr_auc"] = safe_auc(y_ctcvr, (t_click * t_cvr)[observed])
            w_click = t_click[observed]
            pos, neg = w_click * t_cvr[observed], w_click * (1.0 - t_cvr[observed])
            out["auc_expected"] = expected_auc(pcvr[observed], pos, neg)
            out["oracle_auc_expected"] = expected_auc(t_cvr[observed], pos, neg)
    elif truth_p_click is not None:
        raise ValueError("truth_p_click needs truth_p_cvr too (oracle CTCVR uses both)")
    return out


def paired_bootstrap_auc(
    y: np.ndarray,
    scores: dict[str, np.ndarray],
    reference: str,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """AUC of several scores on the same rows, with paired bootstrap intervals.

    Every resample draws the rows once (with replacement) and scores all of ``scores``
    on it, so the intervals of ``gap`` (AUC of ``reference`` minus AUC of the score) are
    those of a difference measured on one test set: far narrower than two separate
    intervals would suggest. Resamples with a single class are drawn again.

    Parameters
    ----------
    y : binary labels [n] (both classes present).
    scores : name -> scores [n]; any monotone scale (logits or probabilities).
    reference : the name whose AUC the gaps are measured from.

    Returns
    -------
    name -> ``auc``, ``low``, ``high`` (the ``level`` percentile interval), ``gap``,
    ``gap_low``, ``gap_high`` (reference minus this score; 0 for the reference itself).

    Raises
    ------
    ValueError : a single class in ``y``, scores of another length, an unknown
        ``reference``, ``resamples < 1`` or ``level`` outside (0, 1).
    """
    y = _as_1d("y", y).astype(np.int64)
    n = y.shape[0]
    if reference not in scores:
        raise ValueError(f"reference {reference!r} is not among the scores {sorted(scores)}")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need resamples >= 1 and level in (0, 1); got {resamples}, {level}")
    if np.unique(y).size < 2:
        raise ValueError("paired_bootstrap_auc needs both classes in y")
    s = {k: _as_1d(k, v, n).astype(np.float64) for k, v in scores.items()}
    rng = np.random.default_rng([seed, 0xB007])
    draws = {k: np.empty(resamples) for k in s}
    done = 0
    while done < resamples:
        idx = rng.integers(0, n, size=n)
        if y[idx].min() == y[idx].max():
            continue
        for k, v in s.items():
            draws[k][done] = roc_auc_score(y[idx], v[idx])
        done += 1
    tail = 100.0 * (1.0 - level) / 2.0
    aucs = {k: float(roc_auc_score(y, v)) for k, v in s.items()}
    out: dict[str, dict[str, float]] = {}
    for k, auc in aucs.items():
        gaps = draws[reference] - draws[k]
        out[k] = {
            "auc": auc,
            "low": float(np.percentile(draws[k], tail)),
            "high": float(np.percentile(draws[k], 100.0 - tail)),
            "gap": aucs[reference] - auc,
            "gap_low": float(np.percentile(gaps, tail)),
            "gap_high": float(np.percentile(gaps, 100.0 - tail)),
        }
    return out
