"""Asynchronous buffered aggregation (FedBuff; Nguyen et al., AISTATS 2022).

An event-driven simulated clock keeps ``async_concurrency`` clients training at once.
A client trains on the model version current when it starts; when it finishes, its
update joins a buffer with staleness ``s = version_now - version_started`` (updates with
``s > async_max_staleness`` are dropped; a client that drops out frees its slot at a
uniform point of its work, when its connection ends); every ``async_buffer`` arrivals the server
applies the buffer, weighting each update by its capped example count times
``1 / sqrt(1 + s)``, and the freed slot is refilled with a new uniformly sampled client.

Whether a started client drops out, and when, is drawn when it starts (it does not
depend on the model), and its drop-out event goes on the clock at once. Training is
batched for the backends: the clients that will finish wait in ``pending`` and are
trained together as late as is safe, i.e. before the model version changes and before
the clock passes the earliest time any of them could finish (a lower bound from
latency and compute alone). Results are the same as training each at its start, and
the clock never runs backwards (drawing drop-outs at the flush, as an earlier version
did, could put a drop-out before the clock).
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any

import numpy as np

from adfed.config import Config
from adfed.fl import devices, strategies
from adfed.fl.backends import Backend, ClientResult
from adfed.fl.population import LocalStore, Population
from adfed.fl.rounds import ServerState, _byte_stats, apply_updates, configure, jobs_for


@dataclasses.dataclass
class AsyncState:
    """The mutable simulation state of async mode (checkpointed with the server state)."""

    clock_s: float = 0.0
    seq: int = 0  # dispatch counter: seeds and tie-breaks
    events: list[tuple[float, int, int, Any]] = dataclasses.field(default_factory=list)
    pending: list[tuple[float, int, int]] = dataclasses.field(default_factory=list)  # (start, seq, client)
    buffer: list[tuple[ClientResult, int]] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"failed": 0, "stale": 0, "arrived": 0})


def _in_flight(st: AsyncState) -> np.ndarray:
    ids = [e[2] for e in st.events] + [p[2] for p in st.pending]
    return np.array(sorted(ids), dtype=np.int64)


def _dispatch(st: AsyncState, cfg: Config, population: Population, n: int) -> None:
    """Start ``n`` new clients at the current clock: a client that drops out gets its
    drop-out event now, at a uniform point of its work (no payload yet: latency +
    compute); the others wait in ``pending`` to be trained (see module doc)."""
    rng = np.random.default_rng([cfg.seed, st.seq, 0xA5])
    clients = population.sample(n, rng, exclude=_in_flight(st))
    failed = devices.failures(population.profiles, clients, rng)
    for client, f in zip(clients.tolist(), failed.tolist(), strict=True):
        if f:
            work = _lower_bound(population, cfg, st.clock_s, client) - st.clock_s
            heapq.heappush(st.events, (st.clock_s + float(rng.random()) * work, st.seq, client, None))
        else:
            st.pending.append((st.clock_s, st.seq, client))
        st.seq += 1


def _lower_bound(population: Population, cfg: Config, start: float, client: int) -> float:
    p = population.profiles
    n = float(population.num_train(np.array([client]))[0]) * cfg.fl.local_epochs
    return start + 2 * float(p.latency_ms[client]) / 1000 + n / max(float(p.compute_speed[client]), 1e-6)


def _flush(st: AsyncState, state: ServerState, cfg: Config, population: Population,
           backend: Backend, store: LocalStore) -> None:
    """Train every pending client on the current version and schedule its arrival."""
    if not st.pending:
        return
    ok, st.pending = st.pending, []
    trained = np.array([c for _, _, c in ok], dtype=np.int64)
    jobs = jobs_for(trained, store, ())
    jobs = [dataclasses.replace(j, seed=(cfg.seed, state.model.version, seq, client))
            for j, (_, seq, client) in zip(jobs, ok, strict=True)]
    results = backend.map(configure(state, cfg), jobs)
    durations = devices.round_trip_s(
        population.profiles, trained,
        bytes_down=np.array([r.bytes_down for r in results], dtype=np.float64),
        bytes_up=np.array([r.bytes_up for r in results], dtype=np.float64),
        examples=np.array([r.update.num_examples * cfg.fl.local_epochs for r in results], dtype=np.float64),
    )
    for (start, seq, client), res, dur in zip(ok, results, durations, strict=True):
        heapq.heappush(st.events, (start + float(dur), seq, client, res))


def run_async_step(
    state: ServerState, st: AsyncState, cfg: Config, population: Population, backend: Backend,
    store: LocalStore, server_opt: strategies.ServerOptimizer,
) -> tuple[ServerState, dict[str, Any]]:
    """Advance the clock until the buffer holds ``async_buffer`` updates, then apply it."""
    if not st.events and not st.pending:
        _dispatch(st, cfg, population, cfg.fl.async_concurrency)
    start_s = st.clock_s
    counts0 = dict(st.counts)
    while len(st.buffer) < cfg.fl.async_buffer:
        if st.pending:
            earliest = min(_lower_bound(population, cfg, s, c) for s, _, c in st.pending)
            if not st.events or st.events[0][0] >= earliest:
                _flush(st, state, cfg, population, backend, store)
        if not st.events:
            raise RuntimeError("async simulation ran out of clients; lower fl.async_concurrency")
        t, _, client, res = heapq.heappop(st.events)
        st.clock_s = t
        if res is None:
            st.counts["failed"] += 1
        else:
            store.put_inplace(client, res.local)
            staleness = state.model.version - res.update.base_version
            if staleness > cfg.fl.async_max_staleness:
                st.counts["stale"] += 1
            else:
                st.buffer.append((res, staleness))
                st.counts["arrived"] += 1
        _dispatch(st, cfg, population, 1)
    _flush(st, state, cfg, population, backend, store)  # they started on this version
    buffered, st.buffer = st.buffer, []
    updates = [r.update for r, _ in buffered]
    stale = np.array([s for _, s in buffered], dtype=np.float64)
    weights = strategies.client_weights(updates, cfg.fl.max_weight) / np.sqrt(1.0 + stale)
    if weights.sum() > 0:
        state = apply_updates(state, updates, weights, server_opt, cfg.fl.sparse_aggregation)
    else:
        state = dataclasses.replace(state, model=dataclasses.replace(state.model, version=state.model.version + 1))
    row: dict[str, Any] = {"round": state.round + 1}
    row.update({k: st.counts[k] - counts0[k] for k in st.counts})
    row["late"] = row.pop("stale")
    row["mean_staleness"] = float(stale.mean()) if len(stale) else 0.0
    row.update(_byte_stats([r for r, _ in buffered]))
    row["train_loss"] = float(np.mean([u.metrics["loss"] for u in updates]))
    row["round_sim_s"] = st.clock_s - start_s
    row["sim_time_s"] = st.clock_s
    return dataclasses.replace(state, round=state.round + 1, sim_time_s=st.clock_s), row
