"""The fast bag pooling equals nn.EmbeddingBag(mode="mean"), values and gradients."""

from __future__ import annotations

from collections.abc import Callable

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from adfed.model.pooling import mean_bag, multi_hot_mean, pool_dense_bag

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
