"""The counter-based generator: distribution, independence, purity, samplers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_gen import rng as crng
from data_gen.truth import small_matmul


def test_uniform_is_uniform_and_bounded() -> None:
    keys = crng.keys(0, np.arange(200_000), stream=1)
    u = crng.uniform(keys, 0)
    assert u.min() >= 0.0 and u.max() < 1.0
    counts = np.bincount((u * 100).astype(int), minlength=100)
    chi2 = ((counts - 2000.0) ** 2 / 2000.0).sum()
    assert chi2 < 160  # 99 dof: p ~ 1e-4 at 160


def test_neighbouring_users_streams_and_counters_are_uncorrelated() -> None:
    ids = np.arange(100_000)
    a = crng.uniform(crng.keys(0, ids, 1), 0)
    pairs = {
        "next user": crng.uniform(crng.keys(0, ids + 1, 1), 0),
        "next stream": crng.uniform(crng.keys(0, ids, 2), 0),
        "next counter": crng.uniform(crng.keys(0, ids, 1), 1),
        "next seed": crng.uniform(crng.keys(1, ids, 1), 0),
    }
    for name, b in pairs.items():
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.015, name


def test_normal_moments() -> None:
    z = crng.normal(crng.keys(3, np.arange(300_000), 5), 0)
    assert abs(z.mean()) < 0.01
    assert abs(z.std() - 1.0) < 0.01
    assert abs((z > 1.96).mean() - 0.025) < 0.002


def test_uniforms32_matches_its_counters() -> None:
    keys = crng.keys(0, np.arange(10), 4)
    u = crng.uniforms32(keys, 5)
    lo, hi = crng.uniform_pair(keys[:, None], np.arange(3)[None, :])
    np.testing.assert_array_equal(u, np.concatenate([lo, hi], axis=1)[:, :5])


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(0, 2**40), min_size=1, max_size=50),
       seed=st.integers(0, 2**63), stream=st.integers(0, 100))
def test_draws_are_a_pure_function_of_the_id(ids: list[int], seed: int, stream: int) -> None:
    arr = np.array(ids, dtype=np.int64)
    together = crng.uniform(crng.keys(seed, arr, stream), 7)
    alone = np.array([crng.uniform(crng.keys(seed, np.array([i]), stream), 7)[0] for i in ids])
    np.testing.assert_array_equal(together, alone)


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=300).filter(
    lambda w: sum(w) > 1e-3), seed=st.integers(0, 1000))
def test_guide_table_equals_searchsorted(weights: list[float], seed: int) -> None:
    cdf = crng.make_cdf(np.array(weights))
    u = crng.uniform(crng.keys(seed, np.arange(2000), 0), 0)
    u[:3] = [0.0, np.nextafter(1.0, 0.0), cdf[0]]
    np.testing.assert_array_equal(crng.Categorical(cdf).sample(u), crng.categorical(u, cdf))


def test_categorical_never_draws_zero_probability_values() -> None:
    cdf = crng.make_cdf(np.array([0.0, 1.0, 0.0, 0.0, 2.0, 0.0]))
    u = crng.uniform(crng.keys(0, np.arange(50_000), 0), 0)
    got = np.unique(crng.Categorical(cdf).sample(u))
    np.testing.assert_array_equal(got, [1, 4])


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 20), values=st.integers(1, 30), seed=st.integers(0, 1000))
def test_row_sampler_equals_per_row_searchsorted(rows: int, values: int, seed: int) -> None:
    r = np.random.default_rng(seed)
    p = r.random((rows, values)) * (r.random((rows, values)) < 0.7)
    p[:, 0] += 1e-3  # every row has mass
    cdf = crng.make_cdf(p)
    u = r.random((rows, 50))
    expected = np.stack([np.searchsorted(cdf[i], u[i], side="right") for i in range(rows)])
    which = np.broadcast_to(np.arange(rows)[:, None], u.shape)
    np.testing.assert_array_equal(crng.RowCategorical(cdf).sample(u, which), expected)


def test_bernoulli_and_lognormal() -> None:
    keys = crng.keys(0, np.arange(100_000), 6)
    assert abs(crng.bernoulli(keys, 0, 0.1).mean() - 0.1) < 0.005
    x = crng.lognormal(keys, 1, np.log(8.0), 1.0)
    assert abs(np.median(x) - 8.0) < 0.3
    assert x.max() > 50 * np.median(x)  # heavy tail


def test_make_cdf_rejects_bad_probabilities() -> None:
    with pytest.raises(ValueError, match="probabilities must be >= 0"):
        crng.make_cdf(np.array([0.5, -0.1]))
    with pytest.raises(ValueError, match="positive total"):
        crng.make_cdf(np.zeros(3))


def test_negative_seed_is_rejected() -> None:
    with pytest.raises(ValueError, match="seed must be an int >= 0; got -1"):
        crng.seed_key(-1)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 50), m=st.integers(1, 30),
       seed=st.integers(0, 1000))
def test_small_matmul_is_matmul_and_row_independent(n: int, k: int, m: int, seed: int) -> None:
    r = np.random.default_rng(seed)
    a, b = r.normal(size=(n, k)), r.normal(size=(k, m))
    out = small_matmul(a, b)
    np.testing.assert_allclose(out, a @ b, rtol=1e-10, atol=1e-10)
    # Bit-identical per row whatever the other rows: what makes users chunk-independent.
    i = int(r.integers(n))
    np.testing.assert_array_equal(small_matmul(a[i : i + 1], b)[0], out[i])


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 10), values=st.integers(1, 40), seed=st.integers(0, 1000))
def test_lookup_table_is_the_inverse_cdf_at_its_resolution(rows: int, values: int,
                                                            seed: int) -> None:
    r = np.random.default_rng(seed)
    cdf = crng.make_cdf(r.random((rows, values)) + 1e-3)
    table = crng.LookupTable(cdf, bits=12)
    k = r.integers(0, 4096, size=500)
    which = r.integers(0, rows, size=500)
    expected = [np.searchsorted(cdf[w], kk / 4096, side="right")
                for kk, w in zip(k, which, strict=True)]
    np.testing.assert_array_equal(table.sample(k, which), expected)


def test_small_uniforms_are_uniform_float32() -> None:
    keys = crng.keys(0, np.arange(50_000), 9)
    u = crng.uniforms_small(keys, 7)
    assert u.dtype == np.float32 and u.shape == (50_000, 7)
    assert u.min() >= 0 and u.max() < 1
    assert np.all(np.abs(u.mean(axis=0) - 0.5) < 0.01)
    assert abs(np.corrcoef(u[:, 0], u[:, 3])[0, 1]) < 0.02  # two parts of one hash
