"""Is federated training's gap the federation or the optimizer? (federated engine issue)

With clients of a dozen rows, a federated round is to first order one step on a large
batch made of whole users: FedAvg (local SGD, server lr 1) moves the model by
``local_lr x local_epochs`` times the mean gradient of the round's rows (the small dense
tables by ``local_table_lr x local_epochs``), i.e. SGD; FedAdam with one full-batch local
step is Adam on the same rows. This experiment replays
that arithmetic centrally, with no federation at all: one pass over the training rows
in batches of ``fl.clients_per_round`` whole users (a fresh permutation of the users,
so every user is in one batch), from the same start as a federated run (heads at the
base rates when ``model.output_bias`` says so for federated runs), three times: SGD at
FedAvg's effective steps (``sgd``), SGD with the tables at the towers' step as well
(``sgd_one_lr``, FedAvg before ``fl.local_table_lr``), and Adam at ``train.lr``
(``adam``), evaluating each every ``fl.eval_every`` steps. Each curve is what the matching federated strategy could reach
on this data in one pass, were its rounds exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from adfed.config import Config
from adfed.data.examples import Examples
from adfed.data.schema import USER_KEY
from adfed.data.store import Dataset
from adfed.evaluation import Split, evaluate
from adfed.model.groups import make_optimizers
from adfed.model.pcvr import LabelCounts, ensure_finite, esmm_loss, set_output_priors_
from adfed.trainer import model_from_config, pooled_split
from experiments import plotting


def user_batches(user_ids: np.ndarray, users_per_batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of batches of whole users: users in a random order, ``users_per_batch``
    at a time. ``user_ids`` [n] must be grouped (all rows of a user adjacent)."""
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]]) if len(user_ids) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(user_ids)]
    order = rng.permutation(len(starts))
    return [np.concatenate([np.arange(starts[u], ends[u]) for u in order[k:k + users_per_batch]])
            for k in range(0, len(order), users_per_batch)]


def one_pass(cfg: Config, dataset: Dataset, split: Split, test: Examples, optimizer: str,
             lr: float, table_lr: float | None = None) -> list[dict[str, Any]]:
    """Train one pass over ``split.train`` in user batches with ``optimizer`` ("sgd" |
    "adam") at ``lr`` (the small dense tables at ``table_lr`` when given), scoring
    ``test``; returns one row per evaluation: ``step``, ``users``, ``auc``,
    ``auc_expected``."""
    model = model_from_config(cfg, dataset)
    if cfg.model.starts_at_base_rates("federated"):
        set_output_priors_(model, LabelCounts.of_labels(split.train.labels))
    sparse = "sgd" if optimizer == "sgd" else "sparse_adam"
    optimizers = make_optimizers(model, lr=lr, dense_opt=optimizer, sparse_opt=sparse,  # type: ignore[arg-type]
                                 table_lr=table_lr)
    per = cfg.fl.clients_per_round
    batches = user_batches(split.train.ids[USER_KEY], per, np.random.default_rng([cfg.seed, 0x5E9]))
    rows: list[dict[str, Any]] = []
    model.train()
    for step, rows_of_batch in enumerate(batches, start=1):
        batch = split.train.take(rows_of_batch).to_batch()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        ensure_finite(esmm_loss(model(batch), batch), where=f"replay step {step}").backward()
        for opt in optimizers:
            opt.step()
        if step % cfg.fl.eval_every == 0 or step == len(batches):
            m = evaluate(model, test)
            rows.append({"step": step, "users": min(step * per, len(batches) * per),
                         "auc": m["auc"], "auc_expected": m.get("auc_expected")})
            model.train()
    return rows


def analyse(base: Config, dataset: Dataset, progress: Any) -> dict[str, Any]:
    """The three curves (module docstring) and each one's best and last evaluation."""
    step = base.fl.local_epochs * base.fl.server_lr
    sgd_lr, table_lr = base.fl.local_lr * step, base.fl.local_table_lr * step
    split, test = pooled_split(base, dataset)
    curves: dict[str, dict[str, Any]] = {}
    for name, opt, lr, tlr in (("sgd", "sgd", sgd_lr, table_lr), ("sgd_one_lr", "sgd", sgd_lr, None),
                               ("adam", "adam", base.train.lr, None)):
        progress(f"replay: one pass with {name} (lr {lr:g}), {base.fl.clients_per_round} users per step")
        curves[name] = {"lr": lr, "table_lr": lr if tlr is None else tlr,
                        "rows": one_pass(base, dataset, split, test, opt, lr, tlr)}
    key = "auc_expected" if curves["sgd"]["rows"][-1]["auc_expected"] is not None else "auc"
    return {
        "users_per_step": base.fl.clients_per_round,
        "steps": curves["sgd"]["rows"][-1]["step"],
        "compare_by": key,
        **{name: {"lr": c["lr"], "table_lr": c["table_lr"], "final": c["rows"][-1], "best": max(c["rows"], key=lambda r: r[key]),
                  "curve": c["rows"]} for name, c in curves.items()},
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
