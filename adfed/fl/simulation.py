"""Federated training driver: rounds (sync or async), evaluation, checkpoints, summary.

``fit_federated`` is what ``Trainer(cfg).fit()`` runs for ``train.mode = "federated"``.
It builds the engine's components (population, backend, aggregator, server optimizer,
update pipeline, wire spec) and drives sync rounds (:mod:`adfed.fl.rounds`) or async
steps (:mod:`adfed.fl.fedbuff`). The server state, the phones' local storage and the
rows so far are checkpointed atomically to ``checkpoint_dir/checkpoint.safetensors``
(:mod:`adfed.fl.checkpoint`: no pickle) when a directory is given, at round ends on the
schedule of ``fl.checkpoint_every_s`` and when Ctrl-C stops the run (after the round in
progress: :class:`_StopAtRoundEnd`); ``resume=True`` continues from it to the same final
model as an uninterrupted run (all randomness is derived from (seed, round, client), never
from carried RNG state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from adfed.config import Config
from adfed.data.examples import Examples
from adfed.data.schema import ParamGroup
from adfed.data.store import Dataset
from adfed.errors import ConfigError
from adfed.evaluation import evaluate, split_examples, test_users
from adfed.fl import aggregators, checkpoint, pipeline, strategies
from adfed.fl.backends import Backend, create_backend
from adfed.fl.checkpoint import CHECKPOINT, Checkpoint
from adfed.fl.fedbuff import AsyncState, run_async_step
from adfed.fl.population import LocalStore, Population
from adfed.fl.rounds import Engine, run_sync_round
from adfed.fl.server import ServerState
from adfed.fl.types import GlobalState
from adfed.fl.window import initial_state
from adfed.fl.wire import WireSpec
from adfed.model.assembly import assemble_global_inplace, model_from_config
from adfed.model.groups import get_dense, group_names, model_bytes
from adfed.model.pcvr import PCVRModel, set_output_priors_
from adfed.privacy import accountant as privacy_accountant
from adfed.privacy import setup as privacy_setup
from adfed.privacy.accountant import PrivacyPlan
from adfed.privacy.vocabulary import Vocabulary
from adfed.result import TrainResult

logger = logging.getLogger(__name__)
__all__ = ["CHECKPOINT", "fit_federated", "initial_server_state", "load_global_inplace"]


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


def adaptive_names(cfg: Config, model: PCVRModel) -> frozenset[str] | None:
    """The ``dense_shared`` tensors an adaptive server optimizer steps (None: every shared
    part, ``fl.server_adaptive_scope = "all"``): the towers, less the heads' output biases
    with ``fl.output_bias_step = "average"``; the rest steps as FedAvg."""
    if cfg.fl.server_adaptive_scope == "all":
        return None
    towers = {n for n in get_dense(model, ParamGroup.DENSE_SHARED) if not model.is_dense_table(n)}
    if cfg.fl.output_bias_step == "average":
        towers -= set(model.towers.output_bias_names("towers"))
    return frozenset(towers)


def initial_server_state(cfg: Config, model: PCVRModel, server_opt: strategies.ServerOptimizer) -> ServerState:
    dense = get_dense(model, ParamGroup.DENSE_SHARED)
    sparse = get_dense(model, ParamGroup.SPARSE_SHARED)
    per_tensor = cfg.privacy.dp and cfg.privacy.clip_mode == "per_tensor"
    names = sorted([*dense, *sparse])
    clips = tuple((n, cfg.privacy.clip / len(names) ** 0.5) for n in names) if per_tensor else ()
    return ServerState(model=GlobalState(dense=dense, sparse=sparse, version=0),
                       clip=cfg.privacy.clip if cfg.privacy.dp else 0.0, clips=clips,
                       opt_state=server_opt.init(dense), window=initial_state(cfg.window))


def load_global_inplace(model: PCVRModel, state: ServerState, store: LocalStore) -> None:
    """Write the released global model (``fl.server_ema``: the average) and the phones'
    local rows into a full-size eval model."""
    assemble_global_inplace(model, state.released.dense, state.released.sparse,
                            store.packed(group_names(model, ParamGroup.LOCAL)))


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
#: optimizer's state, the async clock, the per-round seeds and the privacy state depend on
#: them, and the phones' rows on the dataset ("data": a digest of its files)
RESUME_KEYS = ("seed", "fl.strategy", "fl.schedule", "privacy.dp", "data", "fl.server_adaptive_scope",
               "fl.output_bias_step")


def _resume_settings(cfg: Config, dataset: Dataset) -> dict[str, Any]:
    files = json.dumps(dataset.manifest.get("files", {}), sort_keys=True).encode()
    return {"seed": cfg.seed, "fl.strategy": cfg.fl.strategy, "fl.schedule": cfg.fl.schedule,
            "privacy.dp": cfg.privacy.dp, "data": hashlib.sha256(files).hexdigest()[:16],
            # which parts the server's moments cover
            "fl.server_adaptive_scope": cfg.fl.server_adaptive_scope, "fl.output_bias_step": cfg.fl.output_bias_step}


def _check_same_settings(saved: dict[str, Any] | None, cfg: Config, dataset: Dataset, ckpt: Path) -> None:
    """ConfigError when the checkpoint was written under another seed, strategy, schedule,
    privacy setting, dataset or split of what the server steps adaptively (a FedAvg
    checkpoint resumed as FedAdam has no moments to continue). Checkpoints from before a
    key was kept do not carry it and are not checked on it."""
    now = _resume_settings(cfg, dataset)
    for key in RESUME_KEYS:
        if saved is None or key not in saved or saved[key] == now[key]:
            continue
        if key == "data":
            raise ConfigError(f"--resume: {ckpt} was trained on another dataset than data.path {dataset.path} (its "
                              f"files differ); resume with the data.path of that run's config.toml")
        raise ConfigError(f"--resume: {ckpt} was written with {key}={json.dumps(saved[key])}, not "
                          f"{json.dumps(now[key])}; resume with --set {key}={json.dumps(saved[key])} or start a new "
                          f"run (--overwrite)")


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


def build_engine(cfg: Config, dataset: Dataset, population: Population, state: ServerState,
                 backend: Backend, server_opt: strategies.ServerOptimizer, *,
                 plan: PrivacyPlan | None = None, vocabulary: Vocabulary | None = None) -> Engine:
    """The components a run's rounds use, built from ``cfg`` (and, with privacy on, the
    run's plan and vocabulary: :func:`adfed.privacy.setup.setup`)."""
    spec = WireSpec.of(state.model.dense, state.model.sparse)
    ctx = aggregators.BuildContext(spec=spec, population=len(population), plan=plan, vocabulary=vocabulary)
    return Engine(cfg=cfg, population=population, backend=backend, aggregator=aggregators.build(cfg, ctx),
                  server_opt=server_opt, pipeline=pipeline.build(cfg), spec=spec, plan=plan,
                  vocabulary=vocabulary)


def privacy_summary(cfg: Config, plan: PrivacyPlan, rounds: int, state: ServerState,
                    vocabulary: Vocabulary | None, realized: list[float] | None = None) -> dict[str, Any]:
    """``summary.json``'s privacy keys: ε (RDP, the conservative bound reported every
    round) and, for DP-FedAvg, PLD's tighter ε, at δ, with what they assume."""
    out: dict[str, Any] = {
        "mechanism": plan.mechanism, "epsilon": privacy_accountant.epsilon(plan, rounds, realized=realized),
        "delta": plan.delta, "dp_denominator": plan.denominator,
        "accountant": "rdp", "noise_multiplier": plan.noise_multiplier, "sampling_rate": plan.sampling_rate,
        "clip": state.clip, "clip_initial": cfg.privacy.clip, "adaptive_clip": plan.adaptive_clip,
        "clip_mode": cfg.privacy.clip_mode, "clips": dict(state.clips),
        "dp_noise": cfg.privacy.noise, "target_epsilon": cfg.privacy.target_epsilon or None,
        "vocabulary_rows": {t: vocabulary.size(t) for t in vocabulary.rows} if vocabulary else {},
    }
    if plan.mechanism == "dp_fedavg" and plan.noise_multiplier > 0:
        out["epsilon_pld"] = privacy_accountant.epsilon(plan, rounds, accountant="pld", realized=realized)
    return out


def strategy_advice(cfg: Config) -> str | None:
    """A one-line warning when a server Adam (the sync default) runs where it was measured to
    lose to FedAvg: under DP (its noise normalized into full-size steps) and async
    (docs/results/2026-12-06-federated-quality.md, section 7); None otherwise."""
    if cfg.fl.strategy not in ("fedadam", "fedyogi", "fedadagrad"):
        return None
    where = "privacy.dp" if cfg.privacy.dp else "fl.schedule=async" if cfg.fl.schedule == "async" else None
    if where is None:
        return None
    return (f"fl.strategy={cfg.fl.strategy} with {where} was measured below FedAvg (docs/results/"
            "2026-12-06-federated-quality.md, section 7); for FedAvg add --config experiments/configs/fedavg.toml")


def privacy_advice(cfg: Config) -> str | None:
    """A one-line warning when privacy settings do not give what they seem to: a target ε
    or a DP transform without ``privacy.dp``, or DP without noise (ε is infinite); None
    otherwise."""
    p = cfg.privacy
    dp_steps = [t for t in cfg.fl.update_pipeline if t in ("clip", "skellam")]
    if not p.dp and (p.target_epsilon > 0 or dp_steps):
        what = f"privacy.target_epsilon={p.target_epsilon:g}" if p.target_epsilon > 0 else \
            f"fl.update_pipeline {dp_steps}"
        return f"{what} without privacy.dp=true gives no privacy and no accounting; add --set privacy.dp=true"
    if p.dp and p.noise_multiplier == 0 and p.target_epsilon == 0:
        return ("privacy.noise_multiplier=0: DP's clipping and sampling without noise, epsilon is infinite; set "
                "privacy.target_epsilon (or privacy.noise_multiplier) for a private model")
    return None


def _restore(ckpt: Path | None, cfg: Config, dataset: Dataset, fresh: ServerState) -> Checkpoint:
    if ckpt is None or not ckpt.exists():
        if ckpt is not None and (ckpt.parent / "checkpoint.pt").exists():
            raise ConfigError(f"--resume: {ckpt.parent} holds checkpoint.pt, a pickled checkpoint of an older adfed, "
                              f"which is not read (unpickling runs code); start a new run: --overwrite instead of --resume")
        raise ConfigError(f"--resume: no checkpoint at {ckpt}; start the run without --resume (with --overwrite "
                          f"if its directory holds other files)")
    saved = checkpoint.load(ckpt)
    _check_same_settings(saved.settings, cfg, dataset, ckpt)
    _check_same_model(saved.state.model, fresh.model, ckpt)
    if cfg.fl.rounds < saved.state.round:
        raise ConfigError(f"--resume: {ckpt} is at round {saved.state.round}; fl.rounds ({cfg.fl.rounds}) must be "
                          f"at least that (a resumed run continues to fl.rounds)")
    return saved


@contextlib.contextmanager
def _settled_gc() -> Iterator[None]:
    """Everything alive before the rounds (the libraries, the dataset, the model: ~400k
    objects) out of the cyclic collector's sight while they run (``gc.freeze``): each full
    collection would rescan them, 0.1-0.25 s at a time, several times a 1000-phone round
    at 1M users. Unfrozen afterwards, so what became garbage meanwhile is collected."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _StopAtRoundEnd:
    """Ctrl-C during federated training: the first press ends the run after the round (or
    async step) in progress, whose checkpoint is then written, so nothing trained is lost
    and the checkpoint is a round boundary; a second press stops at once (the last written
    checkpoint stays). Installed only in the main thread and only over Python's default
    handler (a process started with SIGINT ignored keeps ignoring it)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> _StopAtRoundEnd:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Ctrl-C: stopping after this round and writing its checkpoint (Ctrl-C again: stop at once)")

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def fit_federated(cfg: Config, dataset: Dataset, *, checkpoint_dir: Path | None = None,
                  resume: bool = False, on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Run ``cfg.fl.rounds`` rounds (sync) or server steps (async); see module doc."""
    population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    if len(population) == 0:
        raise ConfigError(f"data.path {dataset.path} has no client with training rows")
    # The test set is read at the first evaluation, so its cost counts as evaluation
    # (``eval_s``), as benchmarks/bench_fl.py separates it from the simulation.
    @functools.cache
    def test() -> Examples:
        eval_users = test_users(dataset, cfg.data.max_test_users, cfg.seed)
        return split_examples(dataset.load(eval_users), cfg.data.test_fraction).test

    eval_model = model_from_config(cfg, dataset, local_zeros=True)  # its user rows are the phones'
    if cfg.model.starts_at_base_rates("federated") and not resume:  # a resume restores the state
        set_output_priors_(eval_model, population.label_counts(prior_sample(population, cfg.seed)),
                           cfg.model.base_rate_heads("federated"))
    server_opt = strategies.create(cfg.fl.strategy, cfg.fl.server_lr_for(), cfg.fl.server_tau, cfg.fl.server_betas,
                                   cfg.fl.server_bias_correction, adaptive_names(cfg, eval_model))
    plan: PrivacyPlan | None = None
    vocabulary: Vocabulary | None = None
    stopped_at: int | None = None
    realized: list[float] = []  # distributed noise: each round's real noise multiplier
    for advice in (strategy_advice(cfg), privacy_advice(cfg)):
        if advice is not None:
            logger.warning("%s", advice)
    if cfg.privacy.dp:
        cfg, plan, vocabulary = privacy_setup.setup(cfg, dataset, population)
    state = initial_server_state(cfg, eval_model, server_opt)
    store = LocalStore(capacity=cfg.fl.local_cache)
    async_state = AsyncState()
    rows: list[dict[str, Any]] = []
    wall_before = 0.0
    ckpt = checkpoint_dir / CHECKPOINT if checkpoint_dir else None
    if resume:
        saved = _restore(ckpt, cfg, dataset, state)
        state, rows, async_state, wall_before = saved.state, saved.rows, saved.async_state, saved.wall_s
        store = dataclasses.replace(saved.store, capacity=cfg.fl.local_cache)
        realized = [float(r["realized_noise_multiplier"]) for r in rows if "realized_noise_multiplier" in r]
    start = time.perf_counter()
    backend = create_backend(cfg.fl.backend, dataset.path, cfg, population)
    final: dict[str, float] = {}
    try:
        engine = build_engine(cfg, dataset, population, state, backend, server_opt, plan=plan,
                              vocabulary=vocabulary)
        saved_at, saved_round = -math.inf, state.round if resume else -1

        def save(wall_s: float) -> None:
            nonlocal saved_at, saved_round
            if checkpoint_dir is not None and saved_round != state.round:
                checkpoint.save(checkpoint_dir, Checkpoint(state=state, rows=rows, async_state=async_state,
                                                           store=store, wall_s=wall_s, settings=_resume_settings(cfg, dataset)))
                saved_at, saved_round = time.perf_counter(), state.round

        with _settled_gc(), _StopAtRoundEnd() as stop:
            while state.round < cfg.fl.rounds:
                if plan is not None and cfg.privacy.target_epsilon > 0 and cfg.privacy.on_target == "stop" and \
                        privacy_accountant.epsilon(plan, state.round + 1) > cfg.privacy.target_epsilon:
                    logger.warning("privacy: stopped after round %d: round %d would exceed epsilon %.3g",
                                   state.round, state.round + 1, cfg.privacy.target_epsilon)
                    stopped_at = state.round
                    break
                if cfg.fl.schedule == "sync":
                    state, row = run_sync_round(state, engine, store)
                else:
                    state, async_state, row = run_async_step(state, async_state, engine, store)
                if state.round % cfg.fl.eval_every == 0 or state.round == cfg.fl.rounds:
                    t_eval = time.perf_counter()
                    load_global_inplace(eval_model, state, store)
                    final = evaluate(eval_model, test())
                    row.update({k: final[k] for k in ("auc", "ctcvr_auc", "logloss", "auc_expected") if k in final})
                    row["eval_s"] = time.perf_counter() - t_eval
                if plan is not None:
                    if "realized_noise_multiplier" in row:
                        realized.append(float(row["realized_noise_multiplier"]))
                    row["epsilon"] = privacy_accountant.epsilon(plan, state.round, realized=realized or None)
                    row["clip"] = state.clip
                row["wall_time_s"] = wall_before + time.perf_counter() - start
                rows.append(row)
                logger.info("round %d auc %s sim %.1fs", state.round, row.get("auc"), row["sim_time_s"])
                if on_step:
                    on_step(row)
                if saved_round < 0 or state.round == cfg.fl.rounds or \
                        time.perf_counter() - saved_at >= cfg.fl.checkpoint_every_s:
                    save(row["wall_time_s"])
                if stop.requested:  # Ctrl-C during this round: its checkpoint, then stop
                    save(row["wall_time_s"])
                    raise KeyboardInterrupt
            if rows:  # stopped early (privacy.on_target = "stop"): the last round's checkpoint
                save(rows[-1]["wall_time_s"])
    finally:
        backend.close()
    if not final:  # resumed a finished run: evaluate the restored model
        load_global_inplace(eval_model, state, store)
        final = evaluate(eval_model, test())
    wall = wall_before + time.perf_counter() - start
    summary = _summary(cfg, rows, final, eval_model, wall, population)
    summary["local_state_evictions"] = store.evicted
    if plan is not None:
        summary.update(privacy_summary(cfg, plan, state.round, state, vocabulary, realized or None))
        summary["stopped_at_target_epsilon"] = stopped_at is not None
    return TrainResult(summary=summary, rows=rows, rows_name="rounds.csv", model=eval_model)
