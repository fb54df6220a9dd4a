"""The client update: a pure function of (global params for the client, data, settings, seed).

A phone receives the ``dense_shared`` parameters and the rows of each ``sparse_shared``
table that its own data touches, restores its ``local`` group (or starts it at zero),
trains locally with SGD (plus the FedProx proximal term when asked), and returns an
:class:`~adfed.fl.types.Update` with the deltas of the shared groups. The new ``local``
group is returned separately: it stays on the phone.

``scratch`` is a reusable model object (built with ``user_rows=1``) that the caller owns;
everything the update reads from it is overwritten first, so the result does not depend
on what a previous client left in it (rows a client does not touch are never read).
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from adfed.data.examples import Batch, Examples
from adfed.data.schema import USER_KEY, ParamGroup
from adfed.errors import TrainingError
from adfed.fl.types import ClientSettings, SparseRows, Update
from adfed.model.groups import (
    dense_param_groups,
    get_dense,
    get_rows,
    group_names,
    parameters,
    set_dense_inplace,
    set_rows_inplace,
    sparse_tables,
    touched_rows,
)
from adfed.model.pcvr import PCVRModel, embedding_penalty, ensure_finite, esmm_loss
from adfed.model.sparse_adam import RowSparseAdam


@dataclasses.dataclass(frozen=True)
class ClientTask:
    """Everything the server sends one client for one round (plus the client's own state).

    ``rows`` holds, per sparse table, the global rows for the ids the client touches;
    ``local`` is the client's own LOCAL group from its previous round (None: first time).
    ``seed`` is derived from (run seed, round, client) by the engine. ``checked``: the
    caller has already checked ``dense`` and the tables ``rows`` were sliced from (once
    per model version: :func:`~adfed.model.groups.check_round_tensors`), with row ids
    from :func:`needed_rows`, so loading them skips the per-tensor checks.
    """

    client_id: int
    version: int
    settings: ClientSettings
    dense: dict[str, torch.Tensor]
    rows: dict[str, SparseRows]
    local: dict[str, torch.Tensor] | None
    seed: tuple[int, ...]
    checked: bool = False


def local_batches(data: Examples, settings: ClientSettings, rng: np.random.Generator) -> list[Batch]:
    """The client's training batches for all local epochs, user ids mapped to row 0."""
    data = dataclasses.replace(data, ids={**data.ids, USER_KEY: np.zeros(len(data), np.int64)}) \
        if USER_KEY in data.ids else data
    out: list[Batch] = []
    for _ in range(settings.epochs):
        out.extend(data.batches(settings.batch_size, rng))
    return out


def needed_rows(scratch: PCVRModel, data: Examples) -> dict[str, torch.Tensor]:
    """Per sparse table, the sorted unique row ids the client's data reads."""
    return touched_rows(scratch, data)


def _load_inplace(scratch: PCVRModel, task: ClientTask) -> None:
    groups = scratch.parameter_groups()
    foreign = sorted(n for n in task.dense if groups.get(n) is not ParamGroup.DENSE_SHARED)
    if foreign:  # the upload is the delta of every name sent: a local one would leave the phone
        raise TrainingError(f"the round model for client {task.client_id} lists {', '.join(foreign)}, "
                            f"which are not dense_shared parameters; a phone uploads dense_shared deltas only")
    set_dense_inplace(scratch, task.dense, check=not task.checked)
    for table, rows in task.rows.items():
        if len(rows.ids):
            set_rows_inplace(scratch, table, rows.ids, rows.values, check=not task.checked)
    params = parameters(scratch)
    with torch.no_grad():
        for name in group_names(scratch, ParamGroup.LOCAL):
            if task.local is not None:
                params[name].copy_(task.local[name])
            else:
                params[name].zero_()


def _proximal(scratch: PCVRModel, task: ClientTask, mu: float) -> torch.Tensor:
    """FedProx's ``mu/2 * ||w - w_global||^2`` over every shared weight the client holds:
    the dense part, and the rows of the sparse tables it was sent (read with
    ``F.embedding(sparse=True)``, so those tables' gradients stay sparse)."""
    params = parameters(scratch)
    total = torch.zeros(())
    for name, ref in task.dense.items():
        total = total + (params[name] - ref).pow(2).sum()
    for table, rows in task.rows.items():
        if len(rows.ids):
            current = F.embedding(rows.ids, params[table], sparse=scratch.has_sparse_grad(table))
            total = total + (current - rows.values).pow(2).sum()
    return 0.5 * mu * total


#: scratch model -> (settings key, optimizers): plain SGD keeps no state between steps,
#: so one optimizer serves every client trained on that scratch model with the same
#: learning rates (building one costs ~0.3 ms, as much as a small client's step).
_SGD_CACHE: weakref.WeakKeyDictionary[PCVRModel, tuple[tuple[float, ...], list[torch.optim.Optimizer]]] = \
    weakref.WeakKeyDictionary()


def _local_optimizers(scratch: PCVRModel, s: ClientSettings) -> list[torch.optim.Optimizer]:
    """Local optimizers for one round; see ClientSettings.

    SGD is one optimizer with up to four parameter groups (the towers and other dense
    parameters at ``lr``, the small dense embedding tables at ``table_lr``, the sparse
    rows at ``sparse_lr``, the phone's own rows at ``user_lr`` when set): one
    ``zero_grad`` and one ``step`` per batch, the same work as a plain training loop. It is stateless (no momentum), so it is built once per
    scratch model and learning rates. Adam starts from a fresh state every round.
    """
    key = (s.lr, s.sparse_lr, -1.0 if s.table_lr is None else s.table_lr, -1.0 if s.user_lr is None else s.user_lr)
    cached = _SGD_CACHE.get(scratch) if s.optimizer == "sgd" else None
    if cached is not None and cached[0] == key:
        return cached[1]
    named = parameters(scratch).items()
    own = set(group_names(scratch, ParamGroup.LOCAL)) if s.user_lr is not None else set()
    rows = [(n, p) for n, p in named if scratch.has_sparse_grad(n)]
    sparse = [g for g in ({"params": [p for n, p in rows if n not in own], "lr": s.sparse_lr},
                          {"params": [p for n, p in rows if n in own], "lr": s.user_lr}) if g["params"]]
    if s.optimizer == "adam":
        dense = [p for n, p in named if not scratch.has_sparse_grad(n)]
        return [torch.optim.Adam(dense, lr=s.lr), *([RowSparseAdam(sparse, lr=s.sparse_lr)] if sparse else [])]
    if s.optimizer != "sgd":
        raise ValueError(f"fl.local_optimizer must be 'sgd' or 'adam'; got {s.optimizer!r}")
    groups = [*dense_param_groups(scratch, s.lr, s.table_lr), *sparse]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.SGD(groups, lr=s.lr)]
    _SGD_CACHE[scratch] = (key, optimizers)
    return optimizers


def client_update(
    scratch: PCVRModel, task: ClientTask, data: Examples
) -> tuple[Update, dict[str, torch.Tensor]]:
    """Train one client; returns (update to upload, new local state to keep on the phone).

    Runs single-threaded so the result is bitwise identical on every backend.
    """
    threads = torch.get_num_threads()
    if threads != 1:  # changing the thread count costs ~1 ms: backends set 1 for a whole round
        torch.set_num_threads(1)
    try:
        _load_inplace(scratch, task)
        rng = np.random.default_rng(list(task.seed))
        s = task.settings
        optimizers = _local_optimizers(scratch, s)
        if not scratch.training:
            scratch.train()
        losses = []
        for step, batch in enumerate(local_batches(data, s, rng)):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss = esmm_loss(scratch(batch), batch, s.ctcvr_weight)
            value = float(loss.detach())
            if not math.isfinite(value):
                ensure_finite(loss, where=f"client {task.client_id}, version {task.version}, step {step}")
            losses.append(value)
            if s.prox_mu > 0:
                loss = loss + _proximal(scratch, task, s.prox_mu)
            if s.embedding_l2 > 0:
                loss = loss + s.embedding_l2 * embedding_penalty(scratch, batch)
            loss.backward()
            for opt in optimizers:
                opt.step()
        params = parameters(scratch)
        names = list(task.dense)
        with torch.no_grad():
            dense_delta = {k: params[k] - task.dense[k] for k in names}
        sparse_delta = {}
        for table in sparse_tables(scratch):
            rows = task.rows.get(table)
            if rows is None or not len(rows.ids):
                continue
            sparse_delta[table] = SparseRows(rows.ids, get_rows(scratch, table, rows.ids, check=False) - rows.values)
        local = get_dense(scratch, ParamGroup.LOCAL)
    finally:
        if threads != 1:
            torch.set_num_threads(threads)
    update = Update(
        client_id=task.client_id,
        dense=dense_delta,
        sparse=sparse_delta,
        num_examples=len(data),
        base_version=task.version,
        metrics={"loss": sum(losses) / len(losses) if losses else float("nan")},
    )
    return update, local
