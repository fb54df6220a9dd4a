"""The server: its state, the weights it gives updates, aggregation, and the round as a
state machine shared by the simulation and the HTTP service.

A sync round, as the server sees it::

    open_round ──offer(clients)──> OPEN ──accept(payload, at)*──> CLOSED ──> aggregate
                   drop(client)*     │  (deadline, target count,        │
                                     │   or nobody left pending)        └─ too few: retry / give up
                                     └─expire() at the deadline

Every transition is a pure function returning a new :class:`SyncRound`; the caller
supplies the time (simulated arrival times in :mod:`adfed.fl.rounds`, the wall clock in
the coming HTTP server). :func:`accept` decodes the payload bytes (validated against the
model: :func:`adfed.fl.wire.decode_update`), checks round, model version, codec and
sender, and undoes the client pipeline (:meth:`~adfed.fl.pipeline.Pipeline.invert`). The
async schedule (FedBuff) is the same machine with a :class:`Buffer` instead of a round:
uploads carry their staleness and the server aggregates every ``async_buffer`` of them.
Weights (example caps, staleness) are computed here only: :func:`server_weights`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from adfed.errors import DataError
from adfed.fl import strategies
from adfed.fl.aggregators import Aggregate, Aggregator, RoundInfo
from adfed.fl.pipeline import Pipeline
from adfed.fl.types import GlobalState, Passes, Update
from adfed.fl.window import WindowState
from adfed.fl.wire import WireSpec, decode_update

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerState:
    """Everything the server carries from round to round."""

    model: GlobalState
    opt_state: dict[str, Any]
    window: WindowState
    round: int = 0
    sim_time_s: float = 0.0
    clip: float = 0.0  # the clip norm phones are sent (privacy.clip, adapted with adaptive clipping); 0: none
    clips: tuple[tuple[str, float], ...] = ()  # per-tensor clips (privacy.clip_mode = "per_tensor")
    #: the released model with ``fl.server_ema``: a moving average of ``model`` over server
    #: steps (:func:`averaged`); None: the released model is ``model``
    average: GlobalState | None = None
    #: where sync rounds stand in their passes over the population (``fl.sampling =
    #: "passes"``); None before the first such round
    passes: Passes | None = None
    #: the last round's late uploads, for the next round (``window.late = "next"``)
    late: tuple[Late, ...] = ()

    @property
    def released(self) -> GlobalState:
        """The model the server evaluates, saves and ships for serving."""
        return self.average if self.average is not None else self.model


# -- weights and aggregation -----------------------------------------------------------

def server_weights(num_examples: Sequence[int] | np.ndarray, max_weight: float,
                   staleness: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Aggregation weights, float64 [n]: each client's self-reported example count clipped
    to ``[0, max_weight]`` (a count is never trusted blindly), divided by
    ``sqrt(1 + staleness)`` when staleness is given (FedBuff; Nguyen et al. 2022)."""
    counts = np.maximum(np.asarray(num_examples, dtype=np.float64), 0.0)
    weights = np.minimum(counts, max_weight)
    if staleness is not None:
        weights = weights / np.sqrt(1.0 + np.asarray(staleness, dtype=np.float64))
    return weights


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the caller's count."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


def apply_aggregate(state: ServerState, agg: Aggregate, server_opt: strategies.ServerOptimizer) -> ServerState:
    """New server state after one aggregate (pure): the server optimizer steps the dense
    part and each sparse table's aggregated rows; the model version goes up."""
    g = state.model
    dense, opt_state = server_opt.apply(g.dense, agg.dense, state.opt_state)
    tables = dict(g.sparse)
    for name, rows in agg.sparse.items():
        if name not in tables:
            raise ValueError(f"the aggregate names sparse table {name!r}, which the model lacks")
        tables[name], opt_state = server_opt.apply_rows(name, tables[name], rows, opt_state)
    model = GlobalState(dense=dense, sparse=tables, version=g.version + 1)
    return dataclasses.replace(state, model=model, opt_state=opt_state)


def averaged(state: ServerState, decay: float) -> ServerState:
    """``state`` with its released model moved toward ``state.model`` (pure;
    ``fl.server_ema``): the first call starts the average at the model; at model version
    n it then moves by ``1 - min(decay, (1 + n) / (10 + n))``, the warm-up of the
    centralized ``train.ema``. Post-processing of what the server already released, so it
    costs no privacy. ``decay`` 0: no average."""
    if decay <= 0:
        return state
    g, avg = state.model, state.average
    if avg is None:
        return dataclasses.replace(state, average=GlobalState(
            dense={k: v.clone() for k, v in g.dense.items()}, sparse={k: v.clone() for k, v in g.sparse.items()},
            version=g.version))
    w = 1.0 - min(decay, (1 + g.version) / (10 + g.version))
    return dataclasses.replace(state, average=GlobalState(
        dense={k: torch.lerp(avg.dense[k], v, w) for k, v in g.dense.items()},
        sparse={k: torch.lerp(avg.sparse[k], v, w) for k, v in g.sparse.items()}, version=g.version))


def aggregate(state: ServerState, updates: Sequence[Update], weights: np.ndarray, aggregator: Aggregator,
              server_opt: strategies.ServerOptimizer, rng: np.random.Generator, *, step: int, threads: int = 1,
              release_empty: bool = False, average: float = 0.0) -> tuple[ServerState, dict[str, float]]:
    """Aggregate ``updates`` with ``weights`` and apply the result (pure); returns the new
    state and the aggregate's stats. With no update or no weight the model is unchanged
    but for its version (the server stepped), unless ``release_empty`` (a DP round: the
    noise is released whoever arrived). A ``next_clip`` stat becomes the state's clip, and
    ``next_clip/<tensor>`` stats its per-tensor clips (not returned: one per tensor).
    ``average`` > 0 moves the released model toward the new one (:func:`averaged`)."""
    if not release_empty and (not len(updates) or float(np.sum(weights)) <= 0):
        stepped = dataclasses.replace(state, model=dataclasses.replace(state.model, version=state.model.version + 1))
        return averaged(stepped, average), {}
    with torch_threads(threads):
        agg = aggregator(updates, weights, rng, RoundInfo(step=step, clip=state.clip, clips=state.clips))
        new = averaged(apply_aggregate(state, agg, server_opt), average)
    stats = dict(agg.stats)
    if "next_clip" in stats:
        new = dataclasses.replace(new, clip=float(stats["next_clip"]))
    per_tensor = {k.split("/", 1)[1]: stats.pop(k) for k in sorted(stats) if k.startswith("next_clip/")}
    if per_tensor:
        new = dataclasses.replace(new, clips=tuple((k, float(v)) for k, v in per_tensor.items()))
    return new, stats


# -- uploads ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Upload:
    """An accepted upload: the decoded (and pipeline-inverted) update, when it came and
    how many bytes it was."""

    update: Update
    at_s: float
    bytes_up: int
    staleness: int = 0  # model versions between the one it was trained from and the round's


@dataclasses.dataclass(frozen=True)
class Late:
    """An upload that came after its sync round closed, kept for the next round
    (``window.late = "next"``): still encoded, checked when that round takes it."""

    client: int
    payload: bytes
    expect: Expected  # the round it was made for
    after_s: float  # seconds after that round closed: when it comes, in the next round's time
    bytes_down: int = 0  # what its phone downloaded for it (rounds.csv's bytes)


@dataclasses.dataclass(frozen=True)
class Expected:
    """What the server expects of an upload: the round it belongs to, the model
    version it must have been trained from (sync: exactly; async: at most), the codec."""

    round: int
    model_version: int
    codec: str
    exact_version: bool = True


def open_upload(payload: bytes, spec: WireSpec, pipeline: Pipeline, expect: Expected) -> Update:
    """Decode one upload and check it belongs here; DataError (one line) if not."""
    envelope, update = decode_update(payload, spec)
    who = f"upload from client {envelope.client_id}"
    if envelope.kind != "update":
        raise DataError(f"{who}: payload kind is {envelope.kind!r}; an upload is an 'update'")
    if envelope.codec != expect.codec:
        raise DataError(f"{who}: codec {envelope.codec!r}; this round's pipeline is {expect.codec!r}")
    if expect.exact_version and (envelope.round, envelope.model_version) != (expect.round, expect.model_version):
        raise DataError(f"{who}: made for round {envelope.round} / model {envelope.model_version}; "
                        f"the open round is {expect.round} / model {expect.model_version}")
    if not expect.exact_version and envelope.model_version > expect.model_version:
        raise DataError(f"{who}: trained from model {envelope.model_version}, newer than the server's "
                        f"{expect.model_version}")
    return pipeline.invert(update)


# -- the sync round --------------------------------------------------------------------

class Phase(enum.StrEnum):
    OPEN = "open"  # offers out, accepting uploads
    CLOSED = "closed"  # deadline, target count, or nobody pending: decide (aggregate / retry)


@dataclasses.dataclass(frozen=True)
class Counts:
    """Clients of one round over all its attempts (``rounds.csv``). Every selected
    client ends in exactly one of failed, late, arrived (aggregated), discarded (on time
    in an attempt with too few arrivals), rejected (its upload failed validation)."""

    selected: int = 0
    arrived: int = 0
    late: int = 0
    failed: int = 0
    discarded: int = 0
    rejected: int = 0
    retries: int = 0
    surplus: int = 0  # on time, but not among the random ``target`` taken (``window.take``)
    carried: int = 0  # late uploads of the round before, aggregated in this one (``window.late``)

    def add(self, **kw: int) -> Counts:
        return dataclasses.replace(self, **{k: getattr(self, k) + v for k, v in kw.items()})


@dataclasses.dataclass(frozen=True)
class RoundRules:
    """The round's policy, from config: close at ``target`` uploads (clients_per_round),
    aggregate only with at least ``min_clients``, at most ``max_retries`` retries. With
    ``take_random`` the round does not close at ``target``: it waits for its deadline (or
    everyone) and :func:`take_random` keeps a random ``target`` of the uploads."""

    target: int
    min_clients: int
    max_retries: int
    take_random: bool = False


@dataclasses.dataclass(frozen=True)
class SyncRound:
    """One sync round (all its attempts), immutable. Times are seconds from the start of
    the current attempt."""

    expect: Expected
    rules: RoundRules
    deadline_s: float
    phase: Phase = Phase.OPEN
    attempt: int = 0
    pending: frozenset[int] = frozenset()
    offered: tuple[int, ...] = ()  # in offer order
    uploads: tuple[Upload, ...] = ()
    arrivals_s: tuple[float, ...] = ()  # every upload's time, late ones too (the window learns them)
    end_s: float = 0.0
    counts: Counts = Counts()


def open_round(state: ServerState, rules: RoundRules, codec: str) -> SyncRound:
    """Round ``state.round + 1``, offering model ``state.model.version`` until the window's deadline."""
    return SyncRound(expect=Expected(round=state.round + 1, model_version=state.model.version, codec=codec),
                     rules=rules, deadline_s=state.window.deadline_s)


def offer(rnd: SyncRound, clients: Sequence[int] | np.ndarray) -> SyncRound:
    """The selected clients were sent the model; the round waits for them."""
    _require(rnd, Phase.OPEN, "offer")
    new = [int(c) for c in np.asarray(clients, dtype=np.int64).tolist() if int(c) not in rnd.pending and int(c) not in rnd.offered]
    return dataclasses.replace(rnd, pending=rnd.pending | frozenset(new), offered=(*rnd.offered, *new),
                               counts=rnd.counts.add(selected=len(new)))


def drop(rnd: SyncRound, client: int) -> SyncRound:
    """A selected client dropped out (failure report or lost connection)."""
    if client not in rnd.pending:
        return rnd
    return dataclasses.replace(rnd, pending=rnd.pending - {client}, counts=rnd.counts.add(failed=1))


def expire(rnd: SyncRound, now_s: float) -> SyncRound:
    """Close the round if its deadline has passed by ``now_s``."""
    if rnd.phase is Phase.OPEN and now_s > rnd.deadline_s:
        return close(rnd, rnd.deadline_s)
    return rnd


def close(rnd: SyncRound, at_s: float) -> SyncRound:
    _require(rnd, Phase.OPEN, "close")
    return dataclasses.replace(rnd, phase=Phase.CLOSED, end_s=float(at_s))


def _open_from(client: int, payload: bytes, spec: WireSpec, pipeline: Pipeline, expect: Expected) -> Update:
    """:func:`open_upload` of an upload that must come from ``client``; DataError otherwise."""
    update = open_upload(payload, spec, pipeline, expect)
    if update.client_id != client:
        raise DataError(f"upload from client {client} names client {update.client_id}")
    return update


def _full(rnd: SyncRound) -> bool:
    """The round holds its target of uploads and closes on it (not with a random take)."""
    return len(rnd.uploads) >= rnd.rules.target and not rnd.rules.take_random


def accept(rnd: SyncRound, client: int, payload: bytes, at_s: float, spec: WireSpec,
           pipeline: Pipeline) -> SyncRound:
    """An upload from ``client`` arrives at ``at_s``. Late (after the deadline or after the
    round closed) and foreign uploads are counted, not decoded; an upload that fails
    validation is rejected (logged). The round closes at the ``target``-th accepted
    upload, or when nobody is left pending."""
    rnd = expire(rnd, at_s)
    if client not in rnd.pending:
        logger.warning("round %d: ignored an upload from client %d, which has no open offer",
                       rnd.expect.round, client)
        return rnd
    pending = rnd.pending - {client}
    arrivals = (*rnd.arrivals_s, float(at_s))
    if rnd.phase is Phase.CLOSED:
        return dataclasses.replace(rnd, pending=pending, arrivals_s=arrivals, counts=rnd.counts.add(late=1))
    try:
        update = _open_from(client, payload, spec, pipeline, rnd.expect)
    except DataError as exc:
        logger.warning("round %d: rejected: %s", rnd.expect.round, exc)
        rnd = dataclasses.replace(rnd, pending=pending, arrivals_s=arrivals, counts=rnd.counts.add(rejected=1))
    else:
        rnd = dataclasses.replace(rnd, pending=pending, arrivals_s=arrivals,
                                  uploads=(*rnd.uploads, Upload(update, float(at_s), len(payload))))
    if _full(rnd) or not rnd.pending:
        return close(rnd, at_s)
    return rnd


def accept_late(rnd: SyncRound, late: Late, spec: WireSpec, pipeline: Pipeline) -> SyncRound:
    """The last round's late upload ``late`` comes ``late.after_s`` into this round: taken
    (checked against the round it was made for, one model version stale) if this round is
    still open, counting towards its target; otherwise left out. It is not one of the
    round's offers, and its time was learned by the window in its own round."""
    rnd = expire(rnd, late.after_s)
    if rnd.phase is Phase.CLOSED:
        return rnd
    try:
        update = _open_from(late.client, late.payload, spec, pipeline, late.expect)
    except DataError as exc:
        logger.warning("round %d: rejected a late upload of round %d: %s", rnd.expect.round, late.expect.round, exc)
        return rnd
    staleness = rnd.expect.model_version - late.expect.model_version
    rnd = dataclasses.replace(rnd, uploads=(*rnd.uploads, Upload(update, late.after_s, len(late.payload), staleness)))
    if _full(rnd):
        return close(rnd, late.after_s)
    return rnd


def take_random(rnd: SyncRound, rng: np.random.Generator) -> SyncRound:
    """A closed round under ``take_random`` with more than ``target`` uploads keeps a
    uniformly random ``target`` of them (the rest counted as surplus); otherwise unchanged."""
    _require(rnd, Phase.CLOSED, "take from")
    extra = len(rnd.uploads) - rnd.rules.target
    if not rnd.rules.take_random or extra <= 0:
        return rnd
    keep = np.sort(rng.choice(len(rnd.uploads), size=rnd.rules.target, replace=False))
    return dataclasses.replace(rnd, uploads=tuple(rnd.uploads[i] for i in keep.tolist()),
                               counts=rnd.counts.add(surplus=extra))


def enough(rnd: SyncRound) -> bool:
    """A closed round with at least ``min_clients`` uploads is aggregated."""
    return rnd.phase is Phase.CLOSED and len(rnd.uploads) >= rnd.rules.min_clients


def can_retry(rnd: SyncRound) -> bool:
    return rnd.phase is Phase.CLOSED and not enough(rnd) and rnd.attempt < rnd.rules.max_retries


def discard(rnd: SyncRound) -> SyncRound:
    """A closed attempt with too few uploads: its uploads are discarded (counted)."""
    _require(rnd, Phase.CLOSED, "discard")
    return dataclasses.replace(rnd, uploads=(), counts=rnd.counts.add(discarded=len(rnd.uploads), retries=1))


def retry(rnd: SyncRound, deadline_s: float) -> SyncRound:
    """The next attempt of a round whose attempt was discarded: nothing offered yet."""
    _require(rnd, Phase.CLOSED, "retry")
    if rnd.uploads:
        raise ValueError("retry: discard the closed attempt's uploads first")
    return dataclasses.replace(rnd, phase=Phase.OPEN, attempt=rnd.attempt + 1, deadline_s=deadline_s,
                               pending=frozenset(), offered=(), arrivals_s=(), end_s=0.0)


def uploads_in_offer_order(rnd: SyncRound) -> list[Upload]:
    """The accepted uploads in the order their clients were offered the round (the last
    round's late ones first, by client): what the aggregator gets, so that its float sums
    do not depend on arrival order (which real networks do not repeat)."""
    rank = {c: i for i, c in enumerate(rnd.offered)}
    return sorted(rnd.uploads, key=lambda u: (1, rank[u.update.client_id]) if u.staleness == 0
                  else (0, u.update.client_id))


def updates_in_offer_order(rnd: SyncRound) -> list[Update]:
    """The updates of :func:`uploads_in_offer_order`."""
    return [u.update for u in uploads_in_offer_order(rnd)]


def finish(rnd: SyncRound) -> SyncRound:
    """The counts of a closed round that is aggregated: its uploads arrived (the last
    round's late ones: carried)."""
    _require(rnd, Phase.CLOSED, "finish")
    carried = sum(1 for u in rnd.uploads if u.staleness)
    return dataclasses.replace(rnd, counts=rnd.counts.add(arrived=len(rnd.uploads) - carried, carried=carried))


def _require(rnd: SyncRound, phase: Phase, what: str) -> None:
    if rnd.phase is not phase:
        raise ValueError(f"round {rnd.expect.round} is {rnd.phase.value}; cannot {what} it")


# -- the async buffer ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Buffer:
    """FedBuff's buffer: uploads with their staleness, until ``size`` of them."""

    size: int
    max_staleness: int
    codec: str
    uploads: tuple[Upload, ...] = ()
    staleness: tuple[int, ...] = ()
    stale: int = 0
    rejected: int = 0

    @property
    def full(self) -> bool:
        return len(self.uploads) >= self.size


def buffer_accept(buf: Buffer, payload: bytes, at_s: float, spec: WireSpec, pipeline: Pipeline,
                  version: int) -> Buffer:
    """An upload arrives while the server's model is ``version``: rejected if invalid,
    dropped as stale when trained more than ``max_staleness`` versions ago."""
    try:
        update = open_upload(payload, spec, pipeline,
                             Expected(round=version, model_version=version, codec=buf.codec, exact_version=False))
    except DataError as exc:
        logger.warning("async step %d: rejected: %s", version, exc)
        return dataclasses.replace(buf, rejected=buf.rejected + 1)
    staleness = version - update.base_version
    if staleness > buf.max_staleness:
        return dataclasses.replace(buf, stale=buf.stale + 1)
    return dataclasses.replace(buf, uploads=(*buf.uploads, Upload(update, float(at_s), len(payload))),
                               staleness=(*buf.staleness, staleness))


def buffer_weights(buf: Buffer, max_weight: float) -> np.ndarray:
    return server_weights([u.update.num_examples for u in buf.uploads], max_weight, buf.staleness)


def drain(buf: Buffer) -> Buffer:
    """The buffer after the server applied it (counters kept)."""
    return dataclasses.replace(buf, uploads=(), staleness=())


def deadline_or(rnd: SyncRound, fallback: float) -> float:
    """The time an attempt that is still open at the end of its events closes: its
    deadline, or ``fallback`` (the last event) when it has none."""
    return rnd.deadline_s if math.isfinite(rnd.deadline_s) else fallback
