"""Fixtures for the model tests: a small schema shaped like the synthetic world's, and
random examples over it (uniform ids, bags of length 0..max_len, Bernoulli labels)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from adfed.data.examples import Batch, Examples
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




@pytest.fixture
def toy() -> Callable[..., Schema]:
    """Factory: ``toy(num_users=50, num_ads=300) -> Schema``."""
    return toy_schema


@pytest.fixture
def schema() -> Schema:
    return toy_schema()


@pytest.fixture
def make_examples(rng: np.random.Generator) -> Callable[..., Examples]:
    """Factory: ``make_examples(schema, n, empty_bags=True) -> Examples``."""

    def make(schema: Schema, n: int, *, empty_bags: bool = True) -> Examples:
        return random_examples(schema, n, rng, empty_bags=empty_bags)

    return make


@pytest.fixture
def make_batch(schema: Schema, rng: np.random.Generator) -> Callable[..., Batch]:
    """Factory: ``make_batch(n=64, empty_bags=True) -> Batch`` over the ``schema`` fixture."""

    def make(n: int = 64, **kwargs: bool) -> Batch:
        return random_examples(schema, n, rng, **kwargs).to_batch()

    return make


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine two OpenMP
    threads on two cores can be ten times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
