"""Statistical properties the issue asks of the synthetic world (20k users, seed 11)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy.stats import chi2_contingency
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from data_gen.impressions import draw_impressions, impression_logits
from data_gen.truth import sigmoid, user_truth_features
from data_gen.users import personas, user_state

if TYPE_CHECKING:
    from .conftest import Materialised


def _observed_clicks(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df.click == 1) & df.label_observed]


def test_click_rate_and_cvr_are_realistic(data: Materialised) -> None:
    df = data.impressions
    ctr = df.click.mean()
    cvr = _observed_clicks(df).conversion.mean()
    print(f"click rate {ctr:.4f}, CVR among observed clicks {cvr:.4f}")
    assert 0.01 <= ctr <= 0.08
    assert 0.03 <= cvr <= 0.20


def test_labels_are_consistent(data: Materialised) -> None:
    df = data.impressions
    assert (df.conversion <= df.click).all(), "conversion only after a click"
    assert (df.conversion[~df.label_observed] == 0).all(), "unobserved rows store 0"
    assert df.groupby("user_id").label_observed.nunique().max() == 1, "per device"
    assert df.p_click.between(0, 1).all() and df.p_cvr.between(0, 1).all()


def test_rows_per_user_are_few_shot_and_heavy_tailed(data: Materialised) -> None:
    counts = data.impressions.groupby("user_id").size()
    median, p90, top = counts.median(), counts.quantile(0.9), counts.max()
    print(f"rows/user median {median}, p90 {p90}, max {top}")
    assert len(counts) == len(data.users), "every user has at least one row"
    assert median <= 30
    assert top >= 20 * median


def test_a_fifth_or_more_of_devices_never_report_conversions(data: Materialised) -> None:
    per_user = data.impressions.groupby("user_id").label_observed.first()
    share = 1.0 - per_user.mean()
    print(f"label-unobserved users {share:.3f}")
    assert 0.2 <= share <= 0.45


def test_personas_have_different_label_rates(data: Materialised) -> None:
    df = _observed_clicks(data.impressions)
    persona = personas(data.world, df.user_id.to_numpy())
    table = pd.crosstab(persona, df.conversion.to_numpy())
    cvr = table[1] / table.sum(axis=1)
    print("CVR per persona:", cvr.round(3).to_dict())
    assert chi2_contingency(table.to_numpy())[1] < 1e-4
    assert cvr.max() >= 1.5 * cvr.min()


def test_oracle_cvr_auc_is_realistic(data: Materialised) -> None:
    df = _observed_clicks(data.impressions)
    auc = roc_auc_score(df.conversion, df.p_cvr)
    print(f"oracle CVR AUC {auc:.4f} on {len(df)} clicks, {df.conversion.sum()} conversions")
    assert 0.70 <= auc <= 0.90


def _expected_auc(score: np.ndarray, p: np.ndarray) -> float:
    """AUC averaged over label draws y ~ Bernoulli(p): low-noise, for small differences."""
    s = np.concatenate([score, score])
    y = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    return float(roc_auc_score(y, s, sample_weight=np.concatenate([p, 1 - p])))


def test_user_residual_is_worth_about_one_to_two_points_of_auc(data: Materialised) -> None:
    w = data.world
    st = user_state(w, np.arange(len(data.users)))
    d = draw_impressions(w, st)
    lg = impression_logits(w, user_truth_features(w, st), d)
    clicked = d.u_click < sigmoid(lg.click)
    p = sigmoid(lg.cvr[clicked])
    full = _expected_auc(lg.cvr[clicked], p)
    without = _expected_auc(lg.cvr[clicked] - lg.cvr_residual[clicked], p)
    cloud = _expected_auc((lg.cvr - lg.cvr_residual - lg.cvr_private)[clicked], p)
    print(f"expected CVR AUC: oracle {full:.4f}, without residual {without:.4f}, "
          f"cloud-visible terms only {cloud:.4f}")
    assert 0.005 <= full - without <= 0.03
    assert full - cloud >= 0.05


def _bag_matrix(column: pa.ChunkedArray, width: int, values_map: np.ndarray | None = None,
                weight: float = 1.0) -> np.ndarray:
    """A list<int> column [U] as a dense [U, width] count matrix (ids via values_map)."""
    col = column.combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy()
    if values_map is not None:
        values = values_map[values]
    rows = np.repeat(np.arange(len(col)), np.diff(offsets))
    out = np.zeros((len(col), width))
    np.add.at(out, (rows, values), weight)
    return out


def _features(data: Materialised, df: pd.DataFrame, private: bool) -> pd.DataFrame:
    users = data.users.iloc[df.user_id.to_numpy()]
    ads = data.ads.iloc[df.ad_id.to_numpy()]
    x = pd.DataFrame({
        "age": users.age_bucket.to_numpy(), "gender": users.gender.to_numpy(),
        "region": users.region.to_numpy(), "brand": users.device_brand.to_numpy(),
        "os": users.os.to_numpy(), "category": ads.ad_category.to_numpy(),
        "creative": ads.creative_type.to_numpy(), "bid": ads.bid.to_numpy(),
        "hour": df.hour.to_numpy(), "slot": df.slot.to_numpy(), "network": df.network.to_numpy(),
    })
    if not private:
        return x
    p, lists, u = data.world.params, data.user_lists, df.user_id.to_numpy()
    inst = _bag_matrix(lists.column("installed_apps"), p.num_app_categories)[u]
    use = _bag_matrix(lists.column("app_usage"), p.num_app_categories,
                      data.world.app_category, 1.0 / p.seq_len)[u]
    intent = _bag_matrix(lists.column("intent"), p.num_ad_categories)[u]
    extra = {f"inst{c}": inst[:, c] for c in range(p.num_app_categories)}
    extra.update({f"use{c}": use[:, c] for c in range(p.num_app_categories)})
    extra["intent_match"] = intent[np.arange(len(df)), x.category.to_numpy()]  # crossed
    extra["num_intents"] = intent.sum(axis=1)
    return pd.concat([x, pd.DataFrame(extra)], axis=1)


@pytest.mark.slow
def test_private_fields_carry_signal_the_cloud_does_not_have(data: Materialised) -> None:
    df = _observed_clicks(data.impressions).reset_index(drop=True)
    train = (df.user_id % 2 == 0).to_numpy()  # split by user: no user on both sides
    aucs = {}
    for name in ("cloud", "private"):
        x = _features(data, df, private=name == "private")
        cats = [c in ("age", "gender", "region", "brand", "os", "category", "creative",
                      "network") for c in x.columns]
        model = HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1,
                                               categorical_features=cats, random_state=0)
        with threadpool_limits(1):  # OpenMP threads only fight each other on 2 cores
            model.fit(x[train], df.conversion[train])
        aucs[name] = roc_auc_score(df.conversion[~train], model.predict_proba(x[~train])[:, 1])
    oracle = roc_auc_score(df.conversion[~train], df.p_cvr[~train])
    print(f"held-out CVR AUC: cloud-visible fields {aucs['cloud']:.4f}, "
          f"with private fields {aucs['private']:.4f}, oracle {oracle:.4f}")
    assert aucs["private"] - aucs["cloud"] >= 0.02
    assert aucs["private"] < oracle


def test_ad_popularity_is_zipf_like(data: Materialised) -> None:
    counts = np.sort(data.impressions.ad_id.value_counts().to_numpy())[::-1]
    ranks = np.arange(1, 201)
    slope = np.polyfit(np.log(ranks), np.log(counts[:200]), 1)[0]
    top = counts[: len(counts) // 100].sum() / counts.sum()
    print(f"log-log slope {slope:.2f}; top 1% of ads get {top:.1%} of impressions")
    assert -1.4 <= slope <= -0.7
    assert top >= 0.2


def test_context_is_diurnal(data: Materialised) -> None:
    df = data.impressions
    hours = np.bincount(df.hour, minlength=24)
    assert hours[19:23].sum() > 3 * hours[3:7].sum()
    wifi = df.network == 0
    assert wifi[df.hour < 6].mean() > wifi[df.hour.between(10, 17)].mean() + 0.1
    assert (df.timestamp // 3600 % 24 == df.hour).all()
