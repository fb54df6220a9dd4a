"""The global tables of a synthetic world, built once from ``(params, seed)``.

Everything that is shared by all users (persona parameters, field distributions, app and
ad tables, the hidden truth coefficients) is drawn here from
``np.random.Generator(np.random.Philox(key=[seed, part]))``, one independent Philox
stream per ``part``, so that a table does not change when another table's size does.
Per-user values are drawn elsewhere with the counter-based :mod:`data_gen.rng`.

Building a world is cheap (well under a second for a million ads); every worker process
builds its own copy from ``(params, seed)`` rather than receiving it pickled.
:func:`draw_world` draws the tables; :func:`data_gen.calibrate.build_world` then
calibrates the truth on users and impressions, which this module does not depend on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from adfed.data.schema import Schema
from data_gen import rng
from data_gen.params import HOURS, WorldParams, build_schema
from data_gen.truth import TruthTables, build_truth_tables
from data_gen.users import INSTALL_SCALE, INTENT_SCALE

#: Philox stream ids of the global tables.
_PART_PERSONAS, _PART_APPS, _PART_ADS, _PART_TRUTH = range(1, 5)
_MASK64 = 0xFFFFFFFFFFFFFFFF
_AGE_7 = (0.05, 0.18, 0.22, 0.24, 0.16, 0.09, 0.06)


def philox(seed: int, part: int) -> np.random.Generator:
    """The numpy Generator of one global table ``part`` of world ``seed``."""
    key = np.array([seed & _MASK64, part], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


@dataclasses.dataclass(frozen=True, eq=False)
class World:
    """Global tables of one world (arrays are read-only by convention).

    Shapes: K personas, D latent dims, C_app app categories, C_ad ad categories,
    A ads, V apps.
    """

    params: WorldParams
    seed: int
    schema: Schema
    persona_cdf: np.ndarray  # [K]
    persona_means: np.ndarray  # [K, D]
    user_field_cdfs: dict[str, rng.RowCategorical]  # rows: persona (os: device brand)
    app_loadings: np.ndarray  # [C_app, D]: install/usage propensity per unit of taste
    usage_category: rng.LookupTable  # rows: persona; habitual app-category use
    app_category: np.ndarray  # [V] int: category of each app
    app_lookup: rng.GuideTable  # per-persona within-category app cdfs, see users._usage
    ad_cat_latent: np.ndarray  # [C_ad, D]
    membership_weights: np.ndarray  # float32 [D, C_app + C_ad]: install and intent logits
    membership_bias: np.ndarray  # float32 [K, C_app + C_ad] (intents shift per persona)
    persona_activity: np.ndarray  # [K] log-multiplier of the impressions per user
    ad_advertiser: np.ndarray  # [A] int32
    ad_category: np.ndarray  # [A] int32
    ad_creative: np.ndarray  # [A] int32
    ad_latent: np.ndarray  # [A, D]
    ad_bid: np.ndarray  # [A] float32
    ad_popularity: rng.Categorical  # Zipf over a random rank order
    hour: rng.LookupTable  # rows: persona
    slot: rng.LookupTable
    network: rng.LookupTable  # rows: hour
    unobserved_prob: np.ndarray  # [num_os] P(device never reports conversions | os)
    truth: TruthTables


def _zipf(n: int, s: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -s
    return w / w.sum()


def _tilted(gen: np.random.Generator, base: np.ndarray, k: int, sd: float) -> np.ndarray:
    """[k, V] distributions: ``base`` with a persona-specific log-normal tilt."""
    logits = np.log(base)[None, :] + sd * gen.normal(size=(k, len(base)))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _base_dists(p: WorldParams) -> dict[str, np.ndarray]:
    if p.num_age_buckets == len(_AGE_7):
        age = np.array(_AGE_7)
    else:
        x = np.arange(p.num_age_buckets)
        age = np.exp(-0.5 * ((x - 0.4 * p.num_age_buckets) / max(1.0, p.num_age_buckets / 4)) ** 2)
    gender = np.ones(p.num_genders)
    gender[-1] = 0.08 if p.num_genders > 1 else 1.0
    return {
        "age_bucket": age / age.sum(),
        "gender": gender / gender.sum(),
        "region": _zipf(p.num_regions, 0.7),
        "device_brand": _zipf(p.num_device_brands, 1.0),
    }


def _os_given_brand(p: WorldParams) -> np.ndarray:
    """[brands, os]: brand 0 runs os 1; the others mostly os 0, a few the rest."""
    t = np.zeros((p.num_device_brands, p.num_os))
    t[0, 1] = 1.0
    t[1:, 0] = 0.96
    t[1:, 2:] = 0.04 / max(1, p.num_os - 2)
    t[1:, 1] = 0.0 if p.num_os > 2 else 0.04
    return t


def _personas(p: WorldParams, seed: int) -> dict[str, Any]:
    gen = philox(seed, _PART_PERSONAS)
    k = p.num_personas
    weights = gen.dirichlet(np.full(k, 3.0))
    means = gen.normal(size=(k, p.latent_dim))
    dists = {name: _tilted(gen, base, k, 0.5) for name, base in _base_dists(p).items()}
    os_table = _os_given_brand(p)
    cdfs = {name: rng.RowCategorical(rng.make_cdf(d)) for name, d in dists.items()}
    cdfs["os"] = rng.RowCategorical(rng.make_cdf(os_table))
    # Devices on os 1 withhold conversions twice as often as the others; rescaled so that
    # the population share is params.unobserved_fraction.
    p_os = weights @ dists["device_brand"] @ os_table
    mult = np.ones(p.num_os)
    mult[1] = 2.0
    unobserved = np.clip(p.unobserved_fraction * mult / float(p_os @ mult), 0.0, 0.95)
    hours = np.arange(HOURS)
    diurnal = 1.0 + 0.85 * np.cos(2 * np.pi * (hours - 20.5) / HOURS)  # peak ~20-21h
    hour_p = _tilted(gen, diurnal / diurnal.sum(), k, 0.3)
    # Non-IID beyond taste: personas differ in how many purchase intents they hold (so
    # in conversion rate) and in how active they are (so in rows per client). Evenly
    # spread levels, shuffled: every seed gets the same spread between personas.
    spread = np.linspace(-1.0, 1.0, k) * np.sqrt(3.0) if k > 1 else np.zeros(1)
    intent_shift = 0.8 * spread[gen.permutation(k)]
    activity = 0.3 * spread[gen.permutation(k)]
    return {"persona_cdf": rng.make_cdf(weights), "persona_means": means,
            "persona_intent_shift": intent_shift, "persona_activity": activity,
            "user_field_cdfs": cdfs, "unobserved_prob": unobserved,
            "hour": rng.LookupTable(rng.make_cdf(hour_p))}


def _apps(p: WorldParams, seed: int, persona_means: np.ndarray) -> dict[str, Any]:
    gen = philox(seed, _PART_APPS)
    c, d, v, k = p.num_app_categories, p.latent_dim, p.num_apps, p.num_personas
    loadings = gen.normal(size=(c, d)) / np.sqrt(d)
    app_bias = gen.normal(-1.6, 0.8, size=c)
    usage_bias = gen.normal(0.0, 1.0, size=c)
    usage_logits = 1.5 * persona_means @ loadings.T + usage_bias  # [K, C_app]
    usage_p = np.exp(usage_logits - usage_logits.max(axis=1, keepdims=True))
    category = (np.arange(v) * c) // v  # contiguous blocks; every category has an app
    starts = np.searchsorted(category, np.arange(c))
    sizes = np.diff(np.append(starts, v))
    # Zipf within each category over a random order of its apps, tilted per persona.
    perm = np.argsort(category + gen.random(v), kind="stable")  # by category, then random
    rank = np.empty(v, dtype=np.int64)
    rank[perm] = np.arange(v) - starts[category[perm]]
    within = (1.0 + rank) ** -1.1
    w = within[None, :] * np.exp(0.7 * gen.normal(size=(k, v)))  # [K, V]
    cum = np.cumsum(w, axis=1)
    before = np.concatenate([np.zeros((k, 1)), cum[:, :-1]], axis=1)[:, starts]  # [K, C]
    cum = (cum - before[:, category]) / (cum[:, starts + sizes - 1] - before)[:, category]
    cum[:, starts + sizes - 1] = 1.0  # exact segment ends
    # Row k, app i -> k * C + category(i) + within-category cdf: one sorted array.
    flat = (np.arange(k)[:, None] * c + category[None, :] + cum).ravel()
    return {"app_loadings": loadings, "app_bias": app_bias.astype(np.float32),
            "usage_category": rng.LookupTable(rng.make_cdf(usage_p)),
            "app_category": category.astype(np.int32), "app_lookup": rng.GuideTable(flat)}


def _ads(p: WorldParams, seed: int) -> dict[str, Any]:
    gen = philox(seed, _PART_ADS)
    c, d, a = p.num_ad_categories, p.latent_dim, p.num_ads
    cat_latent = gen.normal(size=(c, d))
    intent_bias = gen.normal(-3.0, 0.5, size=c)
    cat_pop = gen.dirichlet(np.full(c, 2.0))
    adv_cat = gen.choice(c, size=p.num_advertisers, p=cat_pop)
    advertiser = gen.choice(p.num_advertisers, size=a, p=_zipf(p.num_advertisers, 0.6))
    own = gen.random(a) < 0.85  # most ads are in their advertiser's category
    category = np.where(own, adv_cat[advertiser], gen.choice(c, size=a, p=cat_pop))
    creative = gen.choice(p.num_creative_types, size=a, p=_zipf(p.num_creative_types, 1.0))
    latent = cat_latent[category] + 0.7 * gen.normal(size=(a, d))
    cat_bid = gen.normal(0.0, 0.4, size=c)
    bid = np.exp(cat_bid[category] + 0.7 * gen.normal(size=a))
    rank = gen.permutation(a)  # popularity rank of each ad
    return {"ad_cat_latent": cat_latent, "intent_bias": intent_bias.astype(np.float32),
            "ad_advertiser": advertiser.astype(np.int32),
            "ad_category": category.astype(np.int32), "ad_creative": creative.astype(np.int32),
            "ad_latent": latent.astype(np.float32), "ad_bid": bid.astype(np.float32),
            "ad_popularity": rng.Categorical(rng.make_cdf((rank + 1.0) ** -p.ad_zipf_exponent))}


def _context(p: WorldParams) -> dict[str, Any]:
    slot = 0.8 ** np.arange(p.num_slots)
    net = np.tile(np.array([0.55, 0.30, 0.10, 0.05]), (HOURS, 1))
    night = (np.arange(HOURS) >= 21) | (np.arange(HOURS) <= 7)
    net[night] = [0.75, 0.17, 0.05, 0.03]  # at home at night: mostly wifi
    return {"slot": rng.LookupTable(rng.make_cdf(slot)),
            "network": rng.LookupTable(rng.make_cdf(net))}


def draw_world(params: WorldParams, seed: int) -> World:
    """The global tables of world ``(params, seed)``, truth not yet calibrated.

    Its truth intercepts and feature standardisation are placeholders; use
    :func:`data_gen.calibrate.build_world` for the world that data is drawn from.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an int >= 0; got {seed!r}")
    seed = int(seed)
    tables: dict[str, Any] = {}
    tables.update(_personas(params, seed))
    tables.update(_apps(params, seed, tables["persona_means"]))
    ads = _ads(params, seed)
    tables.update(ads)
    tables.update(_context(params))
    # users.UserState: installed ~ sigmoid(INSTALL_SCALE * W z + b_app),
    # intent ~ sigmoid(INTENT_SCALE * L z / sqrt(D) + b_intent), both in one product.
    tables["membership_weights"] = np.concatenate(
        [INSTALL_SCALE * tables["app_loadings"].T,
         INTENT_SCALE / np.sqrt(params.latent_dim) * tables["ad_cat_latent"].T],
        axis=1).astype(np.float32)
    shift = tables.pop("persona_intent_shift")
    app_bias, intent_bias = tables.pop("app_bias"), tables.pop("intent_bias")
    tables["membership_bias"] = np.concatenate(
        [np.broadcast_to(app_bias, (len(shift), len(app_bias))),
         intent_bias[None, :] + shift[:, None]], axis=1).astype(np.float32)
    truth = build_truth_tables(philox(seed, _PART_TRUTH), params, ads)
    return World(params=params, seed=seed, schema=build_schema(params), truth=truth, **tables)
