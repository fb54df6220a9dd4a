"""Examples / Batch: ragged gathers against a naive reference, take, concat, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adfed.data.examples import Batch, Examples, gather_bags


def _naive_gather(rows_values: list[list[int]], rows: list[int]) -> tuple[list[int], list[int]]:
    values: list[int] = []
    offsets = [0]
    for r in rows:
        values.extend(rows_values[r])
        offsets.append(len(values))
    return values, offsets


def _ragged(rows_values: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = [len(r) for r in rows_values]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.array([v for r in rows_values for v in r], dtype=np.int32)
    return values, offsets


def _bags_as_lists(values: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def _examples(n: int, rng: np.random.Generator) -> Examples:
    """n rows whose every column encodes the row number, so row identity is checkable."""
    lengths = rng.integers(0, 4, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    row_of_value = np.repeat(np.arange(n), lengths)
    click = (np.arange(n) % 2).astype(np.int8)
    return Examples(
        ids={"ad_id": np.arange(n, dtype=np.int64) * 10},
        dense={"battery": np.arange(n, dtype=np.float32) / 2},
        bags={"apps": (row_of_value.astype(np.int32) * 100, offsets)},
        labels={
            "timestamp": np.arange(n, dtype=np.int64),
            "click": click,
            "conversion": click * (np.arange(n) % 3 == 0).astype(np.int8),
            "label_observed": np.arange(n) % 5 != 0,
        },
    )


def _rows_of(ex: Examples) -> np.ndarray:
    return ex.labels["timestamp"]


# -- gather_bags -----------------------------------------------------------------------------

ragged_and_rows = st.lists(st.lists(st.integers(-5, 1000), max_size=5), min_size=1, max_size=12).flatmap(
    lambda rv: st.tuples(st.just(rv), st.lists(st.integers(0, len(rv) - 1), max_size=20))
)


@settings(max_examples=200, deadline=None)
@given(ragged_and_rows)
def test_gather_bags_matches_naive_reference(case: tuple[list[list[int]], list[int]]) -> None:
    # Prepare
    rows_values, rows = case
    values, offsets = _ragged(rows_values)

    # Execute
    got_values, got_offsets = gather_bags(values, offsets, np.array(rows, dtype=np.int64))

    # Assert
    want_values, want_offsets = _naive_gather(rows_values, rows)
    assert got_values.tolist() == want_values
    assert got_offsets.tolist() == want_offsets
    assert got_values.dtype == values.dtype
    assert got_offsets.dtype == np.int64


def test_gather_bags_with_repeats_and_empty_rows() -> None:
    # Prepare
    values, offsets = _ragged([[1, 2], [], [3], [], [4, 5, 6]])

    # Execute
    got_values, got_offsets = gather_bags(values, offsets, np.array([4, 1, 0, 4, 3]))

    # Assert
    assert got_values.tolist() == [4, 5, 6, 1, 2, 4, 5, 6]
    assert got_offsets.tolist() == [0, 3, 3, 5, 8, 8]


def test_gather_bags_no_rows_and_all_empty_rows() -> None:
    values, offsets = _ragged([[1], [], []])
    none_v, none_o = gather_bags(values, offsets, np.array([], dtype=np.int64))
    empty_v, empty_o = gather_bags(values, offsets, np.array([1, 2, 1]))
    assert none_v.tolist() == [] and none_o.tolist() == [0]
    assert empty_v.tolist() == [] and empty_o.tolist() == [0, 0, 0, 0]
    assert empty_v.dtype == values.dtype


# -- Examples --------------------------------------------------------------------------------

def test_len(rng: np.random.Generator) -> None:
    ex = _examples(9, rng)
    bags_only = Examples(ids={}, dense={}, bags={"apps": ex.bags["apps"]}, labels={})
    assert len(ex) == 9
    assert len(bags_only) == 9
    assert len(Examples(ids={}, dense={}, bags={}, labels={})) == 0


def test_take_selects_every_column_consistently(rng: np.random.Generator) -> None:
    # Prepare
    ex = _examples(20, rng)
    rows = np.array([5, 0, 19, 5, 7])

    # Execute
    sub = ex.take(rows)

    # Assert
    assert len(sub) == 5
    assert sub.labels["timestamp"].tolist() == rows.tolist()
    assert sub.ids["ad_id"].tolist() == (rows * 10).tolist()
    np.testing.assert_array_equal(sub.dense["battery"], rows.astype(np.float32) / 2)
    for name in ("click", "conversion", "label_observed"):
        np.testing.assert_array_equal(sub.labels[name], ex.labels[name][rows])
    got = _bags_as_lists(*sub.bags["apps"])
    want = [_bags_as_lists(*ex.bags["apps"])[r] for r in rows]
    assert got == want
    assert all(v == r * 100 for r, bag in zip(rows, got, strict=True) for v in bag)


def test_concat_equals_take_of_the_whole(rng: np.random.Generator) -> None:
    # Prepare
    ex = _examples(17, rng)
    cuts = [(0, 4), (4, 4), (4, 11), (11, 17)]  # includes an empty part
    parts = [ex.take(np.arange(a, b)) for a, b in cuts]

    # Execute
    joined = Examples.concat(parts)

    # Assert
    assert len(joined) == 17
    for group in ("ids", "dense", "labels"):
        for name, arr in getattr(ex, group).items():
            np.testing.assert_array_equal(getattr(joined, group)[name], arr)
    np.testing.assert_array_equal(joined.bags["apps"][0], ex.bags["apps"][0])
    np.testing.assert_array_equal(joined.bags["apps"][1], ex.bags["apps"][1])


def test_concat_of_nothing_raises() -> None:
    with pytest.raises(ValueError, match="at least one part"):
        Examples.concat([])


def test_to_batch_types_and_offsets_of_length_b(rng: np.random.Generator) -> None:
    # Prepare
    ex = _examples(6, rng)

    # Execute
    batch = ex.to_batch()

    # Assert
    assert isinstance(batch, Batch) and len(batch) == 6
    values, offsets = batch.bags["apps"]
    assert offsets.shape == (6,) and offsets.dtype == torch.int64
    assert offsets.tolist() == ex.bags["apps"][1][:-1].tolist()
    assert values.dtype == torch.int64 and values.tolist() == ex.bags["apps"][0].tolist()
    assert batch.ids["ad_id"].dtype == torch.int64
    assert batch.dense["battery"].dtype == torch.float32
    assert batch.click.dtype == torch.float32 and batch.conversion.dtype == torch.float32
    assert batch.label_observed.dtype == torch.bool
    assert batch.click.tolist() == ex.labels["click"].astype(float).tolist()
    assert batch.label_observed.tolist() == ex.labels["label_observed"].tolist()


def test_to_batch_feeds_embedding_bag(rng: np.random.Generator) -> None:
    # Prepare
    ex = _examples(8, rng)
    bag = torch.nn.EmbeddingBag(800, 3, mode="sum")
    values, offsets = ex.to_batch().bags["apps"]

    # Execute
    out = bag(values, offsets)

    # Assert
    assert out.shape == (8, 3)
    lengths = np.diff(ex.bags["apps"][1])
    assert torch.all(out[torch.from_numpy(lengths == 0)] == 0)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 50])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_every_row_once(rng: np.random.Generator, batch_size: int, shuffle: bool) -> None:
    # Prepare
    ex = _examples(23, rng)

    # Execute
    batches = list(ex.batches(batch_size, rng if shuffle else None))

    # Assert
    sizes = [len(b) for b in batches]
    assert sum(sizes) == 23
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    seen = torch.cat([b.ids["ad_id"] for b in batches]).numpy() // 10
    assert sorted(seen.tolist()) == list(range(23))
    if not shuffle:
        assert seen.tolist() == list(range(23))


def test_batches_shuffle_depends_on_the_seed() -> None:
    ex = _examples(40, np.random.default_rng(0))

    def order(seed: int) -> list[int]:
        return torch.cat([b.ids["ad_id"] for b in ex.batches(8, np.random.default_rng(seed))]).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1) != sorted(order(1))


def test_rows_that_fit_one_batch_come_as_they_are() -> None:
    # Prepare: 23 rows, a batch of 23 or more, a shuffling rng
    ex = _examples(23, np.random.default_rng(0))
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state

    # Execute
    (batch,) = list(ex.batches(23, rng))

    # Assert: the rows in their own order, and the rng not drawn from
    assert (batch.ids["ad_id"].numpy() // 10).tolist() == list(range(23))
    assert rng.bit_generator.state == state
    assert len(list(ex.batches(24, rng))) == 1


def test_batches_of_empty_examples_yield_nothing(rng: np.random.Generator) -> None:
    ex = _examples(5, rng).take(np.array([], dtype=np.int64))
    assert list(ex.batches(4, rng)) == []


@pytest.mark.parametrize(("start", "stop"), [(0, 7), (2, 5), (3, 3), (6, 7), (0, 0)])
def test_slice_equals_take_of_the_range(rng: np.random.Generator, start: int, stop: int) -> None:
    ex = _examples(7, rng)
    got, want = ex.slice(start, stop), ex.take(np.arange(start, stop))
    assert len(got) == stop - start
    for group in ("ids", "dense", "labels"):
        for k, v in getattr(want, group).items():
            assert np.array_equal(getattr(got, group)[k], v), k
    for k, (v, o) in want.bags.items():
        assert np.array_equal(got.bags[k][0], v) and np.array_equal(got.bags[k][1], o), k


def test_batch_bag_lengths_are_the_bag_sizes_and_computed_once() -> None:
    ex = _examples(9, np.random.default_rng(3))
    batch = ex.to_batch()
    _, offsets = ex.bags["apps"]
    lengths = batch.bag_lengths("apps")
    assert lengths.dtype == torch.int64
    assert lengths.tolist() == np.diff(offsets).tolist()
    assert batch.bag_lengths("apps") is lengths  # cached: the model reads it up to 3 times a step
    with pytest.raises(KeyError):
        batch.bag_lengths("battery")
