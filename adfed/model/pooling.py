"""Embedding lookups and mean pooling of bags with cheap backward passes.

``nn.Embedding`` / ``nn.EmbeddingBag(mode="mean")`` compute the right values, but on a
CPU their backward passes can cost more than the rest of a lookup: a dense gradient is
accumulated row by row, and a sparse gradient lists every id occurrence, which a sparse
optimizer must coalesce (sort and sum): for a bag field read 80k times per batch that
alone took ~15% of a training step. Every function here returns exactly what the module
returns (an empty bag pools to zeros) with a cheaper backward:

- :func:`lookup` for one id per row (``F.embedding``), e.g. several small tables
  concatenated and read at once;
- :func:`multi_hot_mean` for bags over small dense-gradient tables (at most
  :data:`MULTI_HOT_MAX_ROWS` rows): the bags as a row-normalised count matrix M [B, V],
  pooled = M @ W; backward is one GEMM;
- :func:`mean_bag` for the other bags: the forward is ``F.embedding_bag``.

The backward of :func:`lookup` and :func:`mean_bag` sums each table row's gradient in
position order (:func:`sum_rows_by_id`): a dense gradient with one ``index_add_``, a
sparse one by sorting the ids once and summing each row's run with ``F.embedding_bag``
(mode ``"sum"``, one bag per id). With ``sparse_grad=True`` the gradient is a
*coalesced* sparse COO tensor holding exactly the ids read (the rows of
``nn.EmbeddingBag(sparse=True)``'s gradient, without duplicates), so a sparse
optimizer's ``coalesce()`` has nothing left to sum. Below :data:`LOOKUP_MIN_READS` /
:data:`SORTED_MIN_READS` reads the custom backward does not pay for itself and the
native one is used.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
import torch.nn.functional as F

from adfed.data.examples import bag_lengths

logger = logging.getLogger(__name__)

#: Largest table read with :func:`multi_hot_mean`; bigger ones use :func:`mean_bag`.
MULTI_HOT_MAX_ROWS = 64
#: Fewest reads (ids in a batch) for which sparse :func:`mean_bag` sorts; fewer use the
#: native backward (measured, one thread, backward plus coalesce: about equal at 8k
#: reads, native 1.2-1.6x faster at 1k-4k, sorted 1.6-4x faster from 16k).
SORTED_MIN_READS = 8192
#: Fewest reads for which :func:`lookup` uses its own backward (one ``index_add_``);
#: fewer use ``F.embedding``'s (measured, forward plus backward, 1 and 2 threads:
#: 5-10 % faster from 2k reads, 15-25 % at 8k; the autograd.Function's fixed cost makes
#: it 20-50 % slower below 1k).
LOOKUP_MIN_READS = 2048
#: torch (2.13, CPU) sorts integer tensors of at least this many elements with a radix
#: sort and shorter ones by comparison, several times slower per element: 20k ids take
#: longer than 40k. :func:`_sort_stable` pads keys from :data:`_PAD_SORT_MIN` up to it.
_RADIX_SORT_MIN = 32768
_PAD_SORT_MIN = 8192


def _check_range(ids: torch.Tensor, rows: int) -> None:
    if ids.numel():
        low, high = torch.aminmax(ids)
        if int(low) < 0 or int(high) >= rows:
            raise IndexError(f"embedding ids must lie in [0, {rows}); got [{int(low)}, {int(high)}]")


def _sort_stable(keys: torch.Tensor, sentinel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(keys, stable=True)``, faster; ``sentinel`` must exceed every key.

    Same result whichever way torch sorts; only the speed depends on the padding.
    """
    n = keys.shape[0]
    if not _PAD_SORT_MIN <= n < _RADIX_SORT_MIN:
        return cast(tuple[torch.Tensor, torch.Tensor], torch.sort(keys, stable=True))
    # The padding sorts after every real key, so the first n entries are the answer.
    padded = torch.cat([keys, keys.new_full((_RADIX_SORT_MIN - n,), sentinel)])
    sorted_keys, order = torch.sort(padded, stable=True)
    return sorted_keys[:n], order[:n]


def _key_dtype(num_rows: int) -> torch.dtype:
    # num_rows itself must fit: it is the padding key of _sort_stable.
    if num_rows <= torch.iinfo(torch.int16).max:
        return torch.int16
    return torch.int32 if num_rows <= torch.iinfo(torch.int32).max else torch.int64


def sum_rows_by_id(
    ids: torch.Tensor, source: torch.Tensor | None, grad: torch.Tensor, num_rows: int, *, sparse: bool
) -> torch.Tensor:
    """The gradient of a table from the gradients of its reads.

    Parameters
    ----------
    ids : int [n], the table row read at each position (all in ``[0, num_rows)``).
    source : int64 [n], the row of ``grad`` that position j contributes; ``None`` means
        row j (one read per gradient row).
    grad : float [m, D].
    num_rows : V, the table's number of rows.
    sparse : return a coalesced sparse COO tensor instead of a dense one.

    Returns
    -------
    float [V, D], row v = sum of ``grad[source[j]]`` over positions j with ``ids[j] == v``,
    summed in position order. Sparse: only the rows in ``ids`` are stored (sorted, unique),
    zero-valued ones included, as in ``nn.Embedding(sparse=True)``'s gradient.

    Notes
    -----
    Dense: ``index_add_``, which on a CPU adds the source rows one index after another,
    so each row's sum runs in position order, as the sorted sum (bitwise the same; a test
    holds torch to it). 2-3x faster than sorting for the small tables it serves (a 95-row
    table read 8k times: 0.17 vs 0.42 ms, one thread). Sparse: a stable sort of the ids
    and one ``F.embedding_bag`` sum per run, which also yields the present rows.
    """
    if not sparse:
        rows = grad if source is None else grad.index_select(0, source)
        return grad.new_zeros(num_rows, grad.shape[1]).index_add_(0, ids, rows)
    # Sorting narrower keys is several times faster, and gives the same order.
    sorted_ids, order = _sort_stable(ids.to(_key_dtype(num_rows)), num_rows)
    rows_in_order = order if source is None else source.index_select(0, order)
    present, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    sums = F.embedding_bag(rows_in_order, grad.contiguous(), starts, mode="sum")
    # Unique sorted indices by construction: the invariant checks would only cost time.
    return torch.sparse_coo_tensor(
        present.to(torch.int64).unsqueeze(0), sums, (num_rows, grad.shape[1]), is_coalesced=True,
        check_invariants=False,
    )


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.num_rows = weight.shape[0]
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (ids,) = ctx.saved_tensors
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        return sum_rows_by_id(ids.reshape(-1), None, rows, ctx.num_rows, sparse=False), None


def lookup(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.embedding(ids, weight)``, with a faster dense backward for many ids.

    Parameters
    ----------
    ids : int64 of any shape S, each in ``[0, V)``.
    weight : float [V, D].

    Returns
    -------
    float [*S, D].

    Raises
    ------
    IndexError : an id outside ``[0, V)`` (from ``F.embedding``).
    """
    if ids.numel() < LOOKUP_MIN_READS:
        return F.embedding(ids, weight)
    return cast(torch.Tensor, _Lookup.apply(weight, ids))


def multi_hot_mean(
    values: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor, *, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``weight`` rows per bag as a matrix product.

    Parameters
    ----------
    values : int64 [nnz], the ids of all bags back to back.
    offsets : int64 [B], where each bag starts in ``values`` (no trailing total).
    weight : float [V, D].
    lengths : int64 [B], each bag's length when the caller has it
        (:meth:`~adfed.data.examples.Batch.bag_lengths`); computed from ``offsets`` if
        None.

    Returns
    -------
    float [B, D]; the gradient reaches ``weight`` through ordinary autograd.

    Raises
    ------
    IndexError : an id outside ``[0, V)``.
    """
    if lengths is None:
        lengths = bag_lengths(values, offsets)
    _check_range(values, weight.shape[0])
    n = offsets.shape[0]
    rows = torch.repeat_interleave(torch.arange(n), lengths, output_size=values.shape[0])
    counts = weight.new_zeros(n, weight.shape[0])
    counts.index_put_((rows, values), weight.new_ones(()).expand(values.shape[0]), accumulate=True)
    return (counts / lengths.clamp(min=1).unsqueeze(1)) @ weight


class _MeanBag(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, weight: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, sparse: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(values, lengths)  # the lengths say all backward needs of offsets
        ctx.num_rows, ctx.sparse = weight.shape[0], sparse
        return F.embedding_bag(values, weight, offsets, mode="mean")

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        values, lengths = ctx.saved_tensors
        scaled = grad_out / lengths.clamp(min=1).unsqueeze(1).to(grad_out.dtype)
        bag_of = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths, output_size=values.shape[0])
        grad = sum_rows_by_id(values, bag_of, scaled, ctx.num_rows, sparse=ctx.sparse)
        return grad, None, None, None, None


def mean_bag(
    values: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    *,
    sparse_grad: bool = False,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.embedding_bag(values, weight, offsets, mode="mean")`` with a faster backward.

    Same arguments and result as :func:`multi_hot_mean`. With ``sparse_grad`` the
    gradient for ``weight`` is sparse (touched rows only; coalesced from
    :data:`SORTED_MIN_READS` ids on), otherwise dense.

    Raises
    ------
    IndexError : an id outside ``[0, V)``.
    """
    _check_range(values, weight.shape[0])
    if sparse_grad and values.shape[0] < SORTED_MIN_READS:
        return F.embedding_bag(values, weight, offsets, mode="mean", sparse=True)
    if lengths is None:
        lengths = bag_lengths(values, offsets)
    return cast(torch.Tensor, _MeanBag.apply(weight, values, offsets, lengths, sparse_grad))


def pool_dense_bag(
    values: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor, *, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean-pool bags over a dense-gradient table with the faster of the two methods."""
    if weight.shape[0] <= MULTI_HOT_MAX_ROWS:
        return multi_hot_mean(values, offsets, weight, lengths=lengths)
    return mean_bag(values, offsets, weight, lengths=lengths)
