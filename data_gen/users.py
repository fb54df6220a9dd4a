"""Users: persona, taste, cloud-visible and device-private fields, residuals.

Every quantity of user ``u`` is a pure function of ``(world, u)``: draws come from
:mod:`data_gen.rng` keyed by ``(seed, u, stream)``, so a chunk of users can be built
alone and equals the same users built inside any other chunk.

Generative story of one user::

    persona k ~ Categorical(persona weights)
    z ~ N(mean_k, 0.8^2 I)                         taste (latent, never stored)
    age, gender, region, brand ~ Categorical(base tilted by persona)   (weak link)
    os ~ Categorical(. | brand)
    installed_apps: category c with prob sigmoid(1.5 * W_c . z + b_c)
    app_usage: seq_len draws; category: with prob 0.7 a uniformly chosen installed
               category, else the persona's habits softmax(1.5 * W mean_k + b');
               app within the category ~ persona-tilted Zipf
    intent: ad category c with prob sigmoid(2 * L_c . z / sqrt(D) + b''_c + s_k)
            (s_k: the persona's shopping propensity)
    r_click, r_cvr: the latent residuals of data_gen.truth
    label_observed ~ Bernoulli(1 - P(unobserved | os))   (whole device)
    impressions ~ round(median * exp(sigma * N(0, 1) + a_k)), clipped to [1, max]
                  (a_k: the persona's activity level)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from data_gen import arrow, rng
from data_gen.truth import small_matmul

if TYPE_CHECKING:
    from data_gen.world import World

S_PERSONA, S_TASTE, S_CLOUD, S_MEMBERSHIP, S_USAGE, S_RESIDUAL, S_OBSERVED, \
    S_ACTIVITY = range(1, 9)
TASTE_NOISE = 0.8
INSTALL_SCALE = 1.5
USAGE_FROM_INSTALLED = 0.7
INTENT_SCALE = 2.0


@dataclasses.dataclass(frozen=True, eq=False)
class UserState:
    """Everything about a chunk of U users (row i is ``user_id[i]``)."""

    user_id: np.ndarray  # int64 [U]
    persona: np.ndarray  # int64 [U]
    taste: np.ndarray  # float64 [U, D]
    age: np.ndarray  # int32 [U]
    gender: np.ndarray
    region: np.ndarray
    brand: np.ndarray
    os: np.ndarray
    installed: np.ndarray  # bool [U, C_app]
    usage: np.ndarray  # int32 [U, seq_len] app ids, oldest first
    intent: np.ndarray  # bool [U, C_ad]
    residual_click: np.ndarray  # float64 [U]
    residual_cvr: np.ndarray  # float64 [U]
    label_observed: np.ndarray  # bool [U]
    num_impressions: np.ndarray  # int64 [U]

    def __len__(self) -> int:
        return len(self.user_id)


def check_user_ids(user_ids: np.ndarray, num_users: int | None = None) -> np.ndarray:
    """Validate and return ``user_ids`` as int64 [U] (any order, ids >= 0)."""
    ids = np.asarray(user_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"user_ids must be a 1-D integer array; got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError(f"user_ids must be >= 0; got {int(ids.min())}")
    if num_users is not None and ids.size and ids.max() >= num_users:
        raise ValueError(f"user_ids must be < num_users={num_users}; got {int(ids.max())}")
    return ids


def personas(world: World, user_ids: np.ndarray) -> np.ndarray:
    """Persona of each user, int64 [U] (cheap: one draw per user)."""
    k = rng.keys(world.seed, user_ids, S_PERSONA)
    return rng.categorical(rng.uniform(k, 0), world.persona_cdf)


def _cloud_fields(world: World, ids: np.ndarray, persona: np.ndarray) -> dict[str, np.ndarray]:
    u = rng.uniforms32(rng.keys(world.seed, ids, S_CLOUD), 5)
    cdfs = world.user_field_cdfs
    out = {name: cdfs[name].sample(u[:, i], persona).astype(np.int32)
           for i, name in enumerate(("age_bucket", "gender", "region", "device_brand"))}
    out["os"] = cdfs["os"].sample(u[:, 4], out["device_brand"]).astype(np.int32)
    return out


def _usage(world: World, ids: np.ndarray, persona: np.ndarray,
           installed: np.ndarray) -> np.ndarray:
    """Recent app usage [U, seq_len]: apps of installed categories, or persona habits."""
    p = world.params
    length, c = p.seq_len, p.num_app_categories
    u_cat, u_app = rng.uniform_pair(rng.keys(world.seed, ids, S_USAGE)[:, None],
                                    np.arange(length)[None, :])
    # The installed categories of each user, as a ragged array (values, starts, counts).
    _, inst_cats = np.nonzero(installed)
    counts = np.count_nonzero(installed, axis=1)
    starts = np.cumsum(counts) - counts
    from_installed = (u_cat < USAGE_FROM_INSTALLED) & (counts > 0)[:, None]
    # Split u_cat: below the threshold it picks an installed category, above it the
    # persona's habitual distribution; either part rescaled to a fresh uniform.
    pick = np.minimum((u_cat / USAGE_FROM_INSTALLED * counts[:, None]).astype(np.int64),
                      np.maximum(counts - 1, 0)[:, None])
    own = inst_cats[np.minimum(starts[:, None] + pick, max(len(inst_cats) - 1, 0))] \
        if len(inst_cats) else np.zeros_like(pick)
    u_hab = (u_cat - USAGE_FROM_INSTALLED) / (1.0 - USAGE_FROM_INSTALLED)
    k_hab = np.clip((u_hab * (1 << world.usage_category.bits)).astype(np.int64), 0,
                    (1 << world.usage_category.bits) - 1)
    habit = world.usage_category.sample(k_hab, persona[:, None])
    cats = np.where(from_installed, own, habit)
    # world.app_lookup holds, for persona k and category c, the within-category cdf of
    # the apps shifted by k * C + c: one search finds the app.
    query = (persona[:, None] * c + cats) + u_app
    return (world.app_lookup.search(query) % p.num_apps).astype(np.int32)


def user_state(world: World, user_ids: np.ndarray) -> UserState:
    """Materialise users ``user_ids`` (int array [U], any ids >= 0, any order)."""
    p, seed = world.params, world.seed
    ids = check_user_ids(user_ids)
    persona = personas(world, ids)
    noise = rng.normal(rng.keys(seed, ids, S_TASTE)[:, None], np.arange(p.latent_dim)[None, :])
    taste = np.take(world.persona_means, persona, axis=0) + TASTE_NOISE * noise
    cloud = _cloud_fields(world, ids, persona)
    installed, intent = _memberships(world, ids, persona, taste)
    res = rng.normal(rng.keys(seed, ids, S_RESIDUAL)[:, None], np.arange(2)[None, :])
    rho = p.residual_corr
    r_click = p.residual_sd * res[:, 0]
    r_cvr = p.residual_sd * (rho * res[:, 0] + np.sqrt(1.0 - rho * rho) * res[:, 1])
    observed = rng.uniform(rng.keys(seed, ids, S_OBSERVED), 0) >= world.unobserved_prob[cloud["os"]]
    act = rng.normal(rng.keys(seed, ids, S_ACTIVITY), 0)
    activity = p.impressions_sigma * act + world.persona_activity[persona]
    count = np.rint(p.impressions_median * np.exp(activity))
    count = np.clip(count, 1, p.max_impressions).astype(np.int64)
    return UserState(
        user_id=ids, persona=persona, taste=taste, age=cloud["age_bucket"],
        gender=cloud["gender"], region=cloud["region"], brand=cloud["device_brand"],
        os=cloud["os"], installed=installed, usage=_usage(world, ids, persona, installed),
        intent=intent, residual_click=r_click, residual_cvr=r_cvr, label_observed=observed,
        num_impressions=count,
    )


def _memberships(world: World, ids: np.ndarray, persona: np.ndarray,
                 taste: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Installed app categories [U, C_app] and intents [U, C_ad], bool.

    Each is Bernoulli(sigmoid(logit)): ``u < sigmoid(x)`` is tested as
    ``u * (1 + exp(-x)) < 1``, in float32 with 21-bit uniforms (ample for these
    probabilities).
    """
    c_app = world.params.num_app_categories
    logit = small_matmul(taste.astype(np.float32), world.membership_weights)
    logit += np.take(world.membership_bias, persona, axis=0)
    u = rng.uniforms_small(rng.keys(world.seed, ids, S_MEMBERSHIP), logit.shape[1])
    np.negative(logit, out=logit)
    np.exp(logit, out=logit)
    logit += 1.0
    hit = u * logit < 1.0
    return np.ascontiguousarray(hit[:, :c_app]), np.ascontiguousarray(hit[:, c_app:])


def multi_hot_list(mask: np.ndarray) -> pa.ListArray:
    """A bool matrix [U, V] as a list<int32> column of the set ids of each row."""
    rows, cols = np.nonzero(mask)
    offsets = np.zeros(mask.shape[0] + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=mask.shape[0]), out=offsets[1:])
    return arrow.list_column(offsets, cols, pa.int32())


def fixed_list(values: np.ndarray) -> pa.ListArray:
    """An int matrix [U, L] as a list<int32> column."""
    u, length = values.shape
    offsets = (np.arange(u + 1) * length).astype(np.int32)
    return arrow.list_column(offsets, values.ravel(), pa.int32())


def users_table_from_state(st: UserState) -> pa.Table:
    """The ``users.parquet`` rows of a :class:`UserState`."""
    return arrow.table({
        "user_id": arrow.column(st.user_id, pa.int64()),
        "age_bucket": arrow.column(st.age, pa.int32()),
        "gender": arrow.column(st.gender, pa.int32()),
        "region": arrow.column(st.region, pa.int32()),
        "device_brand": arrow.column(st.brand, pa.int32()),
        "os": arrow.column(st.os, pa.int32()),
        "installed_apps": multi_hot_list(st.installed),
        "app_usage": fixed_list(st.usage),
        "intent": multi_hot_list(st.intent),
    })


def users_table(world: World, user_ids: np.ndarray) -> pa.Table:
    """``users.parquet`` rows of users ``user_ids`` (in the given order).

    Columns: ``user_id`` int64, the cloud fields int32, ``installed_apps`` /
    ``app_usage`` / ``intent`` list<int32>.
    """
    ids = check_user_ids(user_ids, world.params.num_users)
    return users_table_from_state(user_state(world, ids))
