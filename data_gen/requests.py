"""Held-out rerank requests: the cloud's candidate ads for a user, with full truth.

A deterministic ``request_user_fraction`` of users (a pure function of the user id)
have 1..``max_requests_per_user`` requests, on day ``days`` (just after the impression
window). Each request has a context and ``candidates_per_request`` *distinct* ads
drawn by popularity (the cloud's candidate set, in draw order), with the truth
``p_click`` / ``p_cvr`` of every candidate and its ``bid``. Requests are not
impressions: they never appear in ``impressions/``.

Columns: ``request_id`` int64 (``user_id * max_requests_per_user + k``), ``user_id``
int64, ``hour`` / ``slot`` / ``network`` int32, ``timestamp`` int64,
``candidates`` list<int32>, ``p_click`` / ``p_cvr`` / ``bid`` list<float32>.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from data_gen import arrow, rng
from data_gen.impressions import context_from_bits
from data_gen.truth import UserTruthFeatures, logits, sigmoid, user_truth_features
from data_gen.users import check_user_ids, user_state

if TYPE_CHECKING:
    from data_gen.users import UserState
    from data_gen.world import World

S_REQUEST_USER = 40
S_REQUEST = 41
_OVERSAMPLE = 2
# Counters under a request's key: 0 .. N-1 candidates (two per hash), then these.
_CTR_TOP_UP = 1 << 20
_CTR_CONTEXT = 1 << 21
_CTR_SECOND = _CTR_CONTEXT + 1


def request_counts(world: World, user_ids: np.ndarray) -> np.ndarray:
    """Number of rerank requests of each user (mostly 0), int64 [U]."""
    p = world.params
    u = rng.uniform(rng.keys(world.seed, user_ids, S_REQUEST_USER)[:, None], np.arange(2)[None, :])
    count = 1 + np.floor(u[:, 1] * p.max_requests_per_user).astype(np.int64)
    return np.where(u[:, 0] < p.request_user_fraction, count, 0)


def _first_unique(cand: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``cand`` [R, M]: mask of the first ``n`` distinct values, row complete?"""
    order = np.argsort(cand, axis=1, kind="stable")
    srt = np.take_along_axis(cand, order, axis=1)
    new = np.ones_like(srt, dtype=bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    first = np.empty_like(new)
    np.put_along_axis(first, order, new, axis=1)
    keep = first & (np.cumsum(first, axis=1) <= n)
    return keep, keep.sum(axis=1) == n


def _candidates(world: World, keys: np.ndarray) -> np.ndarray:
    """[R, N] distinct candidate ads per request key."""
    p = world.params
    n, m = p.candidates_per_request, _OVERSAMPLE * p.candidates_per_request
    u = rng.uniforms32(keys, m)
    cand = world.ad_popularity.sample(u)
    keep, full = _first_unique(cand, n)
    out = np.empty((len(keys), n), dtype=np.int64)
    out[full] = cand[full][keep[full]].reshape(-1, n)
    for r in np.flatnonzero(~full):  # rare: tiny or extremely skewed ad sets
        row = list(dict.fromkeys(cand[r][keep[r]].tolist()))
        ctr = _CTR_TOP_UP
        while len(row) < n:  # top up uniformly over all ads
            extra = (rng.uniform(keys[r], ctr + np.arange(4 * n)) * p.num_ads).astype(np.int64)
            row = list(dict.fromkeys(row + extra.tolist()))[:n]
            ctr += 4 * n
        out[r] = row
    return out


def requests_from_state(world: World, st: UserState, uf: UserTruthFeatures) -> pa.Table:
    """Rerank requests of the users of ``st`` (see module docstring)."""
    p = world.params
    counts = request_counts(world, st.user_id)
    rows = np.repeat(np.arange(len(st), dtype=np.int64), counts)
    starts = np.cumsum(counts) - counts
    k = np.arange(len(rows), dtype=np.int64) - starts[rows]
    request_id = st.user_id[rows] * p.max_requests_per_user + k
    keys = rng.keys(world.seed, request_id, S_REQUEST)
    ctx = context_from_bits(world, rng.bits(keys, _CTR_CONTEXT), st.persona[rows])
    second = (rng.uniform(keys, _CTR_SECOND) * 3600.0).astype(np.int64)
    timestamp = p.days * 86_400 + ctx.hour * 3600 + second
    cand = _candidates(world, keys)
    n = p.candidates_per_request
    flat_rows = np.repeat(rows, n)
    lg = logits(world, uf, flat_rows, cand.ravel(), np.repeat(ctx.flat(p.num_slots), n))
    offsets = np.arange(len(rows) + 1) * n

    def lst(values: np.ndarray, dtype: pa.DataType) -> pa.ListArray:
        return arrow.list_column(offsets, values, dtype)

    return arrow.table({
        "request_id": arrow.column(request_id, pa.int64()),
        "user_id": arrow.column(st.user_id[rows], pa.int64()),
        "hour": arrow.column(ctx.hour.astype(np.int32), pa.int32()),
        "slot": arrow.column(ctx.slot.astype(np.int32), pa.int32()),
        "network": arrow.column(ctx.network.astype(np.int32), pa.int32()),
        "timestamp": arrow.column(timestamp, pa.int64()),
        "candidates": lst(cand.ravel().astype(np.int32), pa.int32()),
        "p_click": lst(sigmoid(lg.click).astype(np.float32), pa.float32()),
        "p_cvr": lst(sigmoid(lg.cvr).astype(np.float32), pa.float32()),
        "bid": lst(world.ad_bid[cand.ravel()], pa.float32()),
    })


def requests_table(world: World, user_ids: np.ndarray) -> pa.Table:
    """Rerank requests of users ``user_ids`` (most users have none)."""
    ids = check_user_ids(user_ids, world.params.num_users)
    st = user_state(world, ids)
    return requests_from_state(world, st, user_truth_features(world, st))
