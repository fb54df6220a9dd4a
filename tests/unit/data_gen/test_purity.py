"""Every user's data is a pure function of (seed, params, user_id)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_gen.calibrate import build_world
from data_gen.devices import devices_table
from data_gen.impressions import impression_parts, impressions_tables
from data_gen.params import WorldParams
from data_gen.requests import requests_table
from data_gen.users import users_table
from data_gen.world import World


@pytest.fixture(scope="module")
def small() -> World:
    return build_world(WorldParams(num_users=1000, num_ads=300), seed=5)


@pytest.fixture(scope="module")
def huge() -> World:
    """A billion users: nothing about the world grows with num_users."""
    return build_world(WorldParams(num_users=1_000_000_000, num_ads=1_000), seed=5)


def _rows_of(table: pa.Table, lo: int, hi: int) -> pa.Table:
    users = table.column("user_id")
    mask = pc.and_(pc.greater_equal(users, lo), pc.less(users, hi))
    return table.filter(mask)


def test_a_user_range_alone_equals_the_same_rows_of_a_larger_range(small: World) -> None:
    everyone, part = np.arange(1000), np.arange(100, 200)
    assert users_table(small, part).equals(users_table(small, everyone).slice(100, 100))
    assert devices_table(small, part).equals(devices_table(small, everyone).slice(100, 100))
    imp_all, truth_all = impressions_tables(small, everyone)
    imp, truth = impressions_tables(small, part)
    users = imp_all.column("user_id").to_numpy()
    rows = np.flatnonzero((users >= 100) & (users < 200))
    assert imp.equals(imp_all.take(rows))
    assert truth.equals(truth_all.take(rows))  # bit-identical probabilities
    assert requests_table(small, part).equals(_rows_of(requests_table(small, everyone), 100, 200))


@settings(max_examples=15, deadline=None)
@given(ids=st.lists(st.integers(0, 999), min_size=1, max_size=30, unique=True))
def test_any_subset_in_any_order_gives_each_users_own_rows(small: World, ids: list[int]) -> None:
    imp, truth = impressions_tables(small, np.array(ids))
    for uid in ids[:5]:
        alone, alone_truth = impressions_tables(small, np.array([uid]))
        rows = np.flatnonzero(imp.column("user_id").to_numpy() == uid)
        assert imp.take(rows).equals(alone)
        assert truth.take(rows).equals(alone_truth)


def test_users_at_the_end_of_a_billion_are_cheap_and_pure(huge: World) -> None:
    last = np.arange(999_999_990, 1_000_000_000)
    imp, _ = impressions_tables(huge, last)
    assert set(np.unique(imp.column("user_id").to_numpy())) == set(last.tolist())
    one, _ = impressions_tables(huge, last[-1:])
    assert one.equals(_rows_of(imp, 999_999_999, 1_000_000_000))


def test_population_size_does_not_change_a_users_fields(small: World, huge: World) -> None:
    ids = np.arange(50)
    a, b = users_table(small, ids), users_table(huge, ids)
    assert a.equals(b)


def test_a_different_seed_gives_a_different_world() -> None:
    p = WorldParams(num_users=100, num_ads=100)
    a = impressions_tables(build_world(p, 1), np.arange(100))[0]
    b = impressions_tables(build_world(p, 2), np.arange(100))[0]
    assert not a.equals(b)


def test_user_ids_are_validated(small: World) -> None:
    with pytest.raises(ValueError, match="user_ids must be < num_users=1000; got 1000"):
        users_table(small, np.array([5, 1000]))
    with pytest.raises(ValueError, match="user_ids must be >= 0; got -3"):
        impressions_tables(small, np.array([-3]))
    with pytest.raises(ValueError, match="1-D integer array"):
        devices_table(small, np.array([0.5]))


def test_world_tables_do_not_depend_on_num_users(small: World, huge: World) -> None:
    for f in ("persona_means", "app_loadings", "membership_weights"):
        np.testing.assert_array_equal(getattr(small, f), getattr(huge, f))


def test_impression_parts_regenerate_the_written_rows_term_by_term(small: World) -> None:
    ids = np.arange(40, 90)
    imp, truth = impressions_tables(small, ids)
    parts = impression_parts(small, ids)
    assert np.array_equal(parts.user_id, imp.column("user_id").to_numpy())
    assert np.array_equal(parts.ad_id, imp.column("ad_id").to_numpy())
    p_cvr = 1.0 / (1.0 + np.exp(-parts.cvr_logit))
    np.testing.assert_allclose(p_cvr, truth.column("p_cvr").to_numpy(), atol=1e-6)
    np.testing.assert_array_equal(parts.cvr_ad, small.truth.ad[parts.ad_id, 1])
    # the residual is a per-user constant
    for u in np.unique(parts.user_id):
        assert np.unique(parts.cvr_residual[parts.user_id == u]).size == 1
