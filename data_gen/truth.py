"""The hidden truth: p_click and p_cvr of any (user, ad, context).

Both are logistic in a sum of terms, each a function of observable fields, plus a
per-user residual that no field explains::

    logit p_click = b_click + ad_click[ad] + demo_click[age, gender, ad_category]
                  + region_click[region] + os_click[os, ad_category]
                  + ctx_click[hour, slot, network]
                  + w_interest_click * interest + w_usage_click * usage_match
                  + w_intent_click * intent_match + w_shopper_click * shopper
                  + r_click[user]
    logit p_cvr   = (same shape, own coefficients) + r_cvr[user]

- cloud-visible: ``ad_*`` (ad id, advertiser, creative), ``demo_*``, ``region_*``,
  ``os_*``, ``ctx_*``;
- device-private: ``interest`` = standardised ``t_u . v_ad`` with ``t_u`` the taste the
  user's *installed app categories* reveal and ``v_ad`` the ad's latent vector;
  ``usage_match`` = standardised relevance of the *recent app-usage sequence* to the
  ad's category; ``intent_match`` = the ad's category is among the user's *intents*;
  ``shopper`` = standardised number of intents (users with many convert more);
- ``r_click ~ N(0, residual_sd)``, ``r_cvr = corr * r_click + sqrt(1 - corr^2) * N(0,
  residual_sd)``: a user's own history reveals it, no field does.

Private terms carry most of the conversion signal (the reason on-device models exist);
their weights are module constants, chosen so that the oracle CVR AUC on clicked
impressions is about 0.8 (0.78-0.86 over seeds 0-11 at 20k users) and the residual is
worth about 0.015 AUC. Intercepts are calibrated per world (see
:mod:`data_gen.calibrate`) to ``TARGET_CLICK_RATE`` and ``TARGET_CVR`` (conversion
rate among clicks).

Everything per user is computed in a fixed order of float operations (see
:func:`small_matmul`), so a user's probabilities are bit-identical in any chunk.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from data_gen.params import HOURS, WorldParams

if TYPE_CHECKING:
    from data_gen.users import UserState
    from data_gen.world import World

TARGET_CLICK_RATE = 0.03
TARGET_CVR = 0.10
#: Weights of the private terms (standardised features) on the click / cvr logit.
W_INTEREST = (0.45, 0.42)
W_USAGE = (0.20, 0.30)
W_INTENT = (0.50, 0.70)
W_SHOPPER = (0.15, 0.35)


@dataclasses.dataclass(frozen=True, eq=False)
class TruthTables:
    """Coefficients of the truth (see module docstring).

    Every table has a trailing axis of 2: ``[..., 0]`` for the click logit, ``[..., 1]``
    for the conversion logit. ``demo`` is flattened [age, gender, C_ad], ``os``
    [os, C_ad], ``ctx`` [hour, slot, network]. ``bias``, ``install_mean``,
    ``usage_mean``, ``interest_mean`` and the ``*_sd`` standardise the private features
    and hit the target rates; they are set by calibration.
    """

    bias: np.ndarray  # [2]
    ad: np.ndarray  # [A, 2]
    demo: np.ndarray  # [age * gender * C_ad, 2]
    region: np.ndarray  # [regions, 2]
    os: np.ndarray  # [num_os * C_ad, 2]
    ctx: np.ndarray  # [24 * slots * 4, 2]
    install_mean: np.ndarray  # [D] mean installed taste (see installed_taste)
    usage_mean: np.ndarray  # [D] mean usage taste (see usage_taste)
    interest_mean: float = 0.0
    interest_sd: float = 1.0
    usage_sd: float = 1.0
    intents_mean: float = 0.0
    intents_sd: float = 1.0


def _ctx(gen: np.random.Generator, p: WorldParams, slot_step: float, sd: float,
         net: tuple[float, ...]) -> np.ndarray:
    hours = np.arange(HOURS)
    hour = sd * np.sin(2 * np.pi * hours / HOURS + gen.uniform(0, 2 * np.pi)) \
        + 0.3 * sd * gen.normal(size=HOURS)
    slot = -slot_step * np.arange(p.num_slots) + 0.3 * sd * gen.normal(size=p.num_slots)
    table = hour[:, None, None] + slot[None, :, None] + np.array(net)[None, None, :]
    return table.ravel()


def build_truth_tables(gen: np.random.Generator, p: WorldParams,
                       ads: dict[str, np.ndarray]) -> TruthTables:
    """Draw the truth coefficients (biases and standardisation left to calibration).

    Tables whose size does not depend on the ads are drawn first, so that they stay the
    same when ``num_ads`` changes.
    """
    c_ad = p.num_ad_categories
    pair = lambda x, y: np.stack([x, y], axis=1)  # noqa: E731
    demo_shape = (p.num_age_buckets * p.num_genders * c_ad,)
    demo_click = gen.normal(0, 0.25, size=demo_shape)
    demo_cvr = 0.6 * demo_click + gen.normal(0, 0.25, size=demo_shape)
    region = pair(gen.normal(0, 0.10, size=p.num_regions), gen.normal(0, 0.15, size=p.num_regions))
    os = pair(gen.normal(0, 0.10, size=p.num_os * c_ad), gen.normal(0, 0.15, size=p.num_os * c_ad))
    ctx = pair(_ctx(gen, p, 0.12, 0.10, (0.0, -0.05, 0.02, -0.20)),
               _ctx(gen, p, 0.02, 0.08, (0.0, -0.10, 0.0, -0.30)))
    cre_click = gen.normal(0, 0.25, size=p.num_creative_types)
    cre_cvr = gen.normal(0, 0.10, size=p.num_creative_types)
    adv_click = gen.normal(0, 0.15, size=p.num_advertisers)
    adv_cvr = gen.normal(0, 0.30, size=p.num_advertisers)
    adv, cre = ads["ad_advertiser"], ads["ad_creative"]
    ad_click = gen.normal(0, 0.35, size=p.num_ads) + adv_click[adv] + cre_click[cre]
    ad_cvr = gen.normal(0, 0.30, size=p.num_ads) + adv_cvr[adv] + cre_cvr[cre]
    return TruthTables(
        bias=np.zeros(2), ad=pair(ad_click, ad_cvr), demo=pair(demo_click, demo_cvr),
        region=region, os=os, ctx=ctx,
        install_mean=np.zeros(p.latent_dim), usage_mean=np.zeros(p.latent_dim),
    )


def small_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for a small inner dimension, accumulated in a fixed order.

    Neither BLAS nor einsum: their summation order (and BLAS's threads) depend on the
    shapes, so user ``u``'s values could differ in the last bit between two chunks;
    here each output element is the same sequence of float operations, whatever the
    number of rows. ``a`` [n, k], ``b`` [k, m] -> [n, m] of their common dtype.
    Works on the transposes, so that every numpy loop runs over the long axis n.
    """
    a_t = np.ascontiguousarray(np.asarray(a).T)  # [k, n]
    b = np.asarray(b)
    out = b[0][:, None] * a_t[0]  # [m, n]
    for i in range(1, a_t.shape[0]):
        out += b[i][:, None] * a_t[i]
    return np.ascontiguousarray(out.T)


@dataclasses.dataclass(frozen=True, eq=False)
class UserTruthFeatures:
    """Per-user parts of the truth, computed once per chunk of U users.

    taste : float32 [U, D], the taste the installed app categories reveal, scaled so
        that ``taste . v_ad - interest_offset`` is the standardised interest.
    cloud : [U * C_ad, 2] cloud-visible user terms per ad category (demo, os, region).
    private : [U * C_ad, 2] private user terms per ad category (usage, intent).
    residual : [U, 2] the latent residuals.
    """

    taste: np.ndarray
    interest_offset: float
    cloud: np.ndarray
    private: np.ndarray
    residual: np.ndarray


def installed_taste(world: World, installed: np.ndarray) -> np.ndarray:
    """[U, D] float32 sum of the loadings of the installed app categories [U, C_app]."""
    return small_matmul(installed.astype(np.float32), world.app_loadings.astype(np.float32))


def usage_taste(world: World, usage: np.ndarray) -> np.ndarray:
    """[U, D] float32 mean app-category loading over the usage sequence [U, L].

    Equals ``(histogram of usage categories) @ app_loadings``.
    """
    loadings = world.app_loadings.astype(np.float32)
    cats = world.app_category[usage]
    out = np.take(loadings, cats[:, 0], axis=0)
    for i in range(1, usage.shape[1]):  # position after position: a fixed order
        out += np.take(loadings, cats[:, i], axis=0)
    return out / np.float32(usage.shape[1])


def user_truth_features(world: World, st: UserState) -> UserTruthFeatures:
    """Compute :class:`UserTruthFeatures` of a chunk of users."""
    p, t = world.params, world.truth
    c_ad = p.num_ad_categories
    taste = installed_taste(world, st.installed) - t.install_mean
    taste /= np.sqrt(p.num_app_categories) * t.interest_sd
    usage = small_matmul((usage_taste(world, st.usage) - t.usage_mean).astype(np.float64),
                         world.ad_cat_latent.T / t.usage_sd)  # [U, C_ad]
    private = np.empty(usage.shape + (2,))  # [U, C_ad, 2]
    shopper = (st.intent.sum(axis=1) - t.intents_mean) / t.intents_sd
    for i in range(2):
        private[:, :, i] = usage * W_USAGE[i] + st.intent * W_INTENT[i] \
            + (shopper * W_SHOPPER[i])[:, None]
    demo = (st.age.astype(np.int64) * p.num_genders + st.gender)[:, None] * c_ad \
        + np.arange(c_ad)
    osi = st.os.astype(np.int64)[:, None] * c_ad + np.arange(c_ad)
    cloud = np.take(t.demo, demo, axis=0) + np.take(t.os, osi, axis=0) \
        + np.take(t.region, st.region, axis=0)[:, None, :]  # [U, C_ad, 2]
    residual = np.stack([st.residual_click, st.residual_cvr], axis=1)
    return UserTruthFeatures(taste=taste.astype(np.float32),
                             interest_offset=t.interest_mean / t.interest_sd,
                             cloud=cloud.reshape(-1, 2), private=private.reshape(-1, 2),
                             residual=residual)


@dataclasses.dataclass(frozen=True, eq=False)
class Logits:
    """Truth logits of n impressions; ``click`` / ``cvr`` include every term.

    ``*_private`` is the sum of the private terms, ``*_residual`` the user residual;
    ``click - click_private - click_residual`` is what cloud-visible fields explain.
    """

    click: np.ndarray
    cvr: np.ndarray
    click_private: np.ndarray
    cvr_private: np.ndarray
    click_residual: np.ndarray
    cvr_residual: np.ndarray


def logits(world: World, uf: UserTruthFeatures, rows: np.ndarray, ads: np.ndarray,
           ctx: np.ndarray) -> Logits:
    """Truth logits for impressions ``(user row, ad, context)``.

    Parameters
    ----------
    uf : truth features of the chunk's users.
    rows : int [n], row of each impression's user in the chunk.
    ads : int [n] ad ids.
    ctx : int [n] flat context index ``(hour * num_slots + slot) * 4 + network``.
    """
    t = world.truth
    k = rows * world.params.num_ad_categories + world.ad_category[ads]
    # np.take(axis=0): numpy's fancy indexing of 2-D rows is several times slower.
    taste, latent = np.take(uf.taste, rows, axis=0), np.take(world.ad_latent, ads, axis=0)
    interest = taste[:, 0] * latent[:, 0]  # fixed-order dot product (see small_matmul)
    for d in range(1, taste.shape[1]):
        interest += taste[:, d] * latent[:, d]
    interest = interest.astype(np.float64) - uf.interest_offset
    private = np.take(uf.private, k, axis=0)
    private += interest[:, None] * np.array(W_INTEREST)
    residual = np.take(uf.residual, rows, axis=0)
    total = np.take(uf.cloud, k, axis=0)
    total += np.take(t.ad, ads, axis=0)
    total += np.take(t.ctx, ctx, axis=0)
    total += private
    total += residual
    total += t.bias
    return Logits(click=total[:, 0], cvr=total[:, 1],
                  click_private=private[:, 0], cvr_private=private[:, 1],
                  click_residual=residual[:, 0], cvr_residual=residual[:, 1])


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, float64."""
    return 1.0 / (1.0 + np.exp(-x))
