"""The parameter decomposition of DESIGN.md, as functions over a :class:`PCVRModel`.

Every parameter belongs to exactly one :class:`ParamGroup`; the model decides which at
construction (:meth:`PCVRModel.parameter_groups`) and this module only reads that map:

- ``local``: the ``user_id`` row and the user bias; never uploaded.
- ``sparse_shared``: large ID tables; a client uploads only the rows it touched
  (:func:`touched_rows`, :func:`get_rows`) and receives rows (:func:`set_rows_inplace`).
- ``dense_shared``: towers and small tables; moved whole (:func:`get_dense`,
  :func:`set_dense_inplace`).

Functions ending in ``_inplace`` write into the model; all others leave it untouched and
return copies.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

from adfed.data.examples import Batch, Examples
from adfed.data.schema import ParamGroup
from adfed.model.pcvr import PCVRModel
from adfed.model.sparse_adam import RowSparseAdam

logger = logging.getLogger(__name__)

DenseOpt = Literal["adam", "sgd"]
SparseOpt = Literal["sparse_adam", "torch_sparse_adam", "adagrad", "sgd"]
_FP32_BYTES = 4


#: model -> (name -> parameter, group -> names). Walking ``named_parameters`` visits every
#: submodule, which costs more than a small client's training step; a model's parameter
#: objects never change after :func:`~adfed.model.pcvr.build_model`, so it is done once.
_INDEX: weakref.WeakKeyDictionary[PCVRModel, tuple[dict[str, torch.nn.Parameter], dict[ParamGroup, list[str]]]] = \
    weakref.WeakKeyDictionary()


def _index(model: PCVRModel) -> tuple[dict[str, torch.nn.Parameter], dict[ParamGroup, list[str]]]:
    cached = _INDEX.get(model)
    if cached is None:
        params = dict(model.named_parameters())
        groups = model.parameter_groups()
        names = {g: [n for n in params if groups[n] is g] for g in ParamGroup}
        cached = _INDEX[model] = (params, names)
    return cached


def parameters(model: PCVRModel) -> dict[str, torch.nn.Parameter]:
    """Parameter name -> parameter, in ``named_parameters`` order (cached; do not mutate)."""
    return _index(model)[0]


def group_names(model: PCVRModel, group: ParamGroup) -> list[str]:
    """Names of the parameters in ``group``, in ``named_parameters`` order."""
    return list(_index(model)[1][group])


def partition(model: PCVRModel) -> dict[ParamGroup, list[str]]:
    """Every group (all three keys, possibly empty) -> its parameter names."""
    return {group: group_names(model, group) for group in ParamGroup}


def _param(model: PCVRModel, name: str) -> torch.nn.Parameter:
    params = parameters(model)
    if name not in params:
        raise KeyError(f"model has no parameter {name!r}; known: {sorted(params)}")
    return params[name]


def get_dense(model: PCVRModel, group: ParamGroup) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter in ``group`` (whole tensors).

    Meant for DENSE_SHARED (what a client uploads whole) and LOCAL (a phone's own state
    between rounds). For SPARSE_SHARED it returns the full tables, which is what a
    server sends when it ships the whole model; clients exchange rows instead.
    """
    params = parameters(model)
    return {name: params[name].detach().clone() for name in _index(model)[1][group]}


def set_dense_inplace(model: PCVRModel, tensors: Mapping[str, torch.Tensor], *, check: bool = True) -> None:
    """Copy ``tensors`` (name -> tensor of the parameter's shape) into ``model``.

    ``check=False`` skips the name, shape and finiteness checks, for tensors the caller
    has already checked (a client loading its round's model, checked once per version:
    :func:`check_round_tensors`); a wrong name still raises ``KeyError``.

    Raises
    ------
    KeyError : a name is not a parameter of ``model``.
    ValueError : a shape differs, or a value is not finite.
    """
    if not tensors:  # e.g. a model without sparse_shared tables (a real import's small vocabularies)
        return
    params = parameters(model)
    if not check:
        _copy_into(params, tensors)
        return
    for name, value in tensors.items():
        if name not in params:
            raise KeyError(f"model has no parameter {name!r}; known: {sorted(params)}")
        target = params[name]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"parameter {name}: shape must be {tuple(target.shape)}; got {tuple(value.shape)}")
    bad = first_non_finite(tensors)
    if bad is not None:
        raise ValueError(f"parameter {bad}: values must be finite")
    _copy_into(params, tensors)


def _copy_into(params: Mapping[str, torch.nn.Parameter], tensors: Mapping[str, torch.Tensor]) -> None:
    targets = [params[name] for name in tensors]  # a wrong name raises before anything is copied
    with torch.no_grad():
        for target, value in zip(targets, tensors.values(), strict=True):
            target.copy_(value)


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, None when all are
    finite (one max-abs per tensor when they are, the common case)."""
    if all_finite(list(tensors.values())):
        return None
    return next(name for name, v in tensors.items() if not bool(torch.isfinite(v).all()))


def check_round_tensors(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` naming the first tensor of ``tensors`` with a NaN or an
    infinity; ``what`` says whose tensors they are."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise ValueError(f"{what}: parameter {bad} is not finite")


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor holds a NaN or an infinity (one max-abs per tensor: cheap)."""
    nonempty = [t for t in tensors if t.numel()]
    if not nonempty:
        return True
    inf = float("inf")
    return bool(torch.isfinite(torch.stack([torch.linalg.vector_norm(t, inf) for t in nonempty])).all())


def sparse_tables(model: PCVRModel) -> list[str]:
    """Parameter names of the SPARSE_SHARED embedding tables."""
    return group_names(model, ParamGroup.SPARSE_SHARED)


def touched_rows(model: PCVRModel, batch: Batch | Examples) -> dict[str, torch.Tensor]:
    """Row ids each SPARSE_SHARED table reads for ``batch`` (a Batch, or Examples: the
    same ids read straight from its numpy columns).

    Returns
    -------
    table name -> int64 [k], unique and sorted (k may be 0 for an all-empty bag field).
    """
    out: dict[str, torch.Tensor] = {}
    for name in sparse_tables(model):
        ids = model.rows_read(name, batch)
        assert ids is not None  # every SPARSE_SHARED parameter is an embedding table
        if isinstance(ids, np.ndarray):  # Examples: numpy columns, no tensors built
            out[name] = torch.from_numpy(np.unique(ids).astype(np.int64, copy=False))
        else:
            out[name] = torch.unique(ids.to(torch.int64), sorted=True)
    return out


def touched_rows_many(model: PCVRModel, data: Examples, offsets: np.ndarray) -> list[dict[str, torch.Tensor]]:
    """:func:`touched_rows` of each part ``offsets[i]:offsets[i + 1]`` of ``data`` (the
    phones of a round, back to back), all parts at once: one sort per table. Each
    part's ids are a view of one tensor per table."""
    offsets = np.asarray(offsets, dtype=np.int64)
    num = len(offsets) - 1
    part_of = np.repeat(np.arange(num, dtype=np.int64), np.diff(offsets))
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(num)]
    for name in sparse_tables(model):
        ids = model.rows_read(name, data)
        assert isinstance(ids, np.ndarray)  # Examples give their numpy columns
        nrows = _param(model, name).shape[0]
        keys = np.unique(part_of[model.read_positions(name, data)] * nrows + ids)
        bounds = np.searchsorted(keys, np.arange(num + 1, dtype=np.int64) * nrows).tolist()
        rows = torch.from_numpy(keys - np.repeat(np.arange(num, dtype=np.int64) * nrows, np.diff(bounds)))
        for i in range(num):
            out[i][name] = rows[bounds[i] : bounds[i + 1]]
    return out


def _check_ids(name: str, ids: torch.Tensor, rows: int) -> None:
    if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"row ids for {name} must be a 1-d integer tensor; got {ids.dtype} {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
        raise ValueError(f"row ids for {name} must lie in [0, {rows}); got [{int(ids.min())}, {int(ids.max())}]")


def get_rows(model: PCVRModel, table: str, ids: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Copies of rows ``ids`` (int64 [k]) of embedding table ``table``: float32 [k, D].

    ``check=False`` skips the range check, for ids the caller already wrote with
    :func:`set_rows_inplace` (a client reading back the rows it trained).
    """
    weight = _param(model, table)
    if check:
        _check_ids(table, ids, weight.shape[0])
    return weight.detach()[ids.long()].clone()


def set_rows_inplace(model: PCVRModel, table: str, ids: torch.Tensor, values: torch.Tensor, *,
                     check: bool = True) -> None:
    """Write ``values`` (float [k, D]) into rows ``ids`` (int64 [k], unique) of ``table``.

    ``check=False`` skips the checks, for rows the caller sliced from checked tables with
    ids it computed itself (a client loading the rows its own data reads).

    Raises
    ------
    ValueError : ids out of range or repeated, a shape mismatch, or non-finite values.
    """
    weight = _param(model, table)
    if not check:
        with torch.no_grad():
            weight[ids] = values
        return
    _check_ids(table, ids, weight.shape[0])
    expected = (ids.numel(), weight.shape[1])
    if tuple(values.shape) != expected:
        raise ValueError(f"rows for {table}: values must have shape {expected}; got {tuple(values.shape)}")
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"rows for {table}: ids must be unique")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"rows for {table}: values must be finite")
    with torch.no_grad():
        weight[ids.long()] = values.to(weight.dtype)


def dense_param_groups(model: PCVRModel, lr: float, table_lr: float | None = None) -> list[dict[str, Any]]:
    """The parameters with dense gradients as optimizer parameter groups: one at ``lr``,
    or, with ``table_lr``, the small dense embedding tables
    (:meth:`~adfed.model.pcvr.PCVRModel.is_dense_table`) in a second group at ``table_lr``.

    Measured on the demo data: under one SGD learning rate these tables move 2-24x less
    per step than under Adam while the towers' output layers move 3-100x more, and one
    lr cannot fix both; giving the tables their own (~50x larger) lr is what lets
    FedAvg's plain SGD match Adam. See docs/results/2026-11-26-fedavg-small-tables.md.
    """
    named = parameters(model).items()
    split = table_lr is not None
    rest = [p for n, p in named if not model.has_sparse_grad(n) and not (split and model.is_dense_table(n))]
    tables = [p for n, p in named if split and model.is_dense_table(n)]
    return [g for g in ({"params": rest, "lr": lr}, {"params": tables, "lr": table_lr}) if g["params"]]


def lr_decay_factor(step: int, start: int) -> float:
    """The learning-rate multiplier after ``step`` optimizer steps or server rounds
    (``train.lr_decay_start``, ``fl.lr_decay_start``): 1 through ``start``, then
    ``start / step`` (the 1/t decay of stochastic approximation); always 1 when ``start``
    is 0."""
    return 1.0 if start == 0 or step <= start else start / step


def make_optimizers(
    model: PCVRModel,
    *,
    lr: float,
    sparse_lr: float | None = None,
    dense_opt: DenseOpt = "adam",
    sparse_opt: SparseOpt = "sparse_adam",
    weight_decay: float = 0.0,
    table_lr: float | None = None,
    local_lr: float | None = None,
) -> list[torch.optim.Optimizer]:
    """One optimizer for the parameters with sparse gradients, one for the rest.

    Sparse optimizers touch only the rows present in a step's gradient, so untouched
    rows of the big tables keep their values (and their optimizer state) exactly.
    Empty parameter sets (and empty groups) get no optimizer; call ``step``/``zero_grad``
    on every one.

    Parameters
    ----------
    lr : learning rate of the dense optimizer (and of the sparse one by default).
    sparse_lr : learning rate of the sparse optimizer; ``None`` means ``lr``.
    dense_opt : ``"adam"`` or ``"sgd"``.
    sparse_opt : ``"sparse_adam"`` (lazy Adam: :class:`~adfed.model.sparse_adam.RowSparseAdam`,
        ``torch.optim.SparseAdam``'s update at a lower cost), ``"torch_sparse_adam"``
        (``torch.optim.SparseAdam`` itself, for comparison), ``"adagrad"`` or ``"sgd"``.
    weight_decay : L2 weight decay of the dense optimizer (``train.weight_decay``); the
        sparse tables take ``train.embedding_l2`` instead (see ``embedding_penalty``).
    table_lr : learning rate of the small dense embedding tables
        (:meth:`~adfed.model.pcvr.PCVRModel.is_dense_table`), a parameter group of their
        own in the dense optimizer; ``None`` means ``lr``.
    local_lr : learning rate of the LOCAL tables with sparse gradients (the user's row
        and bias), a parameter group of their own in the sparse optimizer; ``None``
        means ``sparse_lr``.
    """
    if not lr > 0:
        raise ValueError(f"train.lr must be a float > 0; got {lr}")
    if sparse_lr is not None and not sparse_lr > 0:
        raise ValueError(f"sparse_lr must be None or a float > 0; got {sparse_lr}")
    if table_lr is not None and not table_lr > 0:
        raise ValueError(f"table_lr must be None or a float > 0; got {table_lr}")
    if local_lr is not None and not local_lr > 0:
        raise ValueError(f"local_lr must be None or a float > 0; got {local_lr}")
    slr = lr if sparse_lr is None else sparse_lr
    local = set(group_names(model, ParamGroup.LOCAL)) if local_lr is not None else set()
    sparse_named = [(n, p) for n, p in model.named_parameters() if model.has_sparse_grad(n)]
    sparse: list[dict[str, Any]] = [g for g in (
        {"params": [p for n, p in sparse_named if n not in local], "lr": slr},
        {"params": [p for n, p in sparse_named if n in local], "lr": local_lr},
    ) if g["params"]]
    dense = dense_param_groups(model, lr, table_lr)
    optimizers: list[torch.optim.Optimizer] = []
    if dense:
        # fused: one kernel over all tensors; ~10x faster than the per-tensor loop on CPU
        # (fused=True on CPU needs torch >= 2.4, the oldest torch this package supports)
        if dense_opt == "adam":
            optimizers.append(torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay, fused=True))
        elif dense_opt == "sgd":
            optimizers.append(torch.optim.SGD(dense, lr=lr, weight_decay=weight_decay, fused=True))
        else:
            raise ValueError(f"dense_opt must be 'adam' or 'sgd'; got {dense_opt!r}")
    if sparse:
        if sparse_opt == "sparse_adam":
            optimizers.append(RowSparseAdam(sparse, lr=slr))
        elif sparse_opt == "torch_sparse_adam":
            optimizers.append(torch.optim.SparseAdam(sparse, lr=slr))
        elif sparse_opt == "adagrad":
            optimizers.append(torch.optim.Adagrad(sparse, lr=slr))
        elif sparse_opt == "sgd":
            optimizers.append(torch.optim.SGD(sparse, lr=slr))
        else:
            raise ValueError(
                f"sparse_opt must be 'sparse_adam', 'torch_sparse_adam', 'adagrad' or 'sgd'; got {sparse_opt!r}")
    return optimizers


def group_bytes(model: PCVRModel, group: ParamGroup) -> int:
    """Size of ``group``'s parameters as fp32, in bytes."""
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in group_names(model, group)) * _FP32_BYTES


def model_bytes(model: PCVRModel) -> int:
    """Size of the whole model as fp32, in bytes (``summary.json: model_bytes``)."""
    return sum(p.numel() for p in model.parameters()) * _FP32_BYTES
