"""The tag model: a phone's local step lowers its loss; FedAvg learns a planted signal."""

from __future__ import annotations

import numpy as np
import pytest

from adfed.tags.model import (
    PhoneFeatures,
    TagModel,
    TagSettings,
    local_update,
    propensity,
    tags_of,
    train_fedavg,
)


def _nll(model: TagModel, x: np.ndarray, match: np.ndarray, cat: np.ndarray, y: np.ndarray) -> float:
    p = propensity(model, PhoneFeatures(x[None, :], match[None]))[0, cat]
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def test_local_update_lowers_the_phones_loss(rng: np.random.Generator) -> None:
    x, match = rng.random(5), (rng.random((4, 1)) < 0.5).astype(np.float32)
    cat, y = np.array([0, 0, 1, 3, 3]), np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    model = TagModel.zeros(4, 1, 5)
    after = model + local_update(model, x, match, cat, y, TagSettings(lr=0.5, local_steps=3))
    assert _nll(after, x, match, cat, y) < _nll(model, x, match, cat, y)
    assert after.b[2] == model.b[2] * (1 - 0.5 * 1e-3) ** 3  # an unseen category only decays


def test_fedavg_learns_a_planted_match(rng: np.random.Generator) -> None:
    # Prepare: phones convert on category c at 30 % when their bag holds c, 2 % otherwise
    u, c = 400, 3
    match = (rng.random((u, c, 1)) < 0.3).astype(np.float32)
    feats = PhoneFeatures(x=np.ones((u, 1), dtype=np.float32), match=match)
    phones = []
    for row in range(u):
        cat = rng.integers(0, c, size=20)
        y = (rng.random(20) < np.where(match[row, cat, 0] > 0, 0.3, 0.02)).astype(np.float64)
        phones.append((row, cat, y))
    # Execute
    model = train_fedavg(feats, phones, TagSettings(rounds=40, clients_per_round=100, lr=1.0), rng)
    # Assert: the match weight is positive and the tags follow the bags
    assert model.a[0] > 1.0
    assert (tags_of(propensity(model, feats), 1.5) == (match[:, :, 0] > 0)).mean() > 0.95


def test_settings_check() -> None:
    with pytest.raises(ValueError, match="tags.rounds must be an int >= 1"):
        TagSettings(rounds=0)
