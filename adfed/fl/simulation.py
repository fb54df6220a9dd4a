"""Federated training driver: rounds (sync or async), evaluation, checkpoints, summary.

``fit_federated`` is what ``Trainer(cfg).fit()`` runs for ``train.mode = "federated"``.
Each round's server state, the phones' local storage and the rows so far are
checkpointed atomically to ``checkpoint_dir/checkpoint.pt`` when a directory is given;
``resume=True`` continues from it to the same final model as an uninterrupted run
(all randomness is derived from (seed, round, client), never from carried RNG state).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adfed.config import Config
from adfed.data.examples import Examples
from adfed.data.schema import ParamGroup
from adfed.data.store import Dataset
from adfed.errors import ConfigError
from adfed.evaluation import evaluate, split_examples, test_users
from adfed.fl import strategies
from adfed.fl.backends import create_backend
from adfed.fl.fedbuff import AsyncState, run_async_step
from adfed.fl.population import LocalStore, Population
from adfed.fl.rounds import ServerState, run_sync_round
from adfed.fl.types import GlobalState
from adfed.fl.window import initial_state
from adfed.model.groups import get_dense, group_names, model_bytes, set_dense_inplace
from adfed.model.pcvr import PCVRModel, set_output_priors_

logger = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


#: Phones asked for their label counts before round 1 (see :func:`prior_sample`).
PRIOR_CLIENTS = 1000


def prior_sample(population: Population, seed: int) -> np.ndarray:
    """The phones whose label counts set the model's starting base rates (sorted ids).

    Before round 1 the server asks up to :data:`PRIOR_CLIENTS` uniformly sampled phones
    for four counts over their training rows (impressions, clicks, clicks with a known
    label, conversions) and sums them: the only label information that leaves a phone
    outside its updates. Simulated directly, not as a round (no time, no failures).
    """
    rng = np.random.default_rng([seed, 0xB1A5])
    k = min(PRIOR_CLIENTS, len(population))
    return np.sort(rng.choice(population.clients, size=k, replace=False))


def initial_server_state(cfg: Config, model: PCVRModel, server_opt: strategies.ServerOptimizer) -> ServerState:
    dense = get_dense(model, ParamGroup.DENSE_SHARED)
    sparse = get_dense(model, ParamGroup.SPARSE_SHARED)
    return ServerState(model=GlobalState(dense=dense, sparse=sparse, version=0),
                       opt_state=server_opt.init(dense), window=initial_state(cfg.window))


def load_global_inplace(model: PCVRModel, state: ServerState, store: LocalStore) -> None:
    """Write the global model and the phones' local rows into a full-size eval model."""
    set_dense_inplace(model, state.model.dense)
    set_dense_inplace(model, state.model.sparse)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in group_names(model, ParamGroup.LOCAL):
            params[name].zero_()
            if store.entries:
                users = torch.tensor(list(store.entries.keys()), dtype=torch.int64)
                rows = torch.cat([e[name] for e in store.entries.values()])
                params[name][users] = rows


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (CHECKPOINT + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path / CHECKPOINT)


def _check_same_model(saved: GlobalState, fresh: GlobalState, ckpt: Path) -> None:
    """ConfigError when the checkpoint's shared parameters (names and shapes) are not the
    ones this config's model has: resuming with other model settings would train a mix."""
    def shapes(g: GlobalState) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for part in (g.dense, g.sparse) for n, t in part.items()}

    old, new = shapes(saved), shapes(fresh)
    if old != new:
        diff = sorted(n for n in old.keys() | new.keys() if old.get(n) != new.get(n))
        raise ConfigError(f"--resume: {ckpt} holds another model (parameters differ: {', '.join(diff)}); "
                          f"resume with the model settings of that run's config.toml (--set model.KEY=...)")


#: settings a resumed run must share with the run that wrote the checkpoint: the server
#: optimizer's state, the async clock and the per-round seeds depend on them.
RESUME_KEYS = ("seed", "fl.strategy", "fl.schedule")


def _resume_settings(cfg: Config) -> dict[str, Any]:
    return {"seed": cfg.seed, "fl.strategy": cfg.fl.strategy, "fl.schedule": cfg.fl.schedule}


def _check_same_settings(saved: dict[str, Any] | None, cfg: Config, ckpt: Path) -> None:
    """ConfigError when the checkpoint was written under another seed, strategy or schedule
    (a FedAvg checkpoint resumed as FedAdam has no moments to continue). Checkpoints from
    before this check carry no settings and are not checked."""
    now = _resume_settings(cfg)
    for key in RESUME_KEYS:
        if saved is not None and key in saved and saved[key] != now[key]:
            raise ConfigError(f"--resume: {ckpt} was written with {key}={saved[key]!r}, not {now[key]!r}; "
                              f"resume with --set {key}={saved[key]!r} or start a new run without --resume")


def _summary(cfg: Config, rows: list[dict[str, Any]], final: dict[str, float], model: PCVRModel,
             wall_s: float, population: Population) -> dict[str, Any]:
    def mean(key: str) -> float:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(vals)) if vals else float("nan")

    return {
        "mode": "federated",
        "schedule": cfg.fl.schedule,
        "strategy": cfg.fl.strategy,
        "backend": cfg.fl.backend,
        "window": cfg.window.kind,
        "rounds": len(rows),
        "seed": cfg.seed,
        "clients_per_round": cfg.fl.clients_per_round,
        "population": len(population),
        **final,
        "bytes_up_per_client": mean("bytes_up"),
        "bytes_down_per_client": mean("bytes_down"),
        "bytes_up_dense_per_client": mean("bytes_up_dense"),
        "bytes_up_sparse_per_client": mean("bytes_up_sparse"),
        "model_bytes": model_bytes(model),
        "sim_time_s": rows[-1]["sim_time_s"] if rows else 0.0,
        "median_round_sim_s": float(np.median([r["round_sim_s"] for r in rows])) if rows else 0.0,
        "dropped_clients": int(sum(r.get("failed", 0) + r.get("late", 0) + r.get("discarded", 0) for r in rows)),
        "failed_clients": int(sum(r.get("failed", 0) for r in rows)),
        "late_clients": int(sum(r.get("late", 0) for r in rows)),
        "discarded_clients": int(sum(r.get("discarded", 0) for r in rows)),
        "wall_time_s": wall_s,
        "simulated_device_profiles": population.profiles.simulated,
    }


def fit_federated(cfg: Config, dataset: Dataset, *, checkpoint_dir: Path | None = None,
                  resume: bool = False, on_step: Any = None) -> Any:
    """Run ``cfg.fl.rounds`` rounds (sync) or server steps (async); see module doc."""
    from adfed.trainer import TrainResult, model_from_config

    population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    if len(population) == 0:
        raise ConfigError(f"data.path {dataset.path} has no client with training rows")
    # The test set is read at the first evaluation, so its cost counts as evaluation
    # (``eval_s``), as benchmarks/bench_fl.py separates it from the simulation.
    @functools.cache
    def test() -> Examples:
        eval_users = test_users(dataset, cfg.data.max_test_users, cfg.seed)
        return split_examples(dataset.load(eval_users), cfg.data.test_fraction).test

    eval_model = model_from_config(cfg, dataset)
    if cfg.model.starts_at_base_rates("federated") and not resume:  # a resume restores the state
        set_output_priors_(eval_model, population.label_counts(prior_sample(population, cfg.seed)))
    server_opt = strategies.create(cfg.fl.strategy, cfg.fl.server_lr, cfg.fl.server_tau)
    state = initial_server_state(cfg, eval_model, server_opt)
    store = LocalStore(capacity=cfg.fl.local_cache)
    async_state = AsyncState()
    rows: list[dict[str, Any]] = []
    wall_before = 0.0
    ckpt = checkpoint_dir / CHECKPOINT if checkpoint_dir else None
    if resume:
        if ckpt is None or not ckpt.exists():
            raise ConfigError(f"--resume: no checkpoint at {ckpt}; run without --resume first")
        saved = torch.load(ckpt, weights_only=False)
        _check_same_settings(saved.get("settings"), cfg, ckpt)
        _check_same_model(saved["state"].model, state.model, ckpt)
        state, rows, async_state = saved["state"], saved["rows"], saved["async"]
        if cfg.fl.rounds < state.round:
            raise ConfigError(f"--resume: {ckpt} is at round {state.round}; fl.rounds ({cfg.fl.rounds}) must be at "
                              f"least that (a resumed run continues to fl.rounds)")
        store.entries.update(saved["local"])
        store.evicted = saved["evicted"]
        wall_before = saved["wall_s"]
    start = time.perf_counter()
    backend = create_backend(cfg.fl.backend, dataset.path, cfg)
    final: dict[str, float] = {}
    try:
        while state.round < cfg.fl.rounds:
            if cfg.fl.schedule == "sync":
                state, row = run_sync_round(state, cfg, population, backend, store, server_opt)
            else:
                state, row = run_async_step(state, async_state, cfg, population, backend, store, server_opt)
            if state.round % cfg.fl.eval_every == 0 or state.round == cfg.fl.rounds:
                t_eval = time.perf_counter()
                load_global_inplace(eval_model, state, store)
                final = evaluate(eval_model, test())
                row.update({k: final[k] for k in ("auc", "ctcvr_auc", "logloss", "auc_expected") if k in final})
                row["eval_s"] = time.perf_counter() - t_eval
            row["wall_time_s"] = wall_before + time.perf_counter() - start
            rows.append(row)
            logger.info("round %d auc %s sim %.1fs", state.round, row.get("auc"), row["sim_time_s"])
            if ckpt is not None:
                _save_checkpoint(ckpt.parent, {"state": state, "rows": rows, "async": async_state,
                                               "local": dict(store.entries), "evicted": store.evicted,
                                               "wall_s": row["wall_time_s"], "settings": _resume_settings(cfg)})
            if on_step:
                on_step(row)
    finally:
        backend.close()
    if not final:  # resumed a finished run: evaluate the restored model
        load_global_inplace(eval_model, state, store)
        final = evaluate(eval_model, test())
    wall = wall_before + time.perf_counter() - start
    summary = _summary(cfg, rows, final, eval_model, wall, population)
    summary["local_state_evictions"] = store.evicted
    return TrainResult(summary=summary, rows=rows, rows_name="rounds.csv", model=eval_model)
