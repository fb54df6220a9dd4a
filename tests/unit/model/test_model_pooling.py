"""The fast lookups and bag pooling equal nn.Embedding / nn.EmbeddingBag(mode="mean"),
values and gradients (dense, and sparse: coalesced over exactly the ids read)."""

from __future__ import annotations

from collections.abc import Callable

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from adfed.model.pooling import (
    LOOKUP_MIN_READS,
    SORTED_MIN_READS,
    _sort_stable,
    lookup,
    mean_bag,
    multi_hot_mean,
    pool_dense_bag,
    sum_rows_by_id,
)

Pool = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
POOLS = [multi_hot_mean, mean_bag, pool_dense_bag]


@st.composite
def bags(draw: st.DrawFn) -> tuple[int, list[list[int]]]:
    rows = draw(st.integers(1, 80))
    lists = draw(st.lists(st.lists(st.integers(0, rows - 1), max_size=6), min_size=1, max_size=20))
    return rows, lists


def _ragged(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor([v for bag in lists for v in bag], dtype=torch.int64)
    lengths = torch.tensor([len(bag) for bag in lists], dtype=torch.int64)
    offsets = torch.cumsum(lengths, 0) - lengths
    return values, offsets


@settings(max_examples=60, deadline=None)
@given(case=bags(), pool=st.sampled_from(POOLS), seed=st.integers(0, 2**16))
def test_pooling_matches_embedding_bag(case: tuple[int, list[list[int]]], pool: Pool, seed: int) -> None:
    rows, lists = case
    values, offsets = _ragged(lists)
    gen = torch.Generator().manual_seed(seed)
    reference = nn.EmbeddingBag(rows, 4, mode="mean")
    with torch.no_grad():
        reference.weight.normal_(generator=gen)
    weight = nn.Parameter(reference.weight.detach().clone())
    upstream = torch.randn(len(lists), 4, generator=gen)

    want = reference(values, offsets)
    want.backward(upstream)
    got = pool(values, offsets, weight)
    got.backward(upstream)

    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert weight.grad is not None and reference.weight.grad is not None
    assert not weight.grad.is_sparse
    torch.testing.assert_close(weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", POOLS)
def test_all_empty_bags_pool_to_zeros_with_zero_gradient(pool: Pool) -> None:
    weight = nn.Parameter(torch.randn(100, 3))
    values, offsets = torch.zeros(0, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)

    out = pool(values, offsets, weight)
    out.sum().backward()

    assert out.shape == (5, 3) and not out.any()
    assert weight.grad is not None and not weight.grad.any()


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("bad", [-1, 100])
def test_out_of_range_ids_raise(pool: Pool, bad: int) -> None:
    weight = torch.randn(100, 3)

    with pytest.raises(IndexError, match=r"\[0, 100\)"):
        pool(torch.tensor([1, bad]), torch.tensor([0]), weight)


# ---- lookups and sparse gradients: sizes on both sides of the thresholds -------------

READS = [10, LOOKUP_MIN_READS - 1, LOOKUP_MIN_READS, SORTED_MIN_READS, 20_000, 40_000]


@pytest.mark.parametrize("n", READS)
def test_lookup_matches_embedding_values_and_gradient(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    weight = torch.randn(300, 4, generator=gen, requires_grad=True)
    reference = weight.detach().clone().requires_grad_(True)
    ids = torch.randint(0, 300, (n // 2, 2), generator=gen)  # any shape
    upstream = torch.randn(n // 2, 2, 4, generator=gen)

    got, want = lookup(ids, weight), F.embedding(ids, reference)
    got.backward(upstream)
    want.backward(upstream)

    assert torch.equal(got, want)
    assert weight.grad is not None and reference.grad is not None
    torch.testing.assert_close(weight.grad, reference.grad, rtol=1e-5, atol=1e-6)


def test_lookup_out_of_range_raises() -> None:
    with pytest.raises(IndexError):
        lookup(torch.tensor([0, 5]), torch.randn(5, 2))


def _bags(n_bags: int, max_len: int, rows: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.randint(0, max_len + 1, (n_bags,), generator=gen)
    values = torch.randint(0, rows, (int(lengths.sum()),), generator=gen)
    return values, torch.cumsum(lengths, 0) - lengths


@pytest.mark.parametrize("n_bags", [50, 2_000, 4_000])
def test_sparse_mean_bag_matches_embedding_bag(n_bags: int) -> None:
    gen = torch.Generator().manual_seed(n_bags)
    values, offsets = _bags(n_bags, 20, 700, gen)
    reference = nn.EmbeddingBag(700, 4, mode="mean", sparse=True)
    weight = nn.Parameter(reference.weight.detach().clone())
    upstream = torch.randn(n_bags, 4, generator=gen)

    want = reference(values, offsets)
    (want_grad,) = torch.autograd.grad(want, reference.weight, upstream)
    got = mean_bag(values, offsets, weight, sparse_grad=True)
    (got_grad,) = torch.autograd.grad(got, weight, upstream)

    assert torch.equal(got, want)
    assert got_grad.is_sparse
    torch.testing.assert_close(got_grad.to_dense(), want_grad.to_dense(), rtol=1e-5, atol=1e-6)


def test_sparse_mean_bag_gradient_is_coalesced_over_exactly_the_ids_read() -> None:
    gen = torch.Generator().manual_seed(0)
    values, offsets = _bags(2_000, 20, 5_000, gen)
    assert values.numel() >= SORTED_MIN_READS
    weight = nn.Parameter(torch.randn(5_000, 3, generator=gen))
    upstream = torch.randn(2_000, 3, generator=gen)
    upstream[:100] = 0.0  # ids read only by these bags still count as touched

    (grad,) = torch.autograd.grad(mean_bag(values, offsets, weight, sparse_grad=True), weight, upstream)

    assert grad.is_sparse and grad.is_coalesced()
    assert torch.equal(grad.indices()[0], torch.unique(values))


@pytest.mark.parametrize("n", [100, 8_192, 20_000, 32_767, 32_768, 40_000])
@pytest.mark.parametrize("dtype", [torch.int16, torch.int64])
def test_padded_sort_gives_the_stable_sort(n: int, dtype: torch.dtype) -> None:
    keys = torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)).to(dtype)

    got_keys, got_order = _sort_stable(keys, sentinel=50)
    want_keys, want_order = torch.sort(keys, stable=True)

    assert torch.equal(got_keys, want_keys) and torch.equal(got_order, want_order)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_source", [False, True])
def test_dense_row_sums_are_bitwise_the_sorted_sums(threads: int, with_source: bool) -> None:
    """index_add_ must add in position order on a CPU, as the sorted sum does: the dense
    gradient is then the same float sums as the sparse one, whatever the thread count."""
    gen = torch.Generator().manual_seed(threads)
    ids = torch.randint(0, 37, (30_000,), generator=gen)  # many repeats per row
    grad = torch.randn(5_000 if with_source else 30_000, 16, generator=gen) * 1e3
    source = torch.randint(0, 5_000, (30_000,), generator=gen) if with_source else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dense = sum_rows_by_id(ids, source, grad, 40, sparse=False)
        sparse = sum_rows_by_id(ids, source, grad, 40, sparse=True)
    finally:
        torch.set_num_threads(before)

    assert torch.equal(dense, sparse.to_dense())
    rows = grad.double() if source is None else grad.double()[source]  # the sums themselves, in float64
    want = torch.zeros(40, 16, dtype=torch.float64).index_add_(0, ids, rows)
    torch.testing.assert_close(dense.double(), want, rtol=1e-4, atol=0.5)  # float32 sums of ~800 values ~1e3


@pytest.mark.parametrize("sparse", [False, True])
def test_row_sums_of_no_reads_are_empty(sparse: bool) -> None:
    ids, grad = torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3)

    out = sum_rows_by_id(ids, None, grad, 7, sparse=sparse)

    assert out.shape == (7, 3) and not out.to_dense().any()
    assert not sparse or out._nnz() == 0


def test_multi_hot_mean_rejects_ids_outside_the_table() -> None:
    weight = torch.randn(5, 4)
    lengths = torch.tensor([2, 1])

    with pytest.raises(IndexError, match=r"ids must lie in \[0, 5\); got \[0, 5\]"):
        multi_hot_mean(torch.tensor([0, 5, 1]), torch.tensor([0, 2]), weight, lengths=lengths)
    with pytest.raises(IndexError, match=r"got \[-1, 2\]"):
        multi_hot_mean(torch.tensor([2, 1, -1]), torch.tensor([0, 2]), weight, lengths=lengths)
