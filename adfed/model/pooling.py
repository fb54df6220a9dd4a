"""Fast mean pooling of bag fields over tables with dense gradients.

``nn.EmbeddingBag(mode="mean")`` computes the right values, but on a CPU its backward
pass for a dense gradient is several times slower than the rest of a bag's cost. Both
functions here return exactly what it returns (an empty bag pools to zeros) with a
cheaper backward:

- :func:`multi_hot_mean` for small tables (at most :data:`MULTI_HOT_MAX_ROWS` rows):
  the bags as a row-normalised count matrix M [B, V], pooled = M @ W; backward is one
  GEMM.
- :func:`mean_bag` for the others: the forward is ``F.embedding_bag``; the backward sums
  each row's gradient by sorting the ids once and pooling with ``F.embedding_bag``
  (mode ``"sum"``) over the ids' bags.

Tables with sparse gradients (LOCAL, SPARSE_SHARED) keep ``nn.EmbeddingBag``: they
produce the sparse row gradients that the sparse optimizers need.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

#: Largest table read with :func:`multi_hot_mean`; bigger ones use :func:`mean_bag`.
MULTI_HOT_MAX_ROWS = 64


def _check_range(ids: torch.Tensor, rows: int) -> None:
    if ids.numel():
        low, high = torch.aminmax(ids)
        if int(low) < 0 or int(high) >= rows:
            raise IndexError(f"embedding ids must lie in [0, {rows}); got [{int(low)}, {int(high)}]")


def _lengths(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch.diff(offsets, append=offsets.new_tensor([values.shape[0]]))


def multi_hot_mean(values: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of ``weight`` rows per bag as a matrix product.

    Parameters
    ----------
    values : int64 [nnz], the ids of all bags back to back.
    offsets : int64 [B], where each bag starts in ``values`` (no trailing total).
    weight : float [V, D].

    Returns
    -------
    float [B, D]; the gradient reaches ``weight`` through ordinary autograd.

    Raises
    ------
    IndexError : an id outside ``[0, V)``.
    """
    _check_range(values, weight.shape[0])
    n = offsets.shape[0]
    lengths = _lengths(values, offsets)
    rows = torch.repeat_interleave(torch.arange(n), lengths, output_size=values.shape[0])
    counts = weight.new_zeros(n, weight.shape[0])
    counts.index_put_((rows, values), weight.new_ones(()).expand(values.shape[0]), accumulate=True)
    return (counts / lengths.clamp(min=1).unsqueeze(1)) @ weight


class _MeanBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(values, offsets)
        ctx.num_rows = weight.shape[0]
        return F.embedding_bag(values, weight, offsets, mode="mean")

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        values, offsets = ctx.saved_tensors
        lengths = _lengths(values, offsets)
        scaled = (grad_out / lengths.clamp(min=1).unsqueeze(1).to(grad_out.dtype)).contiguous()
        bag_of = torch.repeat_interleave(torch.arange(offsets.shape[0]), lengths, output_size=values.shape[0])
        # Group the value positions by id: bag v of the transposed problem lists the
        # bags that contain id v; summing their scaled gradients gives row v's gradient.
        order = torch.sort(values).indices
        counts = torch.bincount(values, minlength=ctx.num_rows)
        starts = torch.cumsum(counts, 0) - counts
        grad_weight = F.embedding_bag(bag_of[order], scaled, starts, mode="sum")
        return grad_weight, None, None


def mean_bag(values: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.embedding_bag(values, weight, offsets, mode="mean")`` with a faster backward.

    Same arguments and result as :func:`multi_hot_mean`; the gradient for ``weight`` is
    dense.

    Raises
    ------
    IndexError : an id outside ``[0, V)``.
    """
    _check_range(values, weight.shape[0])
    return cast(torch.Tensor, _MeanBag.apply(weight, values, offsets))


def pool_dense_bag(values: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean-pool bags over a dense-gradient table with the faster of the two methods."""
    if weight.shape[0] <= MULTI_HOT_MAX_ROWS:
        return multi_hot_mean(values, offsets, weight)
    return mean_bag(values, offsets, weight)
