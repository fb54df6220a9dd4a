"""User tag mining on a dataset: train the tag model federatedly, infer every phone's
tags, score them against the truth, and measure the LDP prevalence error against eps."""

from __future__ import annotations

from typing import Any

import numpy as np

from adfed.data.schema import USER_KEY, Entity, Visibility
from adfed.data.store import Dataset, split_by_time
from adfed.errors import DataError
from adfed.metrics import safe_auc
from adfed.rerank.requests import user_table
from adfed.tags.ldp import debiased_prevalence, prevalence_error, randomize
from adfed.tags.model import TagSettings, phone_features, propensity, tags_of, train_fedavg

#: the ad field whose values are the tags' categories
CATEGORY_FIELD = "ad_category"
#: private bags wider than this are left out of the tag features (app_usage: 2,000 apps)
MAX_BAG_WIDTH = 256
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)


def _bags(dataset: Dataset) -> dict[str, int]:
    return {f.name: f.vocab_size for f in dataset.schema.by_entity(Entity.USER)
            if f.is_bag and f.visibility is Visibility.PRIVATE and f.vocab_size <= MAX_BAG_WIDTH}


def phone_histories(dataset: Dataset, test_fraction: float) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Each phone's training history with an observed label: (user id, ad categories,
    click and conversion as 0/1), phones without such rows left out."""
    ex = dataset.load()
    users = ex.ids[USER_KEY].astype(np.int64)
    train, _ = split_by_time(users, test_fraction)
    train = train[ex.labels["label_observed"][train].astype(bool)]
    users, cats = users[train], ex.ids[CATEGORY_FIELD][train].astype(np.int64)
    label = (ex.labels["click"][train] * ex.labels["conversion"][train]).astype(np.float64)
    bounds = np.flatnonzero(np.diff(users)) + 1
    return [(int(u[0]), c, y) for u, c, y in zip(np.split(users, bounds), np.split(cats, bounds),
                                                  np.split(label, bounds), strict=True) if len(u)]


def accuracy(pred: np.ndarray, truth: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """Agreement of predicted tags with the true ones (bool [U, C]): accuracy over every
    (phone, tag), mean per-tag precision, recall and AUC of ``score``, and the accuracy of
    setting no tag at all (the baseline a rare tag makes high)."""
    tp = (pred & truth).sum(axis=0)
    precision = np.divide(tp, pred.sum(axis=0), out=np.full(tp.shape, np.nan), where=pred.sum(axis=0) > 0)
    recall = np.divide(tp, truth.sum(axis=0), out=np.full(tp.shape, np.nan), where=truth.sum(axis=0) > 0)
    aucs = [safe_auc(truth[:, c].astype(np.int8), score[:, c]) for c in range(truth.shape[1])]
    return {"tag_accuracy": float((pred == truth).mean()), "no_tag_accuracy": float((~truth).mean()),
            "tag_precision": float(np.nanmean(precision)), "tag_recall": float(np.nanmean(recall)),
            "tag_auc": float(np.nanmean(aucs)), "true_prevalence": float(truth.mean()),
            "predicted_prevalence": float(pred.mean())}


def mine_tags(dataset: Dataset, truth_propensity: np.ndarray | None, settings: TagSettings, *,
              test_fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """Train, infer, score (when ``truth_propensity``, float [U, C], is given) and
    report under LDP; returns the ``tags`` section of rerank.json.

    Raises
    ------
    DataError : the dataset has no ``ad_category`` field or no private bag to learn from.
    """
    if CATEGORY_FIELD not in {f.name for f in dataset.schema.fields}:
        raise DataError(f"{dataset.path}: tags need the ad field {CATEGORY_FIELD!r}; the dataset has none")
    bags = _bags(dataset)
    if not bags:
        raise DataError(f"{dataset.path}: tags need a private multi-hot user field to learn from; there is none")
    num_cat = dataset.schema.field(CATEGORY_FIELD).vocab_size
    match = tuple(f.name for f in dataset.schema.by_entity(Entity.USER) if f.is_bag and f.vocab_of == CATEGORY_FIELD)
    feats = phone_features(user_table(dataset), bags, match, num_cat)
    rng = np.random.default_rng([seed, 0x7A6])
    model = train_fedavg(feats, phone_histories(dataset, test_fraction), settings, rng)
    prop = propensity(model, feats)
    tags = tags_of(prop, settings.lift)
    out: dict[str, Any] = {"phones": len(feats.x), "tags_per_phone": num_cat, "features": list(bags),
                           "lift": settings.lift, "rounds": settings.rounds,
                           "clients_per_round": settings.clients_per_round}
    truth = tags_of(truth_propensity, settings.lift) if truth_propensity is not None else None
    if truth is not None:
        out.update(accuracy(tags, truth, prop))
    rows = prevalence_error(tags, EPSILONS, rng)
    if truth is not None:
        for row in rows:
            est = debiased_prevalence(randomize(tags, row["epsilon"], rng), row["epsilon"])
            row["mean_abs_error_vs_true_tags"] = float(np.abs(est - truth.mean(axis=0)).mean())
    out["ldp"] = rows
    return out
