"""Lazy Adam for parameters with sparse row gradients, cheaper than ``torch.optim.SparseAdam``.

:class:`RowSparseAdam` computes what ``torch.optim.SparseAdam`` computes: duplicate rows
of the (possibly uncoalesced) sparse COO gradient are summed, then only the rows present
get their first/second moments and values updated, with bias correction from the
parameter's own step count (which counts every step the parameter had a gradient, even
an empty one). Rows absent from the gradient, and their optimizer state, are left exactly
as they were.

What differs is the bookkeeping. ``SparseAdam`` coalesces each gradient (a sort and a
sum over every stored entry), reads the moments through ``sparse_mask`` and adds three
sparse tensors into dense ones: some twenty small operations per parameter. Here:

- a gradient flagged coalesced, or whose row ids are strictly increasing, is used as it
  is; otherwise the row ids are sorted (stably) and each row's entries are summed in
  their stored order with one ``F.embedding_bag(mode="sum")``. Gradients with equal row
  ids (two tables read with the same ids) share one sort.
- ``exp_avg`` and ``exp_avg_sq`` are the two halves of one buffer ``[2, rows, row size]``
  (each contiguous, in the parameter's shape), so one ``index_select`` reads both
  moments of the present rows and one ``index_copy_`` writes them back;
- the gathered rows are updated with six element-wise operations (``lerp_`` twice,
  ``square``, ``sqrt``, ``add_``, ``addcdiv_``) instead of twelve, and the parameter's
  rows are written back with one ``index_copy_``.

For a float32 parameter the square root is taken in float64 and rounded (correctly
rounded, as C's ``sqrtf``; torch's float32 ``sqrt`` is not), which keeps the results
bitwise those of earlier versions, whose compiled row kernel computed ``sqrtf``.

The arithmetic is Adam's, as in ``SparseAdam``, but with fused operations (``lerp``,
``addcdiv``) and another order of summing duplicate rows, so results agree with
``SparseAdam`` to float rounding, not bitwise. Everything is deterministic: the same
gradients give bitwise the same result run to run, whatever the number of threads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RowSparseAdam", "unique_rows"]

_EMBEDDING_BAG_DTYPES = (torch.float32, torch.float64)


def _row_ids(grad: Tensor, shape: torch.Size) -> Tensor:
    """int64 [nnz]: each stored entry's row, row-major over the first ``sparse_dim`` dims."""
    indices = grad._indices()
    if indices.shape[0] == 1:
        return indices[0]
    strides = [1] * indices.shape[0]
    for d in range(indices.shape[0] - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return (indices * indices.new_tensor(strides).unsqueeze(1)).sum(0)


@dataclass(frozen=True)
class _Runs:
    """How the stored entries of a gradient fall into unique rows."""

    ids: Tensor  # int64 [k], the unique rows, increasing
    order: Tensor | None  # int64 [n], entries sorted by row (stable); None: already unique
    starts: Tensor | None  # int64 [k], where each row's run begins in ``order``


def _runs(rows: Tensor, is_coalesced: bool) -> _Runs:
    if is_coalesced or rows.shape[0] <= 1 or bool((rows[1:] > rows[:-1]).all()):
        return _Runs(rows, None, None)
    sorted_rows, order = torch.sort(rows, stable=True)
    ids, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    return _Runs(ids, order, torch.cumsum(counts, 0) - counts)


def _sum_runs(values: Tensor, runs: _Runs) -> Tensor:
    """``values`` [n, *dense] summed per unique row of ``runs``, each in stored order."""
    if runs.order is None:
        return values
    assert runs.starts is not None
    k = runs.ids.shape[0]
    flat = values.reshape(values.shape[0], -1)
    if flat.shape[1] and flat.dtype in _EMBEDDING_BAG_DTYPES:
        summed = F.embedding_bag(runs.order, flat, runs.starts, mode="sum")
    else:  # a type embedding_bag does not take; same order of summation
        lengths = torch.diff(runs.starts, append=runs.starts.new_tensor([flat.shape[0]]))
        run_of = torch.repeat_interleave(torch.arange(k, device=flat.device), lengths)
        summed = flat.new_zeros((k, flat.shape[1])).index_add_(0, run_of, flat.index_select(0, runs.order))
    return summed.reshape(k, *values.shape[1:])


def unique_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """The unique rows of a sparse COO gradient and their summed values.

    Parameters
    ----------
    grad : sparse COO with ``sparse_dim`` s >= 1.

    Returns
    -------
    ids : int64 [k], unique row ids, increasing (a row is a position over the first s
        dims, row-major).
    values : [k, *grad.shape[s:]], each the sum of that row's entries in stored order
        (``grad.coalesce()``'s values, up to the order of summation).
    """
    runs = _runs(_row_ids(grad, grad.shape), grad.is_coalesced())
    return runs.ids, _sum_runs(grad._values(), runs)


class RowSparseAdam(torch.optim.Optimizer):
    """``torch.optim.SparseAdam`` (lazy Adam): same arguments, results and state, faster.

    Parameters
    ----------
    params : dense parameters (or parameter groups) whose gradients are sparse COO.
    lr : learning rate.
    betas : coefficients of the running averages of the gradient and its square.
    eps : added to the denominator.
    maximize : maximise the objective instead of minimising it.

    Notes
    -----
    Each parameter's state holds ``step`` (an int, counting every step the parameter had
    a gradient), ``exp_avg`` and ``exp_avg_sq`` (the parameter's shape), as
    ``SparseAdam``'s does, so state dicts carry over either way. The two moments are
    the halves of one buffer; moments loaded from elsewhere (``load_state_dict``) are
    copied into such a buffer at the parameter's next step.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "maximize": maximize})
        for group in self.param_groups:
            for p in group["params"]:
                if p.is_sparse:
                    raise ValueError("RowSparseAdam requires dense parameter tensors")
                if p.is_complex():
                    raise ValueError("RowSparseAdam does not support complex parameters")
        # parameter -> (exp_avg, exp_avg_sq, their buffer [2, rows, row size]); checked
        # against the state by identity, so a loaded state is repacked once.
        self._moments: dict[Tensor, tuple[Tensor, Tensor, Tensor]] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One lazy Adam step for every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            todo: list[tuple[Tensor, Tensor, dict[str, Any]]] = []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if not grad.is_sparse:
                    raise RuntimeError("RowSparseAdam does not support dense gradients, please consider Adam instead")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    self._pack_moments(p, state, grad.sparse_dim())
                state["step"] += 1
                if grad._values().numel():  # as SparseAdam: an empty gradient moves nothing
                    todo.append((p, grad, state))
            if todo:
                self._update_group(group, todo)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """``Optimizer.state_dict()``, with each moment a tensor of its own.

        Here the two moments are views into one buffer, the second at a storage offset;
        handed to ``torch.optim.SparseAdam`` as they are, its dense ``add_`` of a sparse
        tensor (torch 2.13, CPU) ignores that offset for 1-D parameters and writes
        outside the buffer (found by a test: the update vanished, then the heap was
        corrupt). So the moments are copied here (a checkpoint's cost, not a step's).
        """
        out = super().state_dict()
        out["state"] = {
            k: {name: (v.clone() if name in ("exp_avg", "exp_avg_sq") else v) for name, v in s.items()}
            for k, s in out["state"].items()
        }
        return out

    def _pack_moments(self, p: Tensor, state: dict[str, Any], sparse_dim: int) -> Tensor:
        """Put ``p``'s moments (zeros if it has none yet) into one [2, rows, row size] buffer.

        ``state["exp_avg"]`` and ``state["exp_avg_sq"]`` become its two halves, contiguous
        views in the parameter's shape.
        """
        rows, row_size = math.prod(p.shape[:sparse_dim]), math.prod(p.shape[sparse_dim:])
        if "exp_avg" in state:
            packed = torch.stack([state["exp_avg"].reshape(rows, row_size), state["exp_avg_sq"].reshape(rows, row_size)])
        else:
            packed = torch.zeros((2, rows, row_size), dtype=p.dtype, device=p.device)
        m, v = packed[0].view(p.shape), packed[1].view(p.shape)
        state["exp_avg"], state["exp_avg_sq"] = m, v
        self._moments[p] = (m, v, packed)
        return packed

    def _moment_rows(self, p: Tensor, state: dict[str, Any], sparse_dim: int) -> Tensor:
        """The buffer of ``p``'s two moments as [2, rows, row size].

        Moments that are not (or no longer, e.g. after ``load_state_dict``) the halves of
        a buffer this optimizer made are copied into a new one first.
        """
        cached = self._moments.get(p)
        if (cached is None or cached[0] is not state["exp_avg"] or cached[1] is not state["exp_avg_sq"]
                or cached[2].shape[1] != math.prod(p.shape[:sparse_dim])):
            return self._pack_moments(p, state, sparse_dim)
        return cached[2]

    def _update_group(self, group: dict[str, Any], todo: list[tuple[Tensor, Tensor, dict[str, Any]]]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, maximize = float(group["lr"]), group["eps"], group.get("maximize", False)
        seen: list[tuple[Tensor, _Runs]] = []
        for p, grad, state in todo:
            rows = _row_ids(grad, p.shape)
            step = state["step"]
            step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
            moments = self._moment_rows(p, state, grad.sparse_dim())
            values = grad._values()
            runs = None
            if not grad.is_coalesced():  # gradients with equal row ids share one sort
                runs = next((r for ids, r in seen if ids.shape == rows.shape and torch.equal(ids, rows)), None)
            if runs is None:
                runs = _runs(rows, grad.is_coalesced())
                seen.append((rows, runs))
            values = _sum_runs(values, runs)
            if maximize:
                values = -values
            _adam_rows(p, runs.ids, values.reshape(values.shape[0], -1), moments,
                       beta1=beta1, beta2=beta2, eps=eps, step_size=step_size)


def _adam_rows(
    p: Tensor, ids: Tensor, grad: Tensor, moments: Tensor, *, beta1: float, beta2: float, eps: float, step_size: float
) -> None:
    """Lazy Adam on rows ``ids`` (int64 [k], unique) of ``p``.

    ``grad`` is their summed gradient [k, r]; ``moments`` the buffer [2, rows, r] of
    ``p``'s ``exp_avg`` and ``exp_avg_sq``.
    """
    rows, copied = _as_rows(p, moments.shape[1], moments.shape[2])
    p_rows = rows.index_select(0, ids)
    both = moments.index_select(1, ids)  # [2, k, r]: exp_avg rows, exp_avg_sq rows
    exp_avg, exp_avg_sq = both[0], both[1]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    # torch's float32 sqrt (MKL's) is not correctly rounded (1 ulp off on ~15 % of
    # elements); the square root of the float64 value rounded to float32 is (C's sqrtf),
    # and is what earlier versions' compiled kernel computed: results stay bitwise the same.
    denom = exp_avg_sq.sqrt() if exp_avg_sq.dtype != torch.float32 else exp_avg_sq.double().sqrt_().float()
    p_rows.addcdiv_(exp_avg, denom.add_(eps), value=-step_size)
    moments.index_copy_(1, ids, both)
    rows.index_copy_(0, ids, p_rows)
    if copied:  # p could not be viewed as rows: write the whole copy back
        p.copy_(rows.view(p.shape))


def _as_rows(p: Tensor, rows: int, row_size: int) -> tuple[Tensor, bool]:
    """``p`` as [rows, row_size]: a view when its strides allow (False), else a copy (True)."""
    try:
        return p.view(rows, row_size), False
    except RuntimeError:  # strides that no view can merge
        return p.reshape(rows, row_size).clone(), True
