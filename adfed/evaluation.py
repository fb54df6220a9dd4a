"""Held-out evaluation shared by centralized and federated training.

The test set is each user's last impressions (``data.test_fraction``), chosen by
:func:`adfed.data.store.split_by_time`, so both modes score the very same rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from adfed.data.examples import Examples
from adfed.data.schema import USER_KEY
from adfed.data.store import TRUTH_PREFIX, Dataset, split_by_time
from adfed.metrics import evaluate_predictions
from adfed.model.pcvr import PCVRModel
from adfed.model.predict import predict


@dataclasses.dataclass(frozen=True)
class Split:
    """Train and test examples of a (sub)population."""

    train: Examples
    test: Examples


def split_examples(examples: Examples, test_fraction: float) -> Split:
    train_rows, test_rows = split_by_time(examples.ids[USER_KEY], test_fraction)
    return Split(train=examples.take(train_rows), test=examples.take(test_rows))


def test_users(dataset: Dataset, max_users: int, seed: int) -> np.ndarray | None:
    """The users whose test rows are scored: all (None), or a seeded sample."""
    if max_users <= 0 or max_users >= len(dataset.user_ids):
        return None
    rng = np.random.default_rng([seed, 0xE7A1])
    return np.sort(rng.choice(dataset.user_ids, size=max_users, replace=False))


def evaluate(model: PCVRModel, test: Examples) -> dict[str, float]:
    """CVR/CTCVR/CTR metrics of ``model`` on ``test``, plus oracle figures if truth exists."""
    pctr, pcvr = predict(model, test)
    labels = test.labels
    return evaluate_predictions(
        labels["click"], labels["conversion"], labels["label_observed"], pctr, pcvr,
        truth_p_click=labels.get(TRUTH_PREFIX + "p_click"),
        truth_p_cvr=labels.get(TRUTH_PREFIX + "p_cvr"),
    )
