"""Impressions and their truth.

Impression ``j`` of user ``u`` is a pure function of ``(world, u, j)``: three 64-bit
counter-based hashes (counters ``3j .. 3j+2`` under the user's impression key) give

- the ad: Zipf popularity, independent of the user (the cloud's delivery is not
  targeted in this world, so every ad reaches every kind of user);
- the context: hour (diurnal, persona-tilted), slot (top slots more often), network
  (mostly wifi at night);
- the timestamp: a uniform day in ``[0, days)``, the hour, a uniform second;
- the uniforms that sample click ~ Bernoulli(p_click) and, after a click only,
  conversion ~ Bernoulli(p_cvr).

Label columns (``adfed.data.schema.LABEL_COLUMNS``): ``timestamp`` (seconds from the
start of day 0), ``click``, ``conversion`` and ``label_observed``. A device that never
reports conversions (``label_observed`` False on all its rows) has ``conversion`` 0 on
every row, whatever was sampled: the file holds what a real pipeline would hold. The
sampled conversion of those rows is not stored anywhere; ``truth/`` still has p_cvr for
every row, and the sampled value can be regenerated from ``(seed, params)``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from data_gen import arrow, rng
from data_gen.params import NETWORKS
from data_gen.truth import Logits, UserTruthFeatures, logits, sigmoid, user_truth_features
from data_gen.users import UserState, check_user_ids, user_state

if TYPE_CHECKING:
    from data_gen.world import World

S_IMPRESSION = 20
_DRAWS_PER_IMPRESSION = 3
_SECONDS_PER_DAY = 86_400
_MASK16 = np.uint64(0xFFFF)
_MASK12 = np.uint64(0xFFF)
_MASK32 = np.uint64(0xFFFFFFFF)


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
    """Context of n events: hour, slot, network (int64 [n])."""

    hour: np.ndarray
    slot: np.ndarray
    network: np.ndarray

    def flat(self, num_slots: int) -> np.ndarray:
        """Flat index into the truth ``ctx_*`` tables."""
        return (self.hour * num_slots + self.slot) * len(NETWORKS) + self.network


def _u16(b: np.ndarray, shift: int) -> np.ndarray:
    return np.bitwise_and(np.right_shift(b, np.uint64(shift)), _MASK16).astype(np.float64) \
        * 2.0**-16


def _u32(b: np.ndarray, shift: int) -> np.ndarray:
    return np.bitwise_and(np.right_shift(b, np.uint64(shift)), _MASK32).astype(np.float64) \
        * 2.0**-32


def _k12(b: np.ndarray, shift: int) -> np.ndarray:
    return np.bitwise_and(np.right_shift(b, np.uint64(shift)), _MASK12).astype(np.int64)


def context_from_bits(world: World, b: np.ndarray, persona: np.ndarray) -> Context:
    """Hour, slot and network from bits 0..47 of ``b`` (12-bit draws, 16 bits apart)."""
    hour = world.hour.sample(_k12(b, 0), persona)
    slot = world.slot.sample(_k12(b, 16))
    network = world.network.sample(_k12(b, 32), hour)
    return Context(hour=hour, slot=slot, network=network)


@dataclasses.dataclass(frozen=True, eq=False)
class Draws:
    """Unsorted impressions of a chunk: user row, ad, context, timestamp, label uniforms."""

    rows: np.ndarray  # int64 [n] row in the UserState
    ads: np.ndarray  # int64 [n]
    context: Context
    timestamp: np.ndarray  # int64 [n]
    u_click: np.ndarray  # float64 [n]
    u_conv: np.ndarray  # float64 [n]


def draw_impressions(world: World, st: UserState) -> Draws:
    """Draw every impression of the users in ``st`` (in per-user counter order)."""
    counts = st.num_impressions
    u = len(st)
    rows = np.repeat(np.arange(u, dtype=np.int64), counts)
    starts = np.zeros(u, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    j = np.arange(len(rows), dtype=np.int64) - starts[rows]
    key = rng.keys(world.seed, st.user_id, S_IMPRESSION)[rows]
    ctr = j * _DRAWS_PER_IMPRESSION
    # Three hashes per impression: (ad, click) | (hour, slot, network, day) | (second, conv)
    b = rng.bits(key, ctr)
    ads = world.ad_popularity.sample(_u32(b, 0))
    u_click = _u32(b, 32)
    b = rng.bits(key, ctr + 1)
    ctx = context_from_bits(world, b, st.persona[rows])
    day = (_u16(b, 48) * world.params.days).astype(np.int64)
    b = rng.bits(key, ctr + 2)
    second = (_u16(b, 0) * 3600.0).astype(np.int64)
    ts = day * _SECONDS_PER_DAY + ctx.hour * 3600 + second
    return Draws(rows=rows, ads=ads, context=ctx, timestamp=ts, u_click=u_click,
                 u_conv=_u32(b, 32))


def impression_logits(world: World, uf: UserTruthFeatures, d: Draws) -> Logits:
    """Truth logits of drawn impressions."""
    return logits(world, uf, d.rows, d.ads, d.context.flat(world.params.num_slots))


def file_order(d: Draws) -> np.ndarray:
    """The permutation that puts drawn impressions in file order: by (user row,
    timestamp); stable, so equal timestamps keep counter order."""
    return np.argsort((d.rows << 32) | d.timestamp, kind="stable")


@dataclasses.dataclass(frozen=True, eq=False)
class ImpressionParts:
    """Per-impression truth in file order (see :func:`impression_parts`).

    ``cvr_logit`` is the whole conversion logit; ``cvr_residual`` the user's latent
    residual in it and ``cvr_ad`` the ad's own term (``TruthTables.ad``: per-ad noise plus
    its advertiser's and creative type's effects), so ``cvr_logit - cvr_ad -
    cvr_residual`` is what the fields (cloud and private) and the context explain.
    """

    user_id: np.ndarray  # int64 [n]
    ad_id: np.ndarray  # int64 [n]
    cvr_logit: np.ndarray  # float64 [n]
    cvr_residual: np.ndarray  # float64 [n]
    cvr_ad: np.ndarray  # float64 [n]


def impression_parts(world: World, user_ids: np.ndarray) -> ImpressionParts:
    """Regenerate the truth of users ``user_ids`` (ascending) term by term, in the row
    order :func:`impressions_tables` writes them (analysis only, never a model input)."""
    ids = check_user_ids(user_ids, world.params.num_users)
    st = user_state(world, ids)
    d = draw_impressions(world, st)
    lg = impression_logits(world, user_truth_features(world, st), d)
    o = file_order(d)
    return ImpressionParts(user_id=st.user_id[d.rows][o], ad_id=d.ads[o], cvr_logit=lg.cvr[o],
                           cvr_residual=lg.cvr_residual[o], cvr_ad=world.truth.ad[d.ads, 1][o])


def impressions_from_state(world: World, st: UserState,
                           uf: UserTruthFeatures) -> tuple[pa.Table, pa.Table]:
    """Impressions and truth tables of the users of ``st`` (see :func:`impressions_tables`)."""
    d = draw_impressions(world, st)
    lg = impression_logits(world, uf, d)
    p_click = sigmoid(lg.click)
    p_cvr = sigmoid(lg.cvr)
    click = d.u_click < p_click
    observed = st.label_observed[d.rows]
    conversion = click & (d.u_conv < p_cvr) & observed
    order = file_order(d)
    ctx = d.context
    imp = arrow.table({
        "user_id": arrow.column(st.user_id[d.rows[order]], pa.int64()),
        "ad_id": arrow.column(d.ads[order].astype(np.int32), pa.int32()),
        "hour": arrow.column(ctx.hour[order].astype(np.int32), pa.int32()),
        "slot": arrow.column(ctx.slot[order].astype(np.int32), pa.int32()),
        "network": arrow.column(ctx.network[order].astype(np.int32), pa.int32()),
        "timestamp": arrow.column(d.timestamp[order], pa.int64()),
        "click": arrow.column(click[order].astype(np.int8), pa.int8()),
        "conversion": arrow.column(conversion[order].astype(np.int8), pa.int8()),
        "label_observed": arrow.column(observed[order], pa.bool_()),
    })
    truth = arrow.table({
        "p_click": arrow.column(p_click[order].astype(np.float32), pa.float32()),
        "p_cvr": arrow.column(p_cvr[order].astype(np.float32), pa.float32()),
    })
    return imp, truth


def impressions_tables(world: World, user_ids: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """Impressions of users ``user_ids`` and their aligned truth.

    Parameters
    ----------
    world : the world.
    user_ids : int array [U], ascending for output sorted by ``(user_id, timestamp)``.

    Returns
    -------
    impressions : ``user_id`` int64, ``ad_id`` / ``hour`` / ``slot`` / ``network`` int32,
        ``timestamp`` int64, ``click`` / ``conversion`` int8, ``label_observed`` bool.
    truth : ``p_click``, ``p_cvr`` float32, row-aligned with ``impressions``.
    """
    ids = check_user_ids(user_ids, world.params.num_users)
    st = user_state(world, ids)
    return impressions_from_state(world, st, user_truth_features(world, st))
