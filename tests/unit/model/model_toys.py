"""Helpers for the model tests: a small schema shaped like the synthetic world's, random data."""

from __future__ import annotations

import numpy as np

from adfed.data.examples import Examples
from adfed.data.schema import Entity, FieldKind, FieldSpec, ParamGroup, Schema, Visibility

NUM_USERS = 50
NUM_ADS = 300


def _f(name: str, kind: FieldKind, vocab: int, vis: Visibility, ent: Entity, group: ParamGroup, max_len: int = 1) -> FieldSpec:
    return FieldSpec(name=name, kind=kind, vocab_size=vocab, visibility=vis, entity=ent, group=group, max_len=max_len)


C, P = Visibility.CLOUD, Visibility.PRIVATE
U, A, X = Entity.USER, Entity.AD, Entity.CONTEXT
LOC, SPS, DNS = ParamGroup.LOCAL, ParamGroup.SPARSE_SHARED, ParamGroup.DENSE_SHARED
CAT, MH, SEQ, DEN = FieldKind.CATEGORICAL, FieldKind.MULTI_HOT, FieldKind.SEQUENCE, FieldKind.DENSE


def toy_schema(num_users: int = NUM_USERS, num_ads: int = NUM_ADS) -> Schema:
    """Every kind, visibility, entity and group at least once."""
    fields = (
        _f("user_id", CAT, num_users, P, U, LOC),
        _f("age_bucket", CAT, 7, C, U, DNS),
        _f("region", CAT, 20, C, U, DNS),
        _f("installed_apps", MH, 40, P, U, SPS, max_len=6),
        _f("app_usage", SEQ, 40, P, U, DNS, max_len=5),
        _f("intent", CAT, 5, P, U, DNS),
        _f("ad_id", CAT, num_ads, C, A, SPS),
        _f("advertiser_id", CAT, 60, C, A, SPS),
        _f("category", CAT, 12, C, A, DNS),
        _f("hour", CAT, 24, C, X, DNS),
        _f("battery", DEN, 0, P, X, DNS),
    )
    return Schema(fields=fields, num_users=num_users, num_ads=num_ads)


def random_examples(schema: Schema, n: int, rng: np.random.Generator, *, empty_bags: bool = True) -> Examples:
    """Uniformly random ids, bags of length 0..max_len, Bernoulli labels."""
    ids: dict[str, np.ndarray] = {}
    dense: dict[str, np.ndarray] = {}
    bags: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for f in schema.fields:
        if f.kind is FieldKind.DENSE:
            dense[f.name] = rng.normal(size=n).astype(np.float32)
        elif f.is_bag:
            lengths = rng.integers(0 if empty_bags else 1, f.max_len + 1, size=n)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            bags[f.name] = (rng.integers(0, f.vocab_size, size=int(offsets[-1])).astype(np.int32), offsets)
        else:
            ids[f.name] = rng.integers(0, f.vocab_size, size=n).astype(np.int32)
    click = (rng.random(n) < 0.3).astype(np.int8)
    conversion = (click & (rng.random(n) < 0.3)).astype(np.int8)
    labels = {
        "timestamp": np.arange(n, dtype=np.int64),
        "click": click,
        "conversion": conversion,
        "label_observed": rng.random(n) < 0.8,
    }
    return Examples(ids=ids, dense=dense, bags=bags, labels=labels)
