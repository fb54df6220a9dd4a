"""Metrics with known answers, row selection, oracle figures and input validation."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from adfed.metrics import ece, evaluate_predictions, paired_bootstrap_auc, safe_auc, safe_logloss


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_auc_known_answers() -> None:
    y = np.array([0, 0, 1, 1])

    assert safe_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert safe_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert safe_auc(y, np.full(4, 0.5)) == 0.5
    assert safe_auc(y, np.array([0.1, 0.8, 0.2, 0.9])) == 0.75


def test_auc_is_nan_without_both_classes() -> None:
    assert math.isnan(safe_auc(np.ones(5), np.linspace(0, 1, 5)))
    assert math.isnan(safe_auc(np.zeros(0), np.zeros(0)))


def test_logloss_known_answers() -> None:
    assert safe_logloss(np.array([1, 0]), np.array([0.8, 0.2])) == pytest.approx(-math.log(0.8))
    assert safe_logloss(np.array([1, 1]), np.array([0.5, 0.5])) == pytest.approx(math.log(2))  # one class
    assert math.isnan(safe_logloss(np.zeros(0), np.zeros(0)))


def test_ece_known_answers() -> None:
    # two equal-count bins: {0.1 x2, labels 0,0} and {0.9 x2, labels 1,1}
    assert ece(np.array([0, 0, 1, 1]), np.array([0.1, 0.1, 0.9, 0.9]), bins=2) == pytest.approx(0.1)
    # a constant predictor at the base rate is calibrated in one bin
    assert ece(np.array([0, 1, 0, 1]), np.full(4, 0.5), bins=1) == pytest.approx(0.0)
    assert math.isnan(ece(np.zeros(0), np.zeros(0)))
    with pytest.raises(ValueError, match="bins"):
        ece(np.ones(2), np.ones(2), bins=0)


def test_ece_of_a_calibrated_predictor_is_small(rng: np.random.Generator) -> None:
    p = rng.uniform(0.0, 0.3, size=200_000)
    y = (rng.random(p.size) < p).astype(int)

    assert ece(y, p) < 0.005
    assert ece(y, np.clip(p * 2, 0, 1)) > 0.1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 1)), min_size=2, max_size=60))
def test_auc_of_the_reversed_score_is_one_minus_auc(rows: list[tuple[bool, float]]) -> None:
    y = np.array([r[0] for r in rows], dtype=int)
    p = np.array([r[1] for r in rows])

    auc = safe_auc(y, p)

    if len(set(y)) < 2:
        assert math.isnan(auc)
    else:
        assert 0.0 <= auc <= 1.0
        assert safe_auc(y, -p) == pytest.approx(1.0 - auc)
        assert 0.0 <= ece(y, p) <= 1.0


def _world(rng: np.random.Generator, n: int = 4000) -> dict[str, np.ndarray]:
    p_click = rng.uniform(0.05, 0.6, n)
    p_cvr = rng.uniform(0.02, 0.5, n)
    click = (rng.random(n) < p_click).astype(np.int8)
    conversion = (click & (rng.random(n) < p_cvr)).astype(np.int8)
    observed = rng.random(n) < 0.7
    return {"click": click, "conversion": conversion, "label_observed": observed,
            "p_click": p_click, "p_cvr": p_cvr}


def test_evaluate_keys_and_perfect_cvr_predictor(rng: np.random.Generator) -> None:
    w = _world(rng)
    perfect = w["conversion"].astype(float) * 0.98 + 0.01

    m = evaluate_predictions(w["click"], w["conversion"], w["label_observed"], w["p_click"], perfect)

    assert set(m) == {"auc", "auc_ci_low", "auc_ci_high", "test_positives", "logloss", "ctcvr_auc",
                      "ctcvr_logloss", "ctr_auc", "ece", "pred_rate", "obs_rate"}
    assert m["auc"] == 1.0
    assert m["logloss"] == pytest.approx(-math.log(0.99))
    clicked = (w["click"] == 1) & w["label_observed"]
    assert m["obs_rate"] == pytest.approx(w["conversion"][clicked].mean())
    assert m["pred_rate"] == pytest.approx(perfect[clicked].mean())


def test_cvr_metrics_use_only_clicked_observed_rows(rng: np.random.Generator) -> None:
    w = _world(rng)
    args = (w["click"], w["conversion"], w["label_observed"], w["p_click"])
    pcvr = w["p_cvr"].copy()
    elsewhere = ~((w["click"] == 1) & w["label_observed"])

    base = evaluate_predictions(*args, pcvr)
    pcvr[elsewhere] = rng.random(elsewhere.sum())
    moved = evaluate_predictions(*args, pcvr)

    for key in ("auc", "logloss", "ece", "pred_rate", "obs_rate"):
        assert moved[key] == base[key], key
    assert moved["ctcvr_auc"] != base["ctcvr_auc"]  # CTCVR sees every observed row


def test_ctcvr_metrics_ignore_unobserved_rows(rng: np.random.Generator) -> None:
    w = _world(rng)
    conversion = w["conversion"].copy()
    unobserved_clicks = (~w["label_observed"]) & (w["click"] == 1)
    conversion[unobserved_clicks] = 1 - conversion[unobserved_clicks]

    a = evaluate_predictions(w["click"], w["conversion"], w["label_observed"], w["p_click"], w["p_cvr"])
    b = evaluate_predictions(w["click"], conversion, w["label_observed"], w["p_click"], w["p_cvr"])

    assert a == b


def test_ctr_and_ctcvr_known_answers() -> None:
    click = np.array([1, 1, 0, 0, 1, 0])
    conversion = np.array([1, 0, 0, 0, 0, 0])
    observed = np.ones(6, dtype=bool)
    pctr = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3])
    pcvr = np.array([0.9, 0.1, 0.5, 0.5, 0.2, 0.5])

    m = evaluate_predictions(click, conversion, observed, pctr, pcvr)

    assert m["ctr_auc"] == 1.0
    assert m["ctcvr_auc"] == 1.0  # pctcvr = .81 for the only positive, <= .15 elsewhere
    assert m["auc"] == 1.0
    assert m["ctcvr_logloss"] == pytest.approx(safe_logloss(click * conversion, pctr * pcvr))


def test_oracle_figures(rng: np.random.Generator) -> None:
    w = _world(rng, 20_000)

    m = evaluate_predictions(w["click"], w["conversion"], w["label_observed"], w["p_click"],
                             np.full(w["click"].size, 0.2), truth_p_click=w["p_click"], truth_p_cvr=w["p_cvr"])
    only_cvr = evaluate_predictions(w["click"], w["conversion"], w["label_observed"], w["p_click"],
                                    w["p_cvr"], truth_p_cvr=w["p_cvr"])

    assert m["auc"] == 0.5
    assert 0.6 < m["oracle_auc"] < 0.8  # truth p_cvr spread over [0.02, 0.5]
    assert m["oracle_ctcvr_auc"] > m["oracle_auc"]  # p_click adds signal for click ∧ conversion
    assert only_cvr["oracle_auc"] == only_cvr["auc"]
    assert only_cvr["oracle_logloss"] == only_cvr["logloss"]
    assert "oracle_ctcvr_auc" not in only_cvr


def test_undefined_metrics_are_nan_not_errors() -> None:
    m = evaluate_predictions(np.zeros(3), np.zeros(3), np.ones(3, dtype=bool), np.full(3, 0.1), np.full(3, 0.1))

    assert math.isnan(m["auc"]) and math.isnan(m["logloss"]) and math.isnan(m["ece"])
    assert math.isnan(m["ctr_auc"]) and math.isnan(m["obs_rate"])
    assert m["ctcvr_logloss"] == pytest.approx(-math.log(1 - 0.01))


def test_bad_inputs_are_named() -> None:
    ok = np.zeros(4)
    obs = np.ones(4, dtype=bool)

    with pytest.raises(ValueError, match="pcvr must have length 4"):
        evaluate_predictions(ok, ok, obs, ok, np.zeros(3))
    with pytest.raises(ValueError, match="pctr must be finite"):
        evaluate_predictions(ok, ok, obs, np.array([0.1, np.nan, 0.1, 0.1]), ok)
    with pytest.raises(ValueError, match="pcvr must be finite"):
        evaluate_predictions(ok, ok, obs, ok, np.array([0.1, 1.5, 0.1, 0.1]))
    with pytest.raises(ValueError, match="1-d"):
        evaluate_predictions(np.zeros((2, 2)), ok, obs, ok, ok)
    with pytest.raises(ValueError, match="truth_p_cvr"):
        evaluate_predictions(ok, ok, obs, ok, ok, truth_p_click=ok)


def test_paired_bootstrap_intervals_hold_the_estimate_and_gap():
    rng = np.random.default_rng(3)
    n = 600
    truth = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(truth - 1.5)))).astype(int)
    noisy = truth + rng.normal(scale=1.0, size=n)
    out = paired_bootstrap_auc(y, {"truth": truth, "noisy": noisy, "same": truth.copy()}, "truth",
                               resamples=300, seed=1)
    for row in out.values():
        assert row["low"] <= row["auc"] <= row["high"]
    assert out["truth"]["gap"] == 0.0 and out["truth"]["gap_low"] == 0.0 == out["truth"]["gap_high"]
    assert out["same"]["gap_high"] == 0.0  # a tie on every resample: no spread at all
    gap = out["noisy"]
    assert gap["gap"] == pytest.approx(out["truth"]["auc"] - out["noisy"]["auc"])
    assert gap["gap_low"] <= gap["gap"] <= gap["gap_high"]
    # paired: the gap's interval is narrower than either AUC's own interval
    assert gap["gap_high"] - gap["gap_low"] < out["noisy"]["high"] - out["noisy"]["low"]
    again = paired_bootstrap_auc(y, {"truth": truth, "noisy": noisy, "same": truth}, "truth",
                                 resamples=300, seed=1)
    assert again == out


def test_paired_bootstrap_rejects_bad_input():
    y = np.array([0, 1, 0, 1])
    s = np.array([0.1, 0.9, 0.2, 0.8])
    with pytest.raises(ValueError, match="reference 'x'"):
        paired_bootstrap_auc(y, {"a": s}, "x")
    with pytest.raises(ValueError, match="both classes"):
        paired_bootstrap_auc(np.zeros(4), {"a": s}, "a")
    with pytest.raises(ValueError, match="length 4"):
        paired_bootstrap_auc(y, {"a": s[:3]}, "a")
