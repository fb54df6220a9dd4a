"""The latency table's synthetic requests."""

from __future__ import annotations

import numpy as np

from adfed.rerank.latency import synthetic_request
from adfed.rerank.requests import Requests


def _one_request() -> Requests:
    return Requests(request_id=np.array([7]), user_id=np.array([3]),
                    context={"hour": np.array([1]), "slot": np.array([0]), "network": np.array([2])},
                    candidates=np.array([[4, 5]]), bid=np.ones((1, 2), dtype=np.float32))


def test_a_world_with_fewer_ads_than_candidates_is_still_timed(rng: np.random.Generator) -> None:
    # Prepare: a world of 60 ads, the table's 100- and 200-candidate rows
    req = _one_request()
    # Execute
    got = [synthetic_request(req, 0, n, 60, rng) for n in (20, 100, 200)]
    # Assert: every size is built from the world's ads; distinct where the world has enough
    assert [r.candidates.shape for r in got] == [(1, 20), (1, 100), (1, 200)]
    assert all(((r.candidates >= 0) & (r.candidates < 60)).all() for r in got)
    assert len(np.unique(got[0].candidates)) == 20
    assert got[1].user_id.tolist() == [3] and got[1].context["hour"].tolist() == [1]
