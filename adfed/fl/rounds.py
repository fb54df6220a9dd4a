"""One synchronous round as explicit steps: select, configure, train, upload, close, aggregate.

Each step is a small function so that the HTTP service can run the same sequence with
real devices; :func:`run_sync_round` chains them for the simulation. The server state is
never mutated: :func:`apply_updates` returns a new one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from adfed.config import Config
from adfed.fl import devices, strategies
from adfed.fl.backends import Backend, ClientResult, Job, RoundModel
from adfed.fl.population import LocalStore, Population
from adfed.fl.types import ClientSettings, GlobalState, SparseRows, Update
from adfed.fl.window import WindowState, close_round, next_state
from adfed.model.groups import lr_decay_factor


@dataclasses.dataclass(frozen=True)
class ServerState:
    """Everything the server carries from round to round."""

    model: GlobalState
    opt_state: dict[str, Any]
    window: WindowState
    round: int = 0
    sim_time_s: float = 0.0


def client_settings(cfg: Config, done: int = 0) -> ClientSettings:
    """The local-training settings the server pushes to clients once ``done`` rounds (sync)
    or server steps (async) are complete: the phones' learning rates scaled by
    ``lr_decay_factor(done, fl.lr_decay_start)``."""
    mu = cfg.fl.prox_mu if cfg.fl.strategy in strategies.PROXIMAL else 0.0
    f = lr_decay_factor(done, cfg.fl.lr_decay_start)
    return ClientSettings(epochs=cfg.fl.local_epochs, batch_size=cfg.fl.local_batch_size,
                          lr=cfg.fl.local_lr * f, sparse_lr=cfg.fl.local_sparse_lr * f, prox_mu=mu,
                          optimizer=cfg.fl.local_optimizer, embedding_l2=cfg.train.embedding_l2,
                          table_lr=cfg.fl.local_table_lr * f)


def select(population: Population, cfg: Config, rng: np.random.Generator) -> np.ndarray:
    """Uniform sample of online clients with over-selection (target × factor)."""
    # rounded first: 100 x 1.1 is 110.00000000000001 in floats, which ceil makes 111
    k = math.ceil(round(cfg.fl.clients_per_round * cfg.fl.over_selection, 9))
    return population.sample(k, rng)


def configure(state: ServerState, cfg: Config) -> RoundModel:
    return RoundModel(version=state.model.version, dense=state.model.dense,
                      tables=state.model.sparse, settings=client_settings(cfg, state.round))


def jobs_for(clients: np.ndarray, store: LocalStore, seed_prefix: tuple[int, ...]) -> list[Job]:
    return [Job(client_id=int(c), local=store.get(int(c)), seed=(*seed_prefix, int(c))) for c in clients]


def apply_updates(
    state: ServerState,
    updates: Sequence[Update],
    weights: np.ndarray,
    server_opt: strategies.ServerOptimizer,
    sparse_over: str,
) -> ServerState:
    """New server state after aggregating ``updates`` with ``weights`` (pure).

    ``sparse_over`` is ``fl.sparse_aggregation`` (see :func:`strategies.aggregate_sparse`).
    """
    g = state.model
    delta = strategies.weighted_mean([u.dense for u in updates], weights)
    dense, opt_state = server_opt.apply(g.dense, delta, state.opt_state)
    tables = dict(g.sparse)
    for name, table in g.sparse.items():
        parts = [u.sparse.get(name, SparseRows(torch.zeros(0, dtype=torch.int64),
                                               torch.zeros(0, table.shape[1]))) for u in updates]
        mean = strategies.aggregate_sparse(parts, weights, sparse_over)
        if len(mean.ids):
            new = table.clone()
            new.index_add_(0, mean.ids, mean.values.to(table.dtype))
            tables[name] = new
    model = GlobalState(dense=dense, sparse=tables, version=g.version + 1)
    return dataclasses.replace(state, model=model, opt_state=opt_state)


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What happened to the clients selected in one attempt at a round."""

    selected: np.ndarray
    results: list[ClientResult]  # trained (non-failed) clients, in selection order
    completion_s: np.ndarray  # per trained client
    accepted: np.ndarray  # bool per trained client: aggregated
    failed: int
    end_s: float


def attempt_round(
    state: ServerState, cfg: Config, population: Population, backend: Backend,
    store: LocalStore, rng: np.random.Generator, seed_prefix: tuple[int, ...],
) -> Attempt:
    """Select, train, time and close one attempt at a round (no aggregation)."""
    selected = select(population, cfg, rng)
    failed = devices.failures(population.profiles, selected, rng)
    trained = selected[~failed]
    results = backend.map(configure(state, cfg), jobs_for(trained, store, seed_prefix))
    completion = devices.round_trip_s(
        population.profiles, trained,
        bytes_down=np.array([r.bytes_down for r in results], dtype=np.float64),
        bytes_up=np.array([r.bytes_up for r in results], dtype=np.float64),
        examples=np.array([r.update.num_examples * cfg.fl.local_epochs for r in results], dtype=np.float64),
    )
    on_time, end = close_round(cfg.window, state.window, completion)
    # Over-selection: the round takes the first `clients_per_round` arrivals.
    order = np.argsort(completion, kind="stable")
    accepted = np.zeros(len(trained), dtype=bool)
    take = [i for i in order if on_time[i]][: cfg.fl.clients_per_round]
    accepted[take] = True
    if len(take) == cfg.fl.clients_per_round and len(take) < len(trained):
        end = float(completion[take[-1]])
    return Attempt(selected=selected, results=results, completion_s=completion, accepted=accepted,
                   failed=int(failed.sum()), end_s=end)


def run_sync_round(
    state: ServerState, cfg: Config, population: Population, backend: Backend,
    store: LocalStore, server_opt: strategies.ServerOptimizer,
) -> tuple[ServerState, dict[str, Any]]:
    """One sync round with retries; returns the new state and the round's CSV row.

    ``store`` (the phones' local storage) is updated in place for every client that
    finished training, on time or late: their phone keeps its new local state.
    """
    rnd = state.round + 1
    sim_start = state.sim_time_s
    row: dict[str, Any] = {"round": rnd, "deadline_s": state.window.deadline_s}
    # discarded: on time, but in an attempt that was retried (too few arrivals)
    totals = {"selected": 0, "arrived": 0, "late": 0, "failed": 0, "discarded": 0, "retries": 0}
    window = state.window
    for attempt in range(cfg.window.max_retries + 1):
        rng = np.random.default_rng([cfg.seed, rnd, attempt, 0x5EC])
        att = attempt_round(dataclasses.replace(state, window=window), cfg, population, backend,
                            store, rng, (cfg.seed, rnd, attempt))
        for res in att.results:
            store.put_inplace(res.update.client_id, res.local)
        state = dataclasses.replace(state, sim_time_s=state.sim_time_s + att.end_s)
        window = next_state(cfg.window, window, att.completion_s)
        totals["selected"] += len(att.selected)
        totals["failed"] += att.failed
        totals["late"] += int((~att.accepted).sum())
        accepted = [r for r, ok in zip(att.results, att.accepted, strict=True) if ok]
        if len(accepted) >= cfg.window.min_clients:
            updates = [r.update for r in accepted]
            weights = strategies.client_weights(updates, cfg.fl.max_weight)
            if weights.sum() > 0:
                state = apply_updates(state, updates, weights, server_opt, cfg.fl.sparse_aggregation)
            totals["arrived"] = len(accepted)
            row.update(_byte_stats(accepted))
            row["train_loss"] = float(np.mean([u.metrics["loss"] for u in updates]))
            break
        totals["discarded"] += len(accepted)
        totals["retries"] += 1
    row.update(totals)
    row["round_sim_s"] = state.sim_time_s - sim_start
    row["sim_time_s"] = state.sim_time_s
    return dataclasses.replace(state, window=window, round=rnd), row


def _byte_stats(results: Sequence[ClientResult]) -> dict[str, float]:
    return {
        "bytes_up": float(np.mean([r.bytes_up for r in results])),
        "bytes_down": float(np.mean([r.bytes_down for r in results])),
        "bytes_up_dense": float(np.mean([r.bytes_up_dense for r in results])),
        "bytes_up_sparse": float(np.mean([r.bytes_up_sparse for r in results])),
    }
