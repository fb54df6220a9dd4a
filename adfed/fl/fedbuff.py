"""Asynchronous buffered aggregation (FedBuff; Nguyen et al., AISTATS 2022) in simulation.

An event-driven simulated clock keeps ``async_concurrency`` clients training at once.
A client trains on the model version current when it starts; when it finishes, its
upload goes to the server's buffer (:func:`adfed.fl.server.buffer_accept`: decoded,
checked, dropped when its staleness ``s = version_now - version_started`` exceeds
``async_max_staleness``); every ``async_buffer`` accepted uploads the server aggregates
the buffer with weights ``min(examples, max_weight) / sqrt(1 + s)``
(:func:`~adfed.fl.server.server_weights`), and each freed slot is refilled with a new
uniformly sampled client. A client that drops out frees its slot at a uniform point of
its work, when its connection ends.

Whether a started client drops out, and when, is drawn when it starts (it does not
depend on the model), and its drop-out event goes on the clock at once. Training is
batched for the backends: the clients that will finish wait in ``pending`` and are
trained together as late as is safe, i.e. before the model version changes and before
the clock passes the earliest time any of them could finish (a lower bound from
latency and compute alone). Results are the same as training each at its start, and
the clock never runs backwards.

:class:`AsyncState` is immutable: every step returns a new one.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Any

import numpy as np
import torch

from adfed.fl import devices, server
from adfed.fl.population import LocalStore, Population
from adfed.fl.rounds import Engine, byte_stats, jobs_for, make_offer, simulated_times
from adfed.fl.server import ServerState


@dataclasses.dataclass(frozen=True, order=True)
class Event:
    """A client's connection ends at ``at_s``: with an upload (``payload``), or without
    (it dropped out: ``payload`` is None). Ordered by (time, dispatch sequence)."""

    at_s: float
    seq: int
    client: int = dataclasses.field(compare=False)
    payload: bytes | None = dataclasses.field(default=None, compare=False)
    phone: dict[str, torch.Tensor] | None = dataclasses.field(default=None, compare=False)
    bytes_down: int = dataclasses.field(default=0, compare=False)


@dataclasses.dataclass(frozen=True)
class Started:
    """A client that started at ``start_s`` and will finish (trained at the next flush)."""

    start_s: float
    seq: int
    client: int


@dataclasses.dataclass(frozen=True)
class AsyncState:
    """The simulation state of async mode (checkpointed with the server state)."""

    clock_s: float = 0.0
    seq: int = 0  # dispatch counter: seeds and tie-breaks
    events: tuple[Event, ...] = ()  # sorted by (at_s, seq)
    pending: tuple[Started, ...] = ()
    failed: int = 0


def _in_flight(st: AsyncState) -> np.ndarray:
    ids = [e.client for e in st.events] + [p.client for p in st.pending]
    return np.array(sorted(ids), dtype=np.int64)


def _push(events: tuple[Event, ...], new: list[Event]) -> tuple[Event, ...]:
    out = list(events)
    for e in new:
        bisect.insort(out, e)
    return tuple(out)


def _lower_bound(population: Population, engine: Engine, start: float, client: int) -> float:
    p = population.profiles
    n = float(population.num_train(np.array([client]))[0]) * engine.cfg.fl.local_epochs
    return start + 2 * float(p.latency_ms[client]) / 1000 + n / max(float(p.compute_speed[client]), 1e-6)


def dispatch(st: AsyncState, engine: Engine, n: int) -> AsyncState:
    """Start ``n`` new clients at the current clock: a client that drops out gets its
    drop-out event now, at a uniform point of its work (no payload yet: latency +
    compute); the others wait in ``pending`` to be trained (see module doc)."""
    cfg, population = engine.cfg, engine.population
    rng = np.random.default_rng([cfg.seed, st.seq, 0xA5])
    clients = population.sample(n, rng, exclude=_in_flight(st))
    failed = devices.failures(population.profiles, clients, rng)
    drops: list[Event] = []
    started: list[Started] = []
    seq = st.seq
    for client, f in zip(clients.tolist(), failed.tolist(), strict=True):
        if f:
            work = _lower_bound(population, engine, st.clock_s, client) - st.clock_s
            drops.append(Event(st.clock_s + float(rng.random()) * work, seq, client))
        else:
            started.append(Started(st.clock_s, seq, client))
        seq += 1
    return dataclasses.replace(st, seq=seq, events=_push(st.events, drops), pending=(*st.pending, *started))


def flush(st: AsyncState, state: ServerState, engine: Engine, store: LocalStore) -> AsyncState:
    """Train every pending client on the current version and schedule its arrival."""
    if not st.pending:
        return st
    offer = make_offer(state, engine, state.round + 1)
    trained = np.array([p.client for p in st.pending], dtype=np.int64)
    jobs = [dataclasses.replace(j, seed=(engine.cfg.seed, state.model.version, p.seq, p.client))
            for j, p in zip(jobs_for(trained, store, ()), st.pending, strict=True)]
    results = engine.backend.map(offer, jobs)
    durations = simulated_times(engine.population, engine.cfg, results)
    arrivals = [Event(p.start_s + float(d), p.seq, p.client, r.payload, r.phone, r.bytes_down)
                for p, r, d in zip(st.pending, results, durations, strict=True)]
    return dataclasses.replace(st, pending=(), events=_push(st.events, arrivals))


def _pop(st: AsyncState, state: ServerState, engine: Engine, store: LocalStore) -> tuple[AsyncState, Event]:
    """The next event, after training pending clients if one of them could come first."""
    if st.pending:
        earliest = min(_lower_bound(engine.population, engine, p.start_s, p.client) for p in st.pending)
        if not st.events or st.events[0].at_s >= earliest:
            st = flush(st, state, engine, store)
    if not st.events:
        raise RuntimeError("async simulation ran out of clients; lower fl.async_concurrency")
    event = st.events[0]
    return dataclasses.replace(st, events=st.events[1:], clock_s=event.at_s), event


def run_async_step(state: ServerState, st: AsyncState, engine: Engine, store: LocalStore,
                   ) -> tuple[ServerState, AsyncState, dict[str, Any]]:
    """Advance the clock until the buffer holds ``async_buffer`` updates, then apply it."""
    cfg = engine.cfg
    if not st.events and not st.pending:
        st = dispatch(st, engine, cfg.fl.async_concurrency)
    start_s, failed0 = st.clock_s, st.failed
    buf = server.Buffer(size=cfg.fl.async_buffer, max_staleness=cfg.fl.async_max_staleness,
                        codec=engine.pipeline.codec)
    downs: dict[int, int] = {}
    while not buf.full:
        st, event = _pop(st, state, engine, store)
        if event.payload is None:
            st = dataclasses.replace(st, failed=st.failed + 1)
        else:
            if event.phone is not None:
                store.put_inplace(event.client, event.phone)
            with server.torch_threads(cfg.fl.server_threads):
                buf = server.buffer_accept(buf, event.payload, event.at_s, engine.spec, engine.pipeline,
                                           state.model.version)
            downs[event.client] = event.bytes_down
        st = dispatch(st, engine, 1)
    st = flush(st, state, engine, store)  # they started on this version
    weights = server.buffer_weights(buf, cfg.fl.max_weight)
    updates = [u.update for u in buf.uploads]
    state, _ = engine.aggregate(state, updates, weights, state.round + 1)
    stale = np.array(buf.staleness, dtype=np.float64)
    row: dict[str, Any] = {"round": state.round + 1, "failed": st.failed - failed0, "arrived": len(updates),
                           "late": buf.stale, "rejected": buf.rejected,
                           "mean_staleness": float(stale.mean()) if len(stale) else 0.0}
    row.update(byte_stats(buf.uploads, downs))
    row["train_loss"] = float(np.mean([u.metrics.get("loss", math.nan) for u in updates]))
    row["round_sim_s"] = st.clock_s - start_s
    row["sim_time_s"] = st.clock_s
    return dataclasses.replace(state, round=state.round + 1, sim_time_s=st.clock_s), st, row

