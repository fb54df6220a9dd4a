"""Many phones' local training in one pass, each phone's own exact update.

Under the default settings a phone runs one full-batch SGD step from the round's model
(``fl.local_epochs = 1``, ``fl.local_optimizer = "sgd"``, at most ``fl.local_batch_size``
training rows). The phones of a round then share every parameter they start from except
their ``local`` rows (the ``user_id`` row and the user bias), and each one's step is
``theta - lr * grad L_i(theta, u_i)``. All those gradients come from one forward and one
backward pass over the phones' rows back to back:

- each row's loss terms are weighted as in its phone's :func:`~adfed.model.pcvr.esmm_loss`
  (1 / its phone's rows for the CTR term, 1 / its phone's observed labels for the CTCVR
  term), so the gradient of the sum at a row is the gradient of that row's phone's loss;
- each phone reads its own user row and bias row from tables stacked for the chunk;
- autograd gives the gradient at every place a parameter is used (each field's pooled
  embedding, each linear layer's output, the two logits), per row; each phone's
  parameter gradient is then a reduction over its own rows only: per-phone outer
  products for the linear layers (one ``mm`` per phone for a wide layer, one ``bmm`` per
  bucket of phones of similar size for a head's few values: :func:`_segment_outer`),
  per-(phone, row) sums for the embedding tables.

The step then gives each phone its own :class:`~adfed.fl.types.Update` and ``local``
state, as :func:`adfed.fl.client.client_update` would (within float rounding: sums run
in another order), so everything after training (the update pipeline, encoding) still
sees individual updates. ``client_update`` stays the reference and runs whatever this
cannot express (:func:`unsupported`: several local steps, Adam, a model of another shape).
FedProx's proximal term has zero gradient at the first step (the phone's weights equal
the global ones), so FedProx with one step is batched too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adfed.data.examples import Batch, Examples
from adfed.data.schema import USER_KEY, ParamGroup
from adfed.fl.client import ClientTask
from adfed.fl.types import ClientSettings, FlatDense, SparseRows, Update, flat_index
from adfed.model.groups import (
    group_names,
    parameters,
    set_dense_inplace,
    set_rows_inplace,
    sparse_tables,
)
from adfed.model.pcvr import Output, PCVRModel, ctcvr_nll, ensure_finite

#: phones per forward/backward pass: bounds the per-phone gradients held at once
#: (~150 KB per phone for the default model).
CHUNK_PHONES = 256
_USER_BIAS = "user_bias.weight"
#: the ClientSettings fields the batched step implements
# the settings local training reads; ``clip`` and ``clips`` (privacy) are applied after
# it, to each phone's own update, by the update pipeline (run_job)
_KNOWN_SETTINGS = frozenset({"epochs", "batch_size", "lr", "sparse_lr", "prox_mu", "optimizer", "embedding_l2",
                             "table_lr", "user_lr", "clip", "clips", "ctcvr_weight"})


def unsupported(settings: ClientSettings, model: PCVRModel) -> str | None:
    """Why the phones of a round with ``settings`` cannot train batched (None: they can,
    those with :func:`one_step` data)."""
    for field in dataclasses.fields(settings):  # a setting added later may change local training
        if field.name not in _KNOWN_SETTINGS and getattr(settings, field.name) != field.default:
            return f"local setting {field.name} = {getattr(settings, field.name)!r} is unknown to the batched path"
    if settings.optimizer != "sgd":
        return (f"fl.local_optimizer = {settings.optimizer!r}: its per-phone state makes each step "
                f"a function of the phone's own history (batched: 'sgd' only)")
    if settings.epochs != 1:
        return f"fl.local_epochs = {settings.epochs}: several local steps per phone (batched: one)"
    return _model_reason(model)


def one_step(num_rows: int, settings: ClientSettings) -> bool:
    """True when a phone with ``num_rows`` training rows runs exactly one local step."""
    return 1 <= num_rows <= settings.batch_size and settings.epochs == 1


def _model_reason(model: PCVRModel) -> str | None:
    local = set(group_names(model, ParamGroup.LOCAL))
    emb = model.embeddings
    user = next((f for f in emb.embedded if f.name == USER_KEY), None)
    expected = set()
    if user is not None:
        if user.is_bag or user.name in emb.shared:
            return f"field {USER_KEY} is not a plain categorical field"
        expected.add(model.table_name(USER_KEY))
    if model.user_bias is not None:
        expected.add(_USER_BIAS)
    if local != expected:
        return f"local parameters {sorted(local)} are not the user row and bias"
    for seq in (model.towers.bottom, model.towers.ctr, model.towers.cvr):
        if not all(isinstance(m, (nn.Linear, nn.ReLU)) for m in seq):
            return "the towers hold layers other than Linear and ReLU"
    return None


def _segment_sum(values: torch.Tensor, phone: torch.Tensor, num: int) -> torch.Tensor:
    return values.new_zeros(num, *values.shape[1:]).index_add_(0, phone, values)


#: how :func:`_segment_outer` pads a chunk's phones: per bucket, (phones, row index
#: [phones, width], ``rows`` (the zero pad row) past a phone's own rows).
Buckets = list[tuple[torch.Tensor, torch.Tensor]]


def _buckets(offsets: np.ndarray) -> Buckets:
    """The phones of segments ``offsets[i]:offsets[i + 1]`` bucketed by size (at most ~2x
    apart), each bucket's rows as an index padded with the pad row ``offsets[-1]``."""
    counts = np.diff(offsets)
    num, rows = len(counts), int(offsets[-1])
    order = np.argsort(counts, kind="stable")
    sorted_counts = counts[order]
    out: Buckets = []
    i = 0
    while i < num:
        low = int(sorted_counts[i])
        j = int(np.searchsorted(sorted_counts, max(2 * low, low + 8), side="right"))
        sel = order[i:j]
        steps = np.arange(int(sorted_counts[j - 1]))
        idx = np.where(steps[None, :] < counts[sel][:, None], offsets[sel][:, None] + steps[None, :], rows)
        out.append((torch.from_numpy(sel), torch.from_numpy(idx)))
        i = j
    return out


#: a layer's per-phone outer products of at least this many values are one ``mm`` per
#: phone, written in place (padded ``bmm`` buckets copy each phone's rows and its result
#: once more, and pad up to 2x: ~2x slower for the bottom layer); smaller ones (a head's
#: [1, 64]) are a few ``bmm`` calls, cheaper than a hundred tiny ``mm``
_MM_PER_PHONE = 1024


def _segment_outer(g: torch.Tensor, a: torch.Tensor, buckets: Buckets, offsets: np.ndarray) -> torch.Tensor:
    """``out[i] = g[rows_i].T @ a[rows_i]`` for each segment ``i`` (phone ``i``'s rows
    ``offsets[i]:offsets[i + 1]``): float [P, o, k] from g [B, o], a [B, k].

    Large layers: one ``mm`` per phone into its slot. Small ones: segments zero-padded
    within their bucket (:func:`_buckets`), so a few ``bmm`` calls cover every phone
    however heavy-tailed their row counts are. Both sum the same products; the order BLAS
    picks for a shape can differ, so they agree to rounding (bit for bit on most shapes).
    """
    num = len(offsets) - 1
    if g.shape[1] * a.shape[1] >= _MM_PER_PHONE:
        out = g.new_empty(num, g.shape[1], a.shape[1])
        gt = g.t()
        bounds = offsets.tolist()
        for i in range(num):
            torch.mm(gt[:, bounds[i] : bounds[i + 1]], a[bounds[i] : bounds[i + 1]], out=out[i])
        return out
    out = g.new_zeros(num, g.shape[1], a.shape[1])
    g_pad = torch.cat([g, g.new_zeros(1, g.shape[1])])
    a_pad = torch.cat([a, a.new_zeros(1, a.shape[1])])
    for sel, index in buckets:
        out[sel] = torch.bmm(g_pad[index].transpose(1, 2), a_pad[index])
    return out


def _linear_chain(seq: nn.Sequential, x: torch.Tensor, prefix: str,
                  sites: list[tuple[str, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``seq(x)`` (Linear and ReLU layers), recording each Linear's (name, input, output)."""
    for i, m in enumerate(seq):
        if isinstance(m, nn.Linear):
            z = F.linear(x, m.weight.detach(), None if m.bias is None else m.bias.detach())
            sites.append((f"{prefix}.{i}", x, z))
            x = z
        else:
            x = torch.relu(x)
    return x


def _table_reads(model: PCVRModel, batch_ids: dict[str, torch.Tensor], bags: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 lengths: dict[str, torch.Tensor], grads: Sequence[torch.Tensor], phone: torch.Tensor,
                 pooling: str) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Per table parameter: (phone, row id, gradient) of every read, in position order."""
    emb = model.embeddings
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for f, g in zip(emb.embedded, grads, strict=True):
        if f.name == USER_KEY:
            continue
        name = model.table_name(f.name)
        if not f.is_bag:
            out.setdefault(name, []).append((phone, batch_ids[f.name], g))
            continue
        values, _ = bags[f.name]
        n = lengths[f.name]
        scale = n.to(g.dtype).unsqueeze(1)
        g_mean = g if pooling == "mean" else g * (scale if pooling == "sum" else scale.sqrt())
        per_bag = g_mean / n.clamp(min=1).unsqueeze(1).to(g.dtype)
        bag_of = torch.repeat_interleave(torch.arange(n.shape[0]), n, output_size=values.shape[0])
        out.setdefault(name, []).append((phone[bag_of], values, per_bag[bag_of]))
    return out


def client_updates(model: PCVRModel, tasks: Sequence[ClientTask], data: Examples,
                   offsets: np.ndarray) -> list[tuple[Update, dict[str, torch.Tensor]]]:
    """Train the phones of ``tasks`` (one round, one model version, same settings; each
    with :func:`one_step` data) on ``data``, phone ``i``'s rows at
    ``offsets[i]:offsets[i + 1]``; returns each phone's (update, new local state), as
    :func:`adfed.fl.client.client_update` would for each.

    ``model`` is a scratch model (``user_rows=1``) the caller owns; its shared
    parameters are overwritten. Runs single-threaded, like ``client_update``.

    Raises
    ------
    ValueError : the tasks disagree on version or settings, a phone does not run exactly
        one step, or :func:`unsupported` names a reason.
    TrainingError : a phone's loss is not finite (as :func:`~adfed.fl.client.client_update`).
    """
    if not tasks:
        return []
    first = tasks[0]
    s = first.settings
    reason = unsupported(s, model)
    if reason is not None:
        raise ValueError(f"batched client training cannot run this round: {reason}")
    if any(t.version != first.version or t.settings != s for t in tasks):
        raise ValueError("batched client training needs one model version and one settings per call")
    counts = np.diff(np.asarray(offsets, dtype=np.int64))
    if len(counts) != len(tasks) or not all(one_step(int(c), s) for c in counts):
        raise ValueError(f"every phone must have 1..{s.batch_size} rows (one local step); got {counts.tolist()}")
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        out: list[tuple[Update, dict[str, torch.Tensor]]] = []
        for lo in range(0, len(tasks), CHUNK_PHONES):
            hi = min(lo + CHUNK_PHONES, len(tasks))
            part = data.slice(int(offsets[lo]), int(offsets[hi]))
            out.extend(_chunk(model, tasks[lo:hi], part, np.asarray(offsets[lo:hi + 1]) - int(offsets[lo])))
        return out
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


def _load_shared_inplace(model: PCVRModel, tasks: Sequence[ClientTask]) -> None:
    """The round's dense_shared tensors and every phone's sparse rows into ``model``
    (rows of one table are the same server rows whichever phone received them)."""
    set_dense_inplace(model, tasks[0].dense, check=not tasks[0].checked)
    for table in sparse_tables(model):
        ids = [t.rows[table].ids for t in tasks if table in t.rows and len(t.rows[table].ids)]
        if not ids:
            continue
        values = [t.rows[table].values for t in tasks if table in t.rows and len(t.rows[table].ids)]
        all_ids = torch.cat(ids)
        uniq, first = np.unique(all_ids.numpy(), return_index=True)
        set_rows_inplace(model, table, torch.from_numpy(uniq), torch.cat(values)[torch.from_numpy(first)],
                         check=not all(t.checked for t in tasks))


def _chunk(model: PCVRModel, tasks: Sequence[ClientTask], data: Examples,
           offsets: np.ndarray) -> list[tuple[Update, dict[str, torch.Tensor]]]:
    s = tasks[0].settings
    num = len(tasks)
    _load_shared_inplace(model, tasks)
    params = parameters(model)
    emb = model.embeddings
    counts_np = np.diff(offsets)
    counts = torch.from_numpy(counts_np)
    phone = torch.repeat_interleave(torch.arange(num), counts)
    has_user = any(f.name == USER_KEY for f in emb.embedded)
    user_name = model.table_name(USER_KEY) if has_user else None
    local_names = group_names(model, ParamGroup.LOCAL)

    def local_of(t: ClientTask, name: str) -> torch.Tensor:
        if t.local is not None:
            return t.local[name].reshape(-1)
        return params[name].new_zeros(params[name].shape[1])

    user_rows = torch.stack([local_of(t, user_name) for t in tasks]) if user_name else None
    bias_rows = torch.stack([local_of(t, _USER_BIAS) for t in tasks]) if model.user_bias is not None else None

    if USER_KEY in data.ids:
        data = dataclasses.replace(data, ids={**data.ids, USER_KEY: np.zeros(len(data), np.int64)})
    batch = data.to_batch()
    if not model.training:
        model.train()
    with torch.no_grad():
        pooled, scalars = emb(batch)
    leaves = [p.detach().requires_grad_() for p in pooled]
    if user_rows is not None:
        k = next(i for i, f in enumerate(emb.embedded) if f.name == USER_KEY)
        leaves[k] = user_rows[phone].requires_grad_()
    x = torch.cat([*leaves, *scalars, model.interaction(leaves)], dim=1)
    sites: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    h = _linear_chain(model.towers.bottom, x, "towers.bottom", sites)
    ctr = _linear_chain(model.towers.ctr, h, "towers.ctr", sites).squeeze(1)
    cvr = _linear_chain(model.towers.cvr, h, "towers.cvr", sites).squeeze(1)
    match_counts = None
    if model.match is not None:
        match_counts = model.match.counts(batch)
        offs = match_counts @ model.match.weight.detach()
        ctr, cvr = ctr + offs[:, 0], cvr + offs[:, 1]
    if bias_rows is not None:
        b = bias_rows[phone]
        ctr, cvr = ctr + b[:, 0], cvr + b[:, 1]

    # each row weighted as in its phone's esmm_loss
    bce = F.binary_cross_entropy_with_logits(ctr, batch.click, reduction="none")
    nll = ctcvr_nll(Output(ctr_logit=ctr, cvr_logit=cvr), batch)
    mask = batch.label_observed.to(nll.dtype)
    observed = _segment_sum(mask, phone, num).clamp(min=1.0)
    per_row = bce / counts.to(bce.dtype)[phone] + s.ctcvr_weight * (nll * mask / observed[phone])
    inputs = [*leaves, *(z for _, _, z in sites), ctr, cvr]
    grads = torch.autograd.grad(per_row.sum(), inputs)
    with torch.no_grad():
        losses = _segment_sum(per_row.detach(), phone, num).tolist()
        for t, value in zip(tasks, losses, strict=True):  # as client_update: stop, never upload NaN
            if not math.isfinite(value):
                ensure_finite(torch.tensor(value), where=f"client {t.client_id}, version {t.version}, step 0")
        g_leaves = grads[: len(leaves)]
        g_sites = grads[len(leaves): len(leaves) + len(sites)]
        g_logits = torch.stack([grads[-2], grads[-1]], dim=1)  # [B, 2]
        return _steps(model, tasks, s, batch, phone, offsets, counts_np, leaves, g_leaves, sites, g_sites,
                      g_logits, match_counts, user_rows, bias_rows, losses, local_names)


def _steps(model: PCVRModel, tasks: Sequence[ClientTask], s: ClientSettings, batch: Batch, phone: torch.Tensor,
           offsets: np.ndarray, counts: np.ndarray, leaves: list[torch.Tensor], g_leaves: Sequence[torch.Tensor],
           sites: list[tuple[str, torch.Tensor, torch.Tensor]], g_sites: Sequence[torch.Tensor],
           g_logits: torch.Tensor, match_counts: torch.Tensor | None, user_rows: torch.Tensor | None,
           bias_rows: torch.Tensor | None, losses: list[float],
           local_names: list[str]) -> list[tuple[Update, dict[str, torch.Tensor]]]:
    """Per-phone gradients from the per-row ones, then each phone's SGD step."""
    num = len(tasks)
    params = parameters(model)
    emb = model.embeddings
    l2 = s.embedding_l2
    dense_grads: dict[str, torch.Tensor] = {}  # name -> [P, *shape]
    buckets = _buckets(offsets)
    for (name, a, _), gz in zip(sites, g_sites, strict=True):
        dense_grads[f"{name}.weight"] = _segment_outer(gz, a, buckets, offsets)
        dense_grads[f"{name}.bias"] = _segment_sum(gz, phone, num)
    if match_counts is not None:
        dense_grads["match.weight"] = _segment_outer(g_logits, match_counts, buckets, offsets).transpose(1, 2)
    lengths = {f.name: batch.bag_lengths(f.name) for f in emb.embedded if f.is_bag}
    reads = _table_reads(model, batch.ids, batch.bags, lengths, g_leaves, phone, emb.bag_pooling)
    sparse_grads: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # phone, ids, grads
    for name, parts in reads.items():
        who = torch.cat([p for p, _, _ in parts])
        ids = torch.cat([i for _, i, _ in parts]).to(torch.int64)
        g = torch.cat([v for _, _, v in parts])
        nrows, dim = params[name].shape
        key = who * nrows + ids
        if not model.has_sparse_grad(name):
            grad = g.new_zeros(num * nrows, dim).index_add_(0, key, g).view(num, nrows, dim)
            if l2 > 0:
                seen = torch.zeros(num * nrows, dtype=torch.bool)
                seen[key] = True
                grad += 2 * l2 * seen.view(num, nrows, 1).to(g.dtype) * params[name].detach()
            dense_grads[name] = grad
            continue
        uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
        sums = g.new_zeros(len(uniq), dim).index_add_(0, inverse, g)
        owner, row = uniq // nrows, uniq % nrows
        if l2 > 0:
            sums += 2 * l2 * params[name].detach()[row]
        sparse_grads[name] = (owner, row, sums)
    user_grad = bias_grad = None
    if user_rows is not None:
        k = next(i for i, f in enumerate(emb.embedded) if f.name == USER_KEY)
        user_grad = _segment_sum(g_leaves[k], phone, num) + (2 * l2 * user_rows if l2 > 0 else 0)
    if bias_rows is not None:
        bias_grad = _segment_sum(g_logits, phone, num) + (2 * l2 * bias_rows if l2 > 0 else 0)

    def lr_of(name: str) -> float:
        if s.user_lr is not None and name in local_names:
            return s.user_lr
        if model.has_sparse_grad(name):
            return s.sparse_lr
        return s.table_lr if (s.table_lr is not None and model.is_dense_table(name)) else s.lr

    names = list(tasks[0].dense)
    # each phone's dense deltas back to back in the update's order (the wire's), one row
    # of ``block`` per phone: its update is that row (a FlatDense), its upload one buffer
    dtypes = {tasks[0].dense[n].dtype for n in names}
    index = flat_index([(n, tuple(tasks[0].dense[n].shape)) for n in names])
    size = sum(math.prod(shape) for shape, _, _ in index.values())
    block = torch.empty(num, size, dtype=dtypes.pop()) if len(dtypes) == 1 else None
    deltas: dict[str, torch.Tensor] = {}  # name -> every phone's delta [num, *shape]
    for name, (shape, _, start) in index.items():
        theta = tasks[0].dense[name]
        grad_of = dense_grads.get(name)
        if block is None:  # parameters of several dtypes (no such model yet): one tensor each
            deltas[name] = (theta - lr_of(name) * grad_of) - theta if grad_of is not None else \
                theta.new_zeros(num, *shape)
            continue
        delta = deltas[name] = block[:, start : start + math.prod(shape)].view(num, *shape)
        if grad_of is None:
            delta.zero_()
        else:  # (theta - lr * grad) - theta, as the phone computes it
            torch.sub(theta, grad_of.mul_(lr_of(name)), out=delta).sub_(theta)
    dense_of: list[Mapping[str, torch.Tensor]]
    if block is not None:
        rows = block.unbind(0)
        dense_of = [FlatDense(rows[i], index) for i in range(num)]
    else:
        dense_of = [{n: deltas[n][i] for n in names} for i in range(num)]
    sparse_deltas: list[dict[str, SparseRows]] = [{} for _ in tasks]
    for table in sparse_tables(model):
        _sparse_steps(tasks, table, params[table].shape[0], sparse_grads.get(table), lr_of(table), sparse_deltas)
    new_local: dict[str, torch.Tensor] = {}
    if user_rows is not None and user_grad is not None:
        name = model.table_name(USER_KEY)
        new_local[name] = user_rows - lr_of(name) * user_grad
    if bias_rows is not None and bias_grad is not None:
        new_local[_USER_BIAS] = bias_rows - lr_of(_USER_BIAS) * bias_grad
    local_rows = {n: new_local[n].split(1) for n in local_names}
    out = []
    for i, task in enumerate(tasks):
        update = Update(client_id=task.client_id, dense=dense_of[i], sparse=sparse_deltas[i],
                        num_examples=int(counts[i]), base_version=task.version, metrics={"loss": losses[i]})
        out.append((update, {n: local_rows[n][i].clone() for n in local_names}))
    return out


def _sparse_steps(tasks: Sequence[ClientTask], table: str, nrows: int,
                  grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, lr: float,
                  out: list[dict[str, SparseRows]]) -> None:
    """Each phone's SGD step on its served rows of ``table`` into ``out[i][table]``, for
    all phones at once: the served rows back to back (phones in order, ids sorted within
    a phone), keyed ``phone * nrows + id`` like ``grads`` (owner, row, summed gradient;
    sorted by that key). The deltas are views of one tensor."""
    present = [i for i, t in enumerate(tasks) if table in t.rows and len(t.rows[table].ids)]
    if not present:
        return
    served = [tasks[i].rows[table] for i in present]
    sizes = [len(r.ids) for r in served]
    values = torch.cat([r.values for r in served])
    grad = torch.zeros_like(values)
    if grads is not None:
        owner, rows, sums = grads
        keys = torch.repeat_interleave(torch.tensor(present) * nrows, torch.tensor(sizes), output_size=len(values))
        keys += torch.cat([r.ids for r in served])
        grad[torch.searchsorted(keys, owner * nrows + rows)] = sums
    pieces = ((values - lr * grad) - values).split(sizes)
    for i, r, piece in zip(present, served, pieces, strict=True):
        out[i][table] = SparseRows(r.ids, piece)
