"""World parameters and the dataset schema they imply."""

from __future__ import annotations

import dataclasses
from typing import Any

from adfed.data.schema import (
    AD_KEY,
    USER_KEY,
    Entity,
    FieldKind,
    FieldSpec,
    Schema,
    Visibility,
    default_group,
)

NETWORKS = ("wifi", "4g", "5g", "3g")
HOURS = 24


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorldParams:
    """Sizes and shape knobs of the synthetic world.

    The hidden truth coefficients live in :mod:`data_gen.truth`; the knobs here are the
    ones an experiment may reasonably vary. Changing a population size (``num_users``,
    ``num_ads``) never changes the persona, field or truth tables: user ``u`` of a
    larger world has the same fields as user ``u`` of a smaller one (its impressions
    differ when ``num_ads`` differs, as they pick from other ads).

    Parameters
    ----------
    num_users, num_ads : population sizes.
    num_personas : K, mixture components of the user taste vectors (non-IID clients).
    latent_dim : D, dimension of user taste vectors and ad latents.
    num_age_buckets, num_genders, num_regions, num_device_brands, num_os : vocabulary
        sizes of the cloud-visible user fields.
    num_app_categories : vocabulary of ``installed_apps`` (multi-hot).
    num_apps : vocabulary of ``app_usage`` (the recent app-usage sequence).
    seq_len : length of ``app_usage``.
    num_ad_categories : vocabulary of ``ad_category`` and of ``intent``.
    ads_per_advertiser : average ads per advertiser (sets ``num_advertisers``).
    num_creative_types, num_slots : AD / CONTEXT vocabularies.
    days : span of impression timestamps (seconds from the start of day 0).
    impressions_median, impressions_sigma : impressions per user are
        ``round(median * exp(sigma * N(0, 1)))``, at least 1 ...
    max_impressions : ... and at most this.
    ad_zipf_exponent : ad ``i`` of popularity rank ``r`` is shown with weight ``r**-s``.
    unobserved_fraction : expected share of devices that never report conversions.
    residual_sd : standard deviation of the per-user latent logit residual ``r_u``.
    residual_corr : correlation of the click and the conversion residuals.
    request_user_fraction : share of users with held-out rerank requests.
    max_requests_per_user : such a user has 1..this many requests.
    candidates_per_request : N, distinct cloud candidate ads per request.
    """

    num_users: int = 100_000
    num_ads: int = 10_000
    num_personas: int = 8
    latent_dim: int = 8
    num_age_buckets: int = 7
    num_genders: int = 3
    num_regions: int = 34
    num_device_brands: int = 12
    num_os: int = 3
    num_app_categories: int = 48
    num_apps: int = 2000
    seq_len: int = 20
    num_ad_categories: int = 24
    ads_per_advertiser: int = 25
    num_creative_types: int = 5
    num_slots: int = 8
    days: int = 30
    impressions_median: float = 10.0
    impressions_sigma: float = 1.0
    max_impressions: int = 2000
    ad_zipf_exponent: float = 1.05
    unobserved_fraction: float = 0.3
    residual_sd: float = 0.45
    residual_corr: float = 0.7
    request_user_fraction: float = 0.1
    max_requests_per_user: int = 3
    candidates_per_request: int = 20

    def __post_init__(self) -> None:
        positive = [f.name for f in dataclasses.fields(self) if f.type in ("int", int)]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"WorldParams.{name} must be an int >= 1; got {value!r}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("num_os", self.num_os >= 2, ">= 2"),
            ("num_apps", self.num_apps >= self.num_app_categories,
             f">= num_app_categories ({self.num_app_categories})"),
            ("num_ads", self.num_ads >= self.candidates_per_request,
             f">= candidates_per_request ({self.candidates_per_request}, the ads of a rerank request)"),
            ("impressions_median", self.impressions_median >= 1.0, ">= 1"),
            ("impressions_sigma", 0.0 <= self.impressions_sigma <= 3.0, "in [0, 3]"),
            ("max_impressions", self.max_impressions >= self.impressions_median,
             f">= impressions_median ({self.impressions_median})"),
            ("ad_zipf_exponent", 0.0 <= self.ad_zipf_exponent <= 3.0, "in [0, 3]"),
            ("unobserved_fraction", 0.0 <= self.unobserved_fraction < 0.9, "in [0, 0.9)"),
            ("residual_sd", 0.0 <= self.residual_sd <= 3.0, "in [0, 3]"),
            ("residual_corr", -1.0 <= self.residual_corr <= 1.0, "in [-1, 1]"),
            ("request_user_fraction", 0.0 <= self.request_user_fraction <= 1.0, "in [0, 1]"),
            ("days", self.days <= 3650, "<= 3650"),
            ("num_users", self.num_users < 2**40, "< 2**40"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"WorldParams.{name} must be {rule}; got {getattr(self, name)!r}")

    @property
    def num_advertisers(self) -> int:
        """Number of advertisers: ``max(1, num_ads // ads_per_advertiser)``."""
        return max(1, self.num_ads // self.ads_per_advertiser)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldParams:
        """Inverse of :meth:`to_dict`; ignores keys that are not parameters (``seed``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _cat(name: str, vocab: int, vis: Visibility, entity: Entity, desc: str) -> FieldSpec:
    return FieldSpec(name=name, kind=FieldKind.CATEGORICAL, vocab_size=vocab, visibility=vis,
                     entity=entity, group=default_group(vocab), description=desc)


def build_schema(p: WorldParams) -> Schema:
    """The :class:`Schema` of a world with parameters ``p`` (fields in table order)."""
    cloud, private = Visibility.CLOUD, Visibility.PRIVATE
    user, ad, ctx = Entity.USER, Entity.AD, Entity.CONTEXT
    fields = (
        FieldSpec(name=USER_KEY, kind=FieldKind.CATEGORICAL, vocab_size=p.num_users,
                  visibility=private, entity=user,
                  group=default_group(p.num_users, is_user_key=True),
                  description="the user's own id; its embedding row never leaves the phone"),
        _cat("age_bucket", p.num_age_buckets, cloud, user, "age bracket, youngest first"),
        _cat("gender", p.num_genders, cloud, user, "declared gender; the last id is 'unknown'"),
        _cat("region", p.num_regions, cloud, user, "province-level region of the account"),
        _cat("device_brand", p.num_device_brands, cloud, user,
             "phone maker, most common first; brand 0 runs os 1"),
        _cat("os", p.num_os, cloud, user, "operating system family"),
        FieldSpec(name="installed_apps", kind=FieldKind.MULTI_HOT,
                  vocab_size=p.num_app_categories, visibility=private, entity=user,
                  group=default_group(p.num_app_categories), max_len=p.num_app_categories,
                  description="categories of the apps installed on the phone (multi-hot)"),
        FieldSpec(name="app_usage", kind=FieldKind.SEQUENCE, vocab_size=p.num_apps,
                  visibility=private, entity=user, group=default_group(p.num_apps),
                  max_len=p.seq_len,
                  description=f"the {p.seq_len} most recently opened apps, oldest first"),
        FieldSpec(name="intent", kind=FieldKind.MULTI_HOT, vocab_size=p.num_ad_categories,
                  visibility=private, entity=user, group=default_group(p.num_ad_categories),
                  max_len=p.num_ad_categories, vocab_of="ad_category",
                  description="ad categories of the user's active purchase intents "
                              "(on-device signals: searches, carts, wish lists)"),
        _cat(AD_KEY, p.num_ads, cloud, ad, "the ad (creative) id"),
        _cat("advertiser_id", p.num_advertisers, cloud, ad, "the advertiser that owns the ad"),
        _cat("ad_category", p.num_ad_categories, cloud, ad, "product category of the ad"),
        _cat("creative_type", p.num_creative_types, cloud, ad,
             "creative format (image, video, carousel, ...)"),
        _cat("hour", HOURS, cloud, ctx, "local hour of the impression, 0..23"),
        _cat("slot", p.num_slots, cloud, ctx, "ad slot position in the feed, top first"),
        _cat("network", len(NETWORKS), cloud, ctx,
             "network at impression time: " + ", ".join(f"{i}={n}" for i, n in enumerate(NETWORKS))),
    )
    return Schema(fields=fields, num_users=p.num_users, num_ads=p.num_ads)
