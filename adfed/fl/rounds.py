"""Sync rounds in simulation: the server's round machine (:mod:`adfed.fl.server`) driven
by simulated time.

One round: select clients (with over-selection), offer them the encoded model, let the
backend run the phones (decode, train, transform, encode), time each phone from its real
payload sizes and device profile, feed the uploads to the machine in arrival order
(:func:`~adfed.fl.server.accept` decodes each), then aggregate when the round closed
with enough uploads, or retry. The HTTP service drives the same machine with real
requests; only the clock differs.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from adfed.config import Config
from adfed.fl import devices, server, strategies
from adfed.fl.aggregators import Aggregator
from adfed.fl.backends import Backend, ClientResult, Job, Offer
from adfed.fl.pipeline import Pipeline
from adfed.fl.population import LocalStore, Population
from adfed.fl.server import ServerState, SyncRound
from adfed.fl.types import ClientSettings, Passes, Update, dense_nbytes
from adfed.fl.window import next_state
from adfed.fl.wire import Envelope, WireSpec, encode_model
from adfed.model.groups import lr_decay_factor

#: salts of the per-round RNG streams (with seed and round)
SELECT_SALT, AGGREGATE_SALT, TAKE_SALT = 0x5EC, 0xA66, 0x7A4E
#: salt of DP-FTRL's pass orders (with seed and pass number)
FTRL_PASS_SALT = 0xF7E1


@dataclasses.dataclass(frozen=True)
class Engine:
    """The built components a simulated round runs with (sync and async alike)."""

    cfg: Config
    population: Population
    backend: Backend
    aggregator: Aggregator
    server_opt: strategies.ServerOptimizer
    pipeline: Pipeline
    spec: WireSpec
    #: privacy on: the run's plan (adfed.privacy.accountant.PrivacyPlan) and round
    #: vocabulary (adfed.privacy.vocabulary.Vocabulary); None otherwise
    plan: Any = None
    vocabulary: Any = None

    def aggregate(self, state: ServerState, updates: Sequence[Update], weights: np.ndarray,
                  step: int) -> tuple[ServerState, dict[str, float]]:
        rng = np.random.default_rng([self.cfg.seed, step, AGGREGATE_SALT])
        # step n aggregates after n - 1 done, as client_settings(cfg, done) for the phones
        server_opt = strategies.at_scale(self.server_opt, lr_decay_factor(step - 1, self.cfg.fl.server_lr_decay_start))
        return server.aggregate(state, updates, weights, self.aggregator, server_opt, rng, step=step,
                                threads=self.cfg.fl.server_threads, release_empty=self.cfg.privacy.dp,
                                average=self.cfg.fl.server_ema)


def client_settings(cfg: Config, done: int = 0) -> ClientSettings:
    """The local-training settings the server pushes to clients once ``done`` rounds (sync)
    or server steps (async) are complete: the phones' learning rates scaled by
    ``lr_decay_factor(done, fl.lr_decay_start)``, and the loss's CTCVR term off during the
    first ``fl.ctcvr_warmup_rounds``."""
    mu = cfg.fl.prox_mu if cfg.fl.strategy in strategies.PROXIMAL else 0.0
    f = lr_decay_factor(done, cfg.fl.lr_decay_start)
    return ClientSettings(epochs=cfg.fl.local_epochs, batch_size=cfg.fl.local_batch_size,
                          lr=cfg.fl.local_lr * f, sparse_lr=cfg.fl.local_sparse_lr * f, prox_mu=mu,
                          optimizer=cfg.fl.local_optimizer, embedding_l2=cfg.train.embedding_l2,
                          table_lr=cfg.fl.local_table_lr * f,
                          user_lr=cfg.fl.local_user_lr * f if cfg.fl.local_user_lr > 0 else None,
                          ctcvr_weight=0.0 if done < cfg.fl.ctcvr_warmup_rounds else 1.0)


def offered(cfg: Config, carried: int = 0) -> int:
    """How many phones a sync round offers: the target times the over-selection factor;
    with ``carried`` late uploads of the last round coming (``window.late = "next"``, they
    count towards the target) only what the target still needs (at least one phone)."""
    # rounded first: 100 x 1.1 is 110.00000000000001 in floats, which ceil makes 111
    return math.ceil(round(max(cfg.fl.clients_per_round - carried, 1) * cfg.fl.over_selection, 9))


def select(population: Population, cfg: Config, rng: np.random.Generator, carried: int = 0) -> np.ndarray:
    """Uniform sample of online clients with over-selection (:func:`offered`)."""
    return population.sample(offered(cfg, carried), rng)


def select_dp(population: Population, cfg: Config, round_no: int, rng: np.random.Generator) -> np.ndarray:
    """The sampling the privacy accountant assumes (no over-selection, no "first k"):

    - DP-FedAvg: Poisson sampling, every phone with training rows independently with
      probability ``q = clients_per_round / N``;
    - DP-FTRL: passes over the population in a random order (one per pass, from the
      seed), round r of a pass taking its r-th chunk of ``clients_per_round`` phones, so a
      phone is offered at most once per pass.

    A sampled phone that is offline now is not offered (it cannot answer); that only
    lowers its chance to take part.
    """
    clients = population.clients
    n, cohort = len(clients), min(cfg.fl.clients_per_round, len(clients))
    if cfg.privacy.mechanism == "dp_ftrl":
        per_pass = math.ceil(n / cohort)
        pass_no, r = divmod(round_no - 1, per_pass)
        chosen = population.pass_order(cfg.seed, pass_no, salt=FTRL_PASS_SALT)[r * cohort:(r + 1) * cohort]
    else:
        chosen = clients[rng.random(n) < cohort / n]
    online = rng.random(len(chosen)) < population.profiles.online_prob[chosen]
    return chosen[online]


def make_offer(state: ServerState, engine: Engine, round_no: int) -> Offer:
    """The round's offer: the model encoded once, the settings of ``state.round`` rounds done."""
    g = state.model
    model = encode_model(g.dense, Envelope("model", round_no, g.version, engine.pipeline.codec))
    settings = dataclasses.replace(client_settings(engine.cfg, state.round), clip=state.clip, clips=state.clips)
    vocab = engine.vocabulary.for_round(round_no) if engine.vocabulary is not None else None
    return Offer(round=round_no, version=g.version, settings=settings,
                 model=model, tables=g.sparse, spec=engine.spec, vocabulary=vocab)


def jobs_for(clients: np.ndarray, store: LocalStore, seed_prefix: tuple[int, ...]) -> list[Job]:
    return [Job(client_id=int(c), phone=store.get(int(c)), seed=(*seed_prefix, int(c))) for c in clients]


def rules(cfg: Config) -> server.RoundRules:
    """The round's policy. With privacy on, every on-time upload counts (no target count),
    and the round is released whoever arrived (no minimum, no retry: a retry would be
    another sampling the accountant does not know of)."""
    if cfg.privacy.dp:
        return server.RoundRules(target=sys.maxsize, min_clients=0, max_retries=0)
    return server.RoundRules(target=cfg.fl.clients_per_round, min_clients=cfg.window.min_clients,
                             max_retries=cfg.window.max_retries, take_random=cfg.window.take == "random")


def simulated_times(population: Population, cfg: Config, results: Sequence[ClientResult]) -> np.ndarray:
    """Each phone's simulated seconds from the offer to its upload done, from the bytes it
    really downloaded and uploaded, its examples and its device profile."""
    clients = np.array([r.client_id for r in results], dtype=np.int64)
    return devices.round_trip_s(
        population.profiles, clients,
        bytes_down=np.array([r.bytes_down for r in results], dtype=np.float64),
        bytes_up=np.array([len(r.payload) for r in results], dtype=np.float64),
        examples=np.array([r.num_examples * cfg.fl.local_epochs for r in results], dtype=np.float64),
    )


def run_attempt(rnd: SyncRound, engine: Engine, store: LocalStore, offer: Offer, passes: Passes | None,
                carried: Sequence[server.Late] = ()) -> tuple[SyncRound, list[ClientResult], Passes | None,
                                                             list[server.Late]]:
    """Select, offer, train and deliver one attempt; returns the closed attempt, its
    results, where the passes stand after it (``fl.sampling = "passes"``; else None) and
    its late uploads (kept with ``window.late = "next"``, else none). ``carried``: the
    last round's late uploads, delivered at their times among this attempt's.

    The phones come from the privacy accountant's sampler with privacy on
    (:func:`select_dp`), else from the passes or uniform draws (``fl.sampling``).
    ``store`` (the phones' local storage) is updated in place for every client that
    finished training, on time or late: their phone keeps its new local state.
    """
    cfg, population = engine.cfg, engine.population
    rng = np.random.default_rng([cfg.seed, rnd.expect.round, rnd.attempt, SELECT_SALT])
    if cfg.privacy.dp:
        selected = select_dp(population, cfg, rnd.expect.round, rng)
    elif cfg.fl.sampling == "passes":
        selected, passes = population.sample_passes(offered(cfg, len(carried)), rng, passes or Passes(), cfg.seed)
    else:
        selected = select(population, cfg, rng, len(carried))
    rnd = server.offer(rnd, selected)
    failed = devices.failures(population.profiles, selected, rng)
    for client in selected[failed].tolist():
        rnd = server.drop(rnd, client)
    trained = selected[~failed]
    results = engine.backend.map(offer, jobs_for(trained, store, (cfg.seed, rnd.expect.round, rnd.attempt)))
    for res in results:
        store.put_inplace(res.client_id, res.phone)
    arrive = simulated_times(population, cfg, results)
    keep = cfg.window.late == "next"
    late: list[server.Late] = []
    # every delivery in time order: the carried ones (-1 - j) before this attempt's (i) at equal times
    times = np.concatenate([[c.after_s for c in carried], arrive]) if carried else arrive
    who = np.concatenate([-1 - np.arange(len(carried)), np.arange(len(results))]) if carried else np.arange(len(results))
    with server.torch_threads(cfg.fl.server_threads):  # decoding many small payloads: like aggregation
        for k in np.argsort(times, kind="stable").tolist():
            i = int(who[k])
            if i < 0:
                rnd = server.accept_late(rnd, carried[-1 - i], engine.spec, engine.pipeline)
                continue
            before = rnd.counts.late
            rnd = server.accept(rnd, results[i].client_id, results[i].payload, float(arrive[i]),
                                engine.spec, engine.pipeline)
            if keep and rnd.counts.late > before:
                late.append(server.Late(results[i].client_id, results[i].payload, rnd.expect,
                                        float(arrive[i]) - rnd.end_s, results[i].bytes_down))
    if rnd.phase is server.Phase.OPEN:  # nobody arrived
        rnd = server.close(rnd, server.deadline_or(rnd, 0.0))
    return rnd, results, passes, late


def run_sync_round(state: ServerState, engine: Engine, store: LocalStore) -> tuple[ServerState, dict[str, Any]]:
    """One sync round with retries; returns the new state and the round's CSV row."""
    cfg = engine.cfg
    rnd = server.open_round(state, rules(cfg), engine.pipeline.codec)
    offer = make_offer(state, engine, rnd.expect.round)
    row: dict[str, Any] = {"round": rnd.expect.round, "deadline_s": state.window.deadline_s}
    sim_start, sim_s, window, passes = state.sim_time_s, state.sim_time_s, state.window, state.passes
    carried = came = state.late  # the last round's late uploads come in this round's first attempt
    late: list[server.Late] = []
    while True:
        rnd, results, passes, late = run_attempt(rnd, engine, store, offer, passes, carried)
        carried = ()
        sim_s += rnd.end_s
        window = next_state(cfg.window, window, np.array(rnd.arrivals_s, dtype=np.float64))
        if server.enough(rnd):
            rnd = server.take_random(rnd, np.random.default_rng([cfg.seed, rnd.expect.round, rnd.attempt, TAKE_SALT]))
            rnd = server.finish(rnd)
            uploads = server.uploads_in_offer_order(rnd)
            updates = [u.update for u in uploads]
            # with privacy on every phone weighs one (the DP sum ignores weights)
            weights = np.ones(len(updates)) if cfg.privacy.dp else server.server_weights(
                [u.num_examples for u in updates], cfg.fl.max_weight, [u.staleness for u in uploads])
            state, stats = engine.aggregate(state, updates, weights, rnd.expect.round)
            row.update(stats)
            downs = {c.client: c.bytes_down for c in came} | {r.client_id: r.bytes_down for r in results}
            row.update(byte_stats(rnd.uploads, downs))
            row["train_loss"] = float(np.mean([u.metrics.get("loss", math.nan) for u in updates]))
            break
        late = []  # an attempt that is not aggregated moves no model version: its late uploads are dropped
        retry = server.can_retry(rnd)
        rnd = server.discard(rnd)
        if not retry:
            break
        rnd = server.retry(rnd, window.deadline_s)
    row.update(dataclasses.asdict(rnd.counts))
    row["round_sim_s"] = sim_s - sim_start
    row["sim_time_s"] = sim_s
    return dataclasses.replace(state, window=window, round=rnd.expect.round, sim_time_s=sim_s, passes=passes,
                               late=tuple(late)), row


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def byte_stats(uploads: Sequence[server.Upload], bytes_down: Mapping[int, int]) -> dict[str, float]:
    """Mean bytes per aggregated client: up (``len()`` of its payload) and down (model +
    its rows, as encoded), and the tensor bytes of the dense and sparse parts of its upload."""
    if not uploads:
        return {}
    return {
        "bytes_up": float(np.mean([u.bytes_up for u in uploads])),
        "bytes_down": float(np.mean([bytes_down[u.update.client_id] for u in uploads])),
        "bytes_up_dense": float(np.mean([dense_nbytes(u.update.dense) for u in uploads])),
        "bytes_up_sparse": float(np.mean([sum(_nbytes(r.ids) + _nbytes(r.values) for r in u.update.sparse.values())
                                          for u in uploads])),
    }
