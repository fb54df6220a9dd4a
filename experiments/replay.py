"""Is federated training's gap the federation or the optimizer? (federated engine issue)

With one full-batch local SGD step per phone (the defaults: ``fl.local_epochs = 1``, every
phone's rows in one batch of ``fl.local_batch_size``) and server lr 1, a FedAvg round is
exactly one SGD step on the round's users: the weighted mean of the phones' deltas is the
gradient of ``sum_u (w_u / W) * L_u`` (``w_u = min(n_u, fl.max_weight)``, ``L_u`` the ESMM
loss of user u's rows, its CTCVR term averaged over u's observed rows), the small dense
tables at ``local_table_lr`` and the big tables' rows at ``local_sparse_lr`` (averaged
over all phones, untouched rows counting zero, ``fl.sparse_aggregation = "all"``); each
phone's own ``local`` rows step on its own ``L_u``, from zero. :func:`fedavg_loss` and
the rescaled local-row gradients replay exactly that (tested against the engine's round).
The model starts as the federated one does (heads at the base rates of the same 1,000
sampled phones when ``model.output_bias`` says so).

This experiment replays that arithmetic centrally, with no federation at all: one pass
over the training rows in batches of ``fl.clients_per_round`` whole users (a fresh
permutation of the users, so every user is in exactly one batch), three times: SGD at
FedAvg's steps (``sgd``), SGD with the tables at the towers' step (``sgd_one_lr``, FedAvg
before ``fl.local_table_lr``), and Adam at ``train.lr`` on the same objective (``adam``),
evaluating each every ``fl.eval_every`` steps. What differs from the engine is then the
federation alone: which users a round gets (sampling with over-selection, the window,
drop-outs, users twice or never) and nothing else. With several local steps
(``local_epochs > 1`` or a user with more rows than ``local_batch_size``) the replay is
exact only to first order; ``results.json`` says which (``exact``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adfed.config import Config
from adfed.data.examples import Batch, Examples
from adfed.data.schema import USER_KEY, ParamGroup
from adfed.data.store import Dataset
from adfed.evaluation import Split, evaluate
from adfed.fl.population import Population
from adfed.fl.simulation import prior_sample
from adfed.model.groups import group_names, make_optimizers
from adfed.model.pcvr import Output, PCVRModel, ctcvr_nll, ensure_finite, set_output_priors_
from adfed.model.sparse_adam import RowSparseAdam
from adfed.trainer import lr_decay, model_from_config, pooled_split
from experiments import plotting


def user_batches(user_ids: np.ndarray, users_per_batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of batches of whole users: users in a random order, ``users_per_batch``
    at a time. ``user_ids`` [n] must be grouped (all rows of a user adjacent)."""
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]]) if len(user_ids) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(user_ids)]
    order = rng.permutation(len(starts))
    return [np.concatenate([np.arange(starts[u], ends[u]) for u in order[k:k + users_per_batch]])
            for k in range(0, len(order), users_per_batch)]


def fedavg_loss(out: Output, batch: Batch, share: np.ndarray, user_of_row: np.ndarray,
                obs: np.ndarray) -> torch.Tensor:
    """``sum_u share_u * esmm_loss(user u's rows)``: the loss whose gradient is FedAvg's
    weighted mean of the phones' gradients (``share_u = w_u / W``).

    Parameters
    ----------
    share : float [U], each user's aggregation share.
    user_of_row : int [B], each row's user as an index into ``share``.
    obs : bool [B], ``label_observed``.
    """
    counts = np.bincount(user_of_row, minlength=len(share))
    observed = np.bincount(user_of_row, weights=obs, minlength=len(share))
    ctr_w = share[user_of_row] / counts[user_of_row]
    ctcvr_w = np.where(obs, share[user_of_row] / np.maximum(observed[user_of_row], 1.0), 0.0)
    ctr = F.binary_cross_entropy_with_logits(out.ctr_logit, batch.click, reduction="none")
    return (ctr * torch.from_numpy(ctr_w.astype(np.float32))).sum() + \
        (ctcvr_nll(out, batch) * torch.from_numpy(ctcvr_w.astype(np.float32))).sum()


def scale_local_rows_(model: PCVRModel, users: np.ndarray, factor: np.ndarray) -> None:
    """Multiply the ``local`` tables' gradient rows of ``users`` by ``factor`` (``1 / share``):
    a phone steps its own rows on its own loss, not on its share of the round's."""
    params = dict(model.named_parameters())
    scale = torch.ones(max(int(users.max()) + 1, 1) if len(users) else 1, dtype=torch.float32)
    scale[torch.from_numpy(users)] = torch.from_numpy(factor.astype(np.float32))
    for name in group_names(model, ParamGroup.LOCAL):
        grad = params[name].grad
        if grad is None:
            continue
        if grad.is_sparse:
            grad = grad.coalesce()
            grad.values().mul_(scale[grad.indices()[0]].unsqueeze(1))  # a view of the coalesced values
            params[name].grad = grad
        else:
            grad[: len(scale)] *= scale.unsqueeze(1)


def replay_step(model: PCVRModel, optimizers: list[torch.optim.Optimizer], part: Examples, max_weight: float,
                *, where: str = "replay step") -> float:
    """One FedAvg round over the users of ``part`` (all their training rows), as one
    centralized step: :func:`fedavg_loss`, the local rows' gradients rescaled, then every
    optimizer's step. Returns the loss."""
    users, user_of_row, counts = np.unique(part.ids[USER_KEY], return_inverse=True, return_counts=True)
    weights = np.minimum(counts, max_weight).astype(np.float64)  # server.server_weights
    share = weights / weights.sum()
    batch = part.to_batch()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss = fedavg_loss(model(batch), batch, share, user_of_row, part.labels["label_observed"].astype(bool))
    ensure_finite(loss, where=where).backward()
    scale_local_rows_(model, users.astype(np.int64), 1.0 / share)
    for opt in optimizers:
        opt.step()
    return float(loss.detach())


def federated_start(cfg: Config, dataset: Dataset) -> PCVRModel:
    """The model a federated run starts from: base rates from the same sampled phones,
    ``local`` rows at zero (a phone starts its own at zero)."""
    model = model_from_config(cfg, dataset)
    if cfg.model.starts_at_base_rates("federated"):
        population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
        set_output_priors_(model, population.label_counts(prior_sample(population, cfg.seed)),
                           cfg.model.base_rate_heads("federated"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in group_names(model, ParamGroup.LOCAL):
            params[name].zero_()
    return model


def one_pass(cfg: Config, dataset: Dataset, split: Split, test: Examples, optimizer: str,
             lr: float, table_lr: float | None = None, sparse_lr: float | None = None,
             local_lr: float | None = None) -> list[dict[str, Any]]:
    """Train one pass over ``split.train`` in user batches on :func:`fedavg_loss` with
    ``optimizer`` ("sgd" | "adam") at ``lr`` (the small dense tables at ``table_lr``, the big
    tables' rows at ``sparse_lr``, the ``local`` rows at ``local_lr`` when given; the phones'
    lr schedule ``fl.lr_decay_start`` per step), scoring ``test``; returns one row per
    evaluation: ``step``, ``users``, ``auc``, ``auc_expected``."""
    model = federated_start(cfg, dataset)
    sparse = "sgd" if optimizer == "sgd" else "sparse_adam"
    optimizers = make_optimizers(model, lr=lr, dense_opt=optimizer, sparse_opt=sparse,  # type: ignore[arg-type]
                                 table_lr=table_lr, sparse_lr=sparse_lr, local_lr=local_lr)
    per = cfg.fl.clients_per_round
    batches = user_batches(split.train.ids[USER_KEY], per, np.random.default_rng([cfg.seed, 0x5E9]))
    rows = run_pass(model, optimizers, cfg, split, test, batches)
    return [{**r, "users": min(r["step"] * per, len(batches) * per)} for r in rows]


def run_pass(model: PCVRModel, optimizers: list[torch.optim.Optimizer], cfg: Config, split: Split,
             test: Examples, batches: list[np.ndarray]) -> list[dict[str, Any]]:
    """:func:`replay_step` on each batch of training rows with the phones' lr schedule
    (``fl.lr_decay_start``), scoring ``test`` every ``fl.eval_every`` steps and at the
    end; one row per evaluation: ``step``, ``auc``, ``auc_expected``."""
    schedules = lr_decay(optimizers, cfg.fl.lr_decay_start)
    rows: list[dict[str, Any]] = []
    model.train()
    for step, rows_of_batch in enumerate(batches, start=1):
        replay_step(model, optimizers, split.train.take(rows_of_batch), cfg.fl.max_weight, where=f"replay step {step}")
        for schedule in schedules:
            schedule.step()
        if step % cfg.fl.eval_every == 0 or step == len(batches):
            m = evaluate(model, test)
            rows.append({"step": step, "auc": m["auc"], "auc_expected": m.get("auc_expected")})
            model.train()
    return rows


def analyse(base: Config, dataset: Dataset, progress: Any) -> dict[str, Any]:
    """The three curves (module docstring) and each one's best and last evaluation."""
    fl = base.fl
    step = fl.local_epochs * fedavg_server_lr(base)
    sgd_lr, table_lr, sparse_lr = fl.local_lr * step, fl.local_table_lr * step, fl.local_sparse_lr * step
    local_lr = (fl.local_user_lr or fl.local_sparse_lr) * fl.local_epochs  # a phone's own rows are never averaged
    split, test = pooled_split(base, dataset)
    most = int(np.bincount(split.train.ids[USER_KEY].astype(np.int64)).max()) if len(split.train) else 0
    curves: dict[str, dict[str, Any]] = {}
    for name, opt, lr, tlr, slr in (("sgd", "sgd", sgd_lr, table_lr, sparse_lr),
                                    ("sgd_one_lr", "sgd", sgd_lr, None, sparse_lr),
                                    ("adam", "adam", base.train.lr, None, None)):
        progress(f"replay: one pass with {name} (lr {lr:g}), {fl.clients_per_round} users per step")
        curves[name] = {"lr": lr, "table_lr": lr if tlr is None else tlr, "sparse_lr": lr if slr is None else slr,
                        "rows": one_pass(base, dataset, split, test, opt, lr, tlr, slr,
                                         local_lr if opt == "sgd" else None)}
    key = "auc_expected" if curves["sgd"]["rows"][-1]["auc_expected"] is not None else "auc"
    return {
        "users_per_step": fl.clients_per_round,
        "steps": curves["sgd"]["rows"][-1]["step"],
        "compare_by": key,
        # one local step per phone: the sgd curve is FedAvg's rounds exactly, federation aside
        "exact": fl.local_epochs == 1 and most <= fl.local_batch_size,
        **{name: {"lr": c["lr"], "table_lr": c["table_lr"], "sparse_lr": c["sparse_lr"], "final": c["rows"][-1],
                  "best": max(c["rows"], key=lambda r: r[key]), "curve": c["rows"]} for name, c in curves.items()},
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """AUC (expected when the dataset has truth) vs step for both optimizers, as a PNG."""
    key = results["compare_by"]
    fig, ax = plotting.new_axes()
    for name in ("sgd", "sgd_one_lr", "adam"):
        rows, c = results[name]["curve"], results[name]
        tables = "" if c["table_lr"] == c["lr"] else f", tables {c['table_lr']:g}"
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", ms=3,
                label=f"{name} (lr {c['lr']:g}{tables})")
    ax.set_xlabel(f"step ({results['users_per_step']} whole users per batch)")
    ax.set_ylabel(f"test CVR {key.replace('_', ' ')}")
    plotting.save(fig, ax, path, "experiment replay: one pass, no federation")


# -- the parts: which parameters need which optimizer (experiment replay_parts) -----------

PARTS = ("towers", "tables", "rows", "local")
#: the diagnosis variants: each part Adam at ``train.lr`` where named, FedAvg's SGD step otherwise
VARIANTS: dict[str, tuple[str, ...]] = {
    "sgd": (),
    "adam_towers": ("towers",),
    "adam_tables": ("tables",),
    "adam_rows": ("rows",),
    "adam_shared": ("towers", "tables", "rows"),
}


def part_of(model: PCVRModel, name: str, local: set[str]) -> str:
    """``towers`` (every dense parameter but the small tables), ``tables`` (the small dense
    embedding tables), ``rows`` (the big tables' rows) or ``local`` (a phone's own rows)."""
    if name in local:
        return "local"
    if model.has_sparse_grad(name):
        return "rows"
    return "tables" if model.is_dense_table(name) else "towers"


def fedavg_server_lr(cfg: Config) -> float:
    """FedAvg's server step in the replay: the run's server lr under fedavg / fedprox; under an
    adaptive strategy 1 (the replay's SGD parts are FedAvg's arithmetic, as the parts outside
    ``fl.server_adaptive_scope`` step in the engine)."""
    return cfg.fl.server_lr_for() if cfg.fl.strategy in ("fedavg", "fedprox") else 1.0


def part_optimizers(model: PCVRModel, cfg: Config, adam: tuple[str, ...]) -> list[torch.optim.Optimizer]:
    """One optimizer per part: Adam at ``train.lr`` (lazy row Adam for sparse parts) for
    the parts in ``adam``, otherwise SGD at FedAvg's step for that part (``fl.local_lr``,
    ``fl.local_table_lr``, ``fl.local_sparse_lr``; a phone's own rows at
    ``fl.local_user_lr`` or else ``fl.local_sparse_lr``), times :func:`fedavg_server_lr`."""
    fl, step = cfg.fl, fedavg_server_lr(cfg)
    sgd = {"towers": fl.local_lr * step, "tables": fl.local_table_lr * step,
           "rows": fl.local_sparse_lr * step, "local": fl.local_user_lr or fl.local_sparse_lr}
    local = set(group_names(model, ParamGroup.LOCAL))
    params: dict[str, list[torch.nn.Parameter]] = {p: [] for p in PARTS}
    for name, p in model.named_parameters():
        params[part_of(model, name, local)].append(p)
    optimizers: list[torch.optim.Optimizer] = []
    for part, ps in params.items():
        if not ps:
            continue
        if part not in adam:
            optimizers.append(torch.optim.SGD(ps, lr=sgd[part]))
        elif part in ("rows", "local"):
            optimizers.append(RowSparseAdam([{"params": ps}], lr=cfg.train.lr))
        else:
            optimizers.append(torch.optim.Adam(ps, lr=cfg.train.lr))
    return optimizers


def redrawn_batches(user_ids: np.ndarray, users_per_batch: int, steps: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of ``steps`` batches, each ``users_per_batch`` users drawn uniformly
    (without replacement within a batch, with it across batches, as the engine samples
    its rounds): a user may come back with the rows it trained before."""
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]]) if len(user_ids) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(user_ids)]
    k = min(users_per_batch, len(starts))
    return [np.concatenate([np.arange(starts[u], ends[u]) for u in np.sort(rng.choice(len(starts), k, replace=False))])
            for _ in range(steps)]


def parts_pass(cfg: Config, dataset: Dataset, split: Split, test: Examples, adam: tuple[str, ...],
               sampling: str) -> list[dict[str, Any]]:
    """One pass of :func:`replay_step` with :func:`part_optimizers` and the phones' lr
    schedule (``fl.lr_decay_start``), over batches of whole users drawn ``once`` (every user
    exactly once) or ``redraw`` (:func:`redrawn_batches`, as many batches)."""
    model = federated_start(cfg, dataset)
    per = cfg.fl.clients_per_round
    user_ids = split.train.ids[USER_KEY]
    batches = user_batches(user_ids, per, np.random.default_rng([cfg.seed, 0x5E9]))
    if sampling == "redraw":
        batches = redrawn_batches(user_ids, per, len(batches), np.random.default_rng([cfg.seed, 0x5E9, 1]))
    return run_pass(model, part_optimizers(model, cfg, adam), cfg, split, test, batches)


def analyse_parts(base: Config, dataset: Dataset, progress: Any) -> dict[str, Any]:
    """Every :data:`VARIANTS` curve with users drawn once and redrawn: which part's
    optimizer the gap to centralized training is in, and whether it survives the engine's
    sampling (docs/results/2026-12-06-federated-quality.md)."""
    split, test = pooled_split(base, dataset)
    curves: dict[str, Any] = {}
    for sampling in ("once", "redraw"):
        for name, adam in VARIANTS.items():
            progress(f"replay_parts: {name} ({sampling}), {base.fl.clients_per_round} users per step")
            rows = parts_pass(base, dataset, split, test, adam, sampling)
            curves[f"{name}/{sampling}"] = {"adam": list(adam), "sampling": sampling, "final": rows[-1], "curve": rows}
    key = "auc_expected" if curves["sgd/once"]["final"]["auc_expected"] is not None else "auc"
    return {"users_per_step": base.fl.clients_per_round, "compare_by": key, "adam_lr": base.train.lr,
            "lr_decay_start": base.fl.lr_decay_start, "local_user_lr": base.fl.local_user_lr or base.fl.local_sparse_lr,
            "curves": curves}


def plot_parts(results: dict[str, Any], path: Path) -> None:
    """Each variant's curve, users drawn once (solid) and redrawn (dashed), as a PNG."""
    key = results["compare_by"]
    fig, ax = plotting.new_axes()
    for name, c in results["curves"].items():
        rows = c["curve"]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], ls="-" if c["sampling"] == "once" else "--",
                marker="o", ms=2, label=name)
    ax.set_xlabel(f"step ({results['users_per_step']} whole users per batch)")
    ax.set_ylabel(f"test CVR {key.replace('_', ' ')}")
    plotting.save(fig, ax, path, "experiment replay_parts: Adam per part, users once / redrawn")
