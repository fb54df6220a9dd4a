"""The phone's order of one request and the settings' checks."""

from __future__ import annotations

import numpy as np
import pytest

from adfed.rerank.device import RerankSettings, cloud_sends, rerank_one


def test_rerank_one_orders_by_the_objective() -> None:
    bid = np.array([1.0, 10.0, 1.0])
    ctcvr = np.array([0.3, 0.05, 0.2])
    assert rerank_one(RerankSettings(), bid, ctcvr).tolist() == [0, 2, 1]
    assert rerank_one(RerankSettings(objective="revenue"), bid, ctcvr).tolist() == [1, 0, 2]


def test_blend_zero_follows_the_cloud_and_needs_its_scores() -> None:
    bid = np.ones(3)
    device, cloud = np.array([0.3, 0.1, 0.2]), np.array([0.1, 0.3, 0.2])
    assert rerank_one(RerankSettings(blend=0.0), bid, device, cloud).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="needs the cloud's scores"):
        rerank_one(RerankSettings(blend=0.5), bid, device)


def test_cloud_sends_its_top_n_by_ecpm() -> None:
    bid = np.array([[1.0, 2.0, 3.0]])
    p = np.array([[0.5, 0.5, 0.1]])
    assert cloud_sends(bid, p, np.ones_like(p), 2).tolist() == [[1, 0]]
    assert cloud_sends(bid, p, np.ones_like(p), 0).shape == (1, 3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"blend": 1.5}, "--blend must be in"), ({"objective": "clicks"}, "--objective must be"),
    ({"top_n": -1}, "--top-n must be"), ({"k": 0}, "--k and every cut-off"),
    ({"seed": -1}, "--seed must be an int >= 0; got -1"),
])
def test_settings_refuse_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RerankSettings(**kwargs)
