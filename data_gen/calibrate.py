"""Build a world: draw its tables, then calibrate its truth on a fixed pseudo-population.

The pseudo-population are users with ids ``2**62 + i``, far above any real user id, so
calibration is deterministic for ``(params, seed)`` and never reuses a real user's
random numbers. It sets the standardisation of the private features and the two
intercepts (to :data:`data_gen.truth.TARGET_CLICK_RATE` and
:data:`data_gen.truth.TARGET_CVR`). Calibration draws users and impressions, so it sits
above :mod:`data_gen.world` (tables only), not inside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from data_gen.impressions import draw_impressions, impression_logits
from data_gen.params import WorldParams
from data_gen.truth import (
    TARGET_CLICK_RATE,
    TARGET_CVR,
    TruthTables,
    installed_taste,
    sigmoid,
    small_matmul,
    usage_taste,
    user_truth_features,
)
from data_gen.users import user_state
from data_gen.world import World, draw_world

if TYPE_CHECKING:
    from data_gen.users import UserState

CALIBRATION_USERS = 4096
PSEUDO_USER_BASE = 2**62


def build_world(params: WorldParams, seed: int) -> World:
    """Build the global tables of world ``(params, seed)`` and calibrate its truth.

    The truth intercepts are calibrated on a fixed pseudo-population (user ids above
    any real one) so that the click rate and the conversion rate among clicks land near
    the values documented in :mod:`data_gen.truth`, whatever the sizes.
    """
    world = draw_world(params, seed)
    return dataclasses.replace(world, truth=calibrate(world))


def _solve_bias(rate: Callable[[float], float], target: float) -> float:
    """The intercept b with ``rate(b) == target`` (rate increasing in b), by bisection."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if rate(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def calibrate(world: World) -> TruthTables:
    """Calibrated truth tables of ``world`` (its own tables are left untouched)."""
    ids = PSEUDO_USER_BASE + np.arange(CALIBRATION_USERS, dtype=np.int64)
    st = user_state(world, ids)
    t = dataclasses.replace(
        world.truth,
        install_mean=installed_taste(world, st.installed).mean(axis=0),
        usage_mean=usage_taste(world, st.usage).mean(axis=0),
        bias=np.zeros(2), interest_mean=0.0, interest_sd=1.0, usage_sd=1.0,
        intents_mean=float(st.intent.sum(axis=1).mean()),
        intents_sd=float(st.intent.sum(axis=1).std()) or 1.0,
    )
    w = dataclasses.replace(world, truth=t)
    d = draw_impressions(w, st)
    uf = user_truth_features(w, st)
    interest = (np.take(uf.taste, d.rows, axis=0).astype(np.float64)
                * np.take(world.ad_latent, d.ads, axis=0)).sum(axis=1)
    usage = _usage_scores(w, st)[d.rows, world.ad_category[d.ads]]
    t = dataclasses.replace(t, interest_mean=float(interest.mean()),
                            interest_sd=float(interest.std()) or 1.0,
                            usage_sd=float(usage.std()) or 1.0)
    w = dataclasses.replace(world, truth=t)
    lg = impression_logits(w, user_truth_features(w, st), d)
    bias_click = _solve_bias(lambda b: float(sigmoid(b + lg.click).mean()), TARGET_CLICK_RATE)
    p_click = sigmoid(bias_click + lg.click)
    bias_cvr = _solve_bias(
        lambda b: float((p_click * sigmoid(b + lg.cvr)).sum() / p_click.sum()), TARGET_CVR)
    return dataclasses.replace(t, bias=np.array([bias_click, bias_cvr]))


def _usage_scores(world: World, st: UserState) -> np.ndarray:
    """[U, C_ad] unstandardised usage relevance (as in ``user_truth_features``)."""
    t = world.truth
    return small_matmul(usage_taste(world, st.usage) - t.usage_mean, world.ad_cat_latent.T)
