"""Execution backends for client updates: in-process, process pool, Ray.

Every backend runs the same :func:`run_job` (a phone's side of a round: decode what it
downloads, train, transform, encode what it uploads) on a worker context that owns an
opened dataset and a scratch model; results come back in job order, so the server sees
the same sequence whatever the backend. Client updates run single-threaded
(:func:`adfed.fl.client.client_update`), which makes them bitwise identical across
in-process and process-pool backends.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

import adfed.privacy  # noqa: F401 - registers the DP transforms in every worker
from adfed.config import Config
from adfed.data.examples import Examples
from adfed.data.store import Dataset
from adfed.errors import DataError
from adfed.fl import blocks, pipeline
from adfed.fl.batched import client_updates, one_step, unsupported
from adfed.fl.client import ClientTask, client_update, needed_rows
from adfed.fl.population import Population
from adfed.fl.types import ClientSettings, SparseRows, Update
from adfed.fl.wire import Envelope, WireSpec, decode_model, decode_rows, encode_rows, encode_update
from adfed.model.assembly import model_from_config
from adfed.model.groups import touched_rows_many
from adfed.model.pcvr import PCVRModel

logger = logging.getLogger(__name__)
#: one phone's local training (:func:`~adfed.fl.client.client_update`'s signature)
Train = Callable[[PCVRModel, ClientTask, Examples], tuple[Update, dict[str, torch.Tensor]]]
#: the reasons run_jobs could not batch, logged once each per process
_LOGGED: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Offer:
    """What the server sends the phones of one round (or async server step).

    ``model`` is the encoded ``dense_shared`` part (:func:`~adfed.fl.wire.encode_model`,
    made once per version and sent to every phone as is); ``tables`` are the server's
    ``sparse_shared`` tables, from which the row service answers each phone's request
    for the rows its data reads (read, never written, by workers); ``spec`` is what
    payloads are checked against. ``vocabulary`` (privacy on): per sparse table the
    round's row ids; phones then download and upload blocks over them
    (:mod:`adfed.fl.blocks`) instead of the rows they read.
    """

    round: int
    version: int
    settings: ClientSettings
    model: bytes
    tables: dict[str, torch.Tensor]
    spec: WireSpec
    vocabulary: dict[str, torch.Tensor] | None = None


@dataclasses.dataclass(frozen=True)
class Job:
    """One phone's work: ``phone`` is what its local store holds (its ``local`` group and
    the update pipeline's state; None: nothing yet)."""

    client_id: int
    phone: dict[str, torch.Tensor] | None
    seed: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ClientResult:
    """What a phone did: the encoded upload, its new local store entry, the bytes it
    downloaded (model + its rows, as encoded) and how many examples it trained on
    (the phone's own count, for simulated compute time; the server reads the reported
    count from the payload)."""

    client_id: int
    payload: bytes
    phone: dict[str, torch.Tensor]
    bytes_down: int
    num_examples: int


class WorkerContext:
    """What a worker keeps between jobs: the dataset, a scratch model, the update
    pipeline, and the decoded model of the current version."""

    def __init__(self, data_path: str | Path, cfg: Config, population: Population | None = None) -> None:
        if population is None:
            dataset = Dataset.open(data_path)
            population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
        self.population = population
        self.scratch = model_from_config(cfg, population.dataset, user_rows=1)
        self.pipeline = pipeline.build(cfg)
        self._model: tuple[tuple[int, int], dict[str, torch.Tensor]] = ((-1, -1), {})

    def dense(self, offer: Offer) -> dict[str, torch.Tensor]:
        """The offer's model, decoded (and validated) once per round and version."""
        key = (offer.round, offer.version)
        if self._model[0] != key:
            envelope, dense = decode_model(offer.model, offer.spec)
            if (envelope.round, envelope.model_version) != key:
                raise DataError(f"the model payload is for round {envelope.round} / model "
                                f"{envelope.model_version}; the offer is for {key[0]} / {key[1]}")
            self._model = (key, dense)
        return self._model[1]


def _serve_many(offer: Offer, reads: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, SparseRows]]:
    """The rows each phone reads (``reads``: its ids per table) as it trains on them: from
    the offer's tables, one gather per table for all phones (each phone's values a view
    of it); in a round with a vocabulary, what :func:`blocks.phone_rows` makes of the
    served blocks (the table's rows in the vocabulary, zero rows outside it; tables
    without a block are not served)."""
    out: list[dict[str, SparseRows]] = [{} for _ in reads]
    if not reads:
        return out
    vocab = offer.vocabulary
    for table in reads[0]:
        if vocab is not None and table not in vocab:
            continue
        ids = [r[table] for r in reads]
        flat = torch.cat(ids)
        if vocab is None:
            values = offer.tables[table][flat]
        else:
            values = blocks.phone_rows(blocks.serve_block(offer.tables[table], vocab[table]), flat).values
        for served, i, v in zip(out, ids, values.split([len(i) for i in ids]), strict=True):
            served[table] = SparseRows(i, v)
    return out


def run_job(ctx: WorkerContext, offer: Offer, job: Job, data: Examples | None = None, *,
            train: Train = client_update, reads: dict[str, torch.Tensor] | None = None,
            served: dict[str, SparseRows] | None = None) -> ClientResult:
    """One phone's round: download the model and the rows it needs (both decoded from
    their wire bytes), train, run the update pipeline, encode the upload.

    ``data`` is the client's training data when the caller has already read it
    (:meth:`Population.train_data_many`); otherwise it is read here. ``train`` is the
    local training (:func:`run_jobs` passes updates trained batched). ``reads`` (the
    rows its data reads, :func:`needed_rows`) and ``served`` (those rows from the
    offer's tables, without a vocabulary) are what :func:`run_jobs` computed for all
    phones at once; computed here when absent.
    """
    if data is None:
        data = ctx.population.train_data(job.client_id)
    dense = ctx.dense(offer)
    codec = ctx.pipeline.codec
    ids = needed_rows(ctx.scratch, data) if reads is None else reads
    vocab = offer.vocabulary
    if vocab is None:  # the rows it reads
        if served is None:
            served = {t: SparseRows(i, offer.tables[t][i]) for t, i in ids.items()}
    else:  # the round's vocabulary blocks, whatever it reads
        served = {t: blocks.serve_block(offer.tables[t], v) for t, v in vocab.items()}
    rows_payload = encode_rows(served, Envelope("rows", offer.round, offer.version, codec, job.client_id))
    _, rows = decode_rows(rows_payload, offer.spec)
    if vocab is not None:
        rows = {t: blocks.phone_rows(rows[t], i) for t, i in ids.items() if t in rows}
    task = ClientTask(client_id=job.client_id, version=offer.version, settings=offer.settings,
                      dense=dense, rows=rows, local=job.phone, seed=job.seed, checked=True)
    update, local = train(ctx.scratch, task, data)
    if vocab is not None:
        update = dataclasses.replace(update, sparse={
            t: blocks.upload_block(update.sparse.get(t), v, offer.spec.tables[t][1]) for t, v in vocab.items()})
    kept: dict[str, torch.Tensor] = {}
    if not ctx.pipeline.plain:  # deriving the RNG alone costs ~40 us
        update, kept = ctx.pipeline.apply(update, np.random.default_rng([*job.seed, 0x919E]), job.phone,
                                          offer.settings)
    payload = encode_update(update, Envelope("update", offer.round, offer.version, codec, job.client_id))
    return ClientResult(client_id=job.client_id, payload=payload, phone={**local, **kept},
                        bytes_down=len(offer.model) + len(rows_payload), num_examples=len(data))


class Backend(Protocol):
    def map(self, offer: Offer, jobs: Sequence[Job]) -> list[ClientResult]: ...

    def close(self) -> None: ...


def _same_download(a: ClientTask, b: ClientTask) -> bool:
    """True when two tasks of one phone train on the same model, rows and local state."""
    return (a.client_id == b.client_id and a.version == b.version and a.settings == b.settings
            and a.local is b.local and a.rows.keys() == b.rows.keys()
            and all(torch.equal(a.rows[t].ids, b.rows[t].ids) for t in a.rows))


def run_jobs(ctx: WorkerContext, offer: Offer, jobs: Sequence[Job], data: Examples, offsets: np.ndarray, *,
             batched: bool = True) -> list[ClientResult]:
    """:func:`run_job` of every job, phone ``i`` on rows ``offsets[i]:offsets[i + 1]`` of
    ``data``; the phones that run one local step train together first
    (:func:`adfed.fl.batched.client_updates`: the same updates within float rounding),
    the others (and all, with ``batched=False`` or settings the batched path cannot
    express, logged once per reason) with :func:`~adfed.fl.client.client_update`.

    Each phone still downloads, decodes, transforms (clipping and noise, with privacy on)
    and encodes on its own in :func:`run_job`; a phone whose decoded download differs from
    what it was trained on (it cannot: both are served from the offer's tables, through
    the round's vocabulary blocks when it has one) is trained again on its own.
    """
    datas = [data.slice(int(a), int(b)) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]
    reason = unsupported(offer.settings, ctx.scratch) if batched else None
    if reason is not None and reason not in _LOGGED:
        _LOGGED.add(reason)
        logger.info("clients train one by one: %s", reason)
    take = [i for i, d in enumerate(datas) if one_step(len(d), offer.settings)] if batched and reason is None else []
    reads = touched_rows_many(ctx.scratch, data, offsets)
    served = _serve_many(offer, reads)  # what each phone trains on (run_job decodes its own download)
    trained: dict[int, tuple[ClientTask, tuple[Update, dict[str, torch.Tensor]]]] = {}
    if len(take) > 1:
        dense = ctx.dense(offer)
        tasks = [ClientTask(client_id=jobs[i].client_id, version=offer.version, settings=offer.settings, dense=dense,
                            rows=served[i], local=jobs[i].phone, seed=jobs[i].seed, checked=True) for i in take]
        if len(take) == len(jobs):
            part, part_offsets = data, offsets
        else:
            counts = np.diff(offsets)[take]
            part = data.take(np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in take]))
            part_offsets = np.concatenate([[0], np.cumsum(counts)])
        for i, task, result in zip(take, tasks, client_updates(ctx.scratch, tasks, part, part_offsets), strict=True):
            trained[i] = (task, result)

    def train_of(i: int) -> Train:
        def train(scratch: PCVRModel, task: ClientTask, d: Examples) -> tuple[Update, dict[str, torch.Tensor]]:
            done = trained.pop(i, None)
            if done is not None and _same_download(done[0], task):
                return done[1]
            return client_update(scratch, task, d)
        return train

    plain = offer.vocabulary is None  # with a vocabulary run_job serves the blocks itself
    return [run_job(ctx, offer, job, d, train=train_of(i), reads=reads[i], served=served[i] if plain else None)
            for i, (job, d) in enumerate(zip(jobs, datas, strict=True))]


def _parts(jobs: Sequence[Job], workers: int) -> list[list[Job]]:
    """The round's jobs as ``workers`` contiguous parts (fewer when there are fewer jobs):
    what each process worker trains batched. The in-process backend trains the same parts,
    as a batched update is the same bits only among the same phones (float rounding
    depends on the rows that share the pass)."""
    bounds = np.linspace(0, len(jobs), min(workers, len(jobs)) + 1).round().astype(int).tolist()
    return [list(jobs[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


class InProcessBackend:
    """Runs clients in this process (the default): the phones of a round that run one
    local step train together (:func:`run_jobs`), unless ``batched`` is set False; in
    the process backend's parts (:func:`_parts`), so both give the same bits."""

    #: train one-step phones together (False: one by one, the reference path)
    batched: bool = True

    def __init__(self, data_path: str | Path, cfg: Config, population: Population | None = None) -> None:
        # the simulation's own population when given (opening the dataset again would hold
        # its index and device profiles twice: ~1.4 GB at 10M users)
        self.ctx = WorkerContext(data_path, cfg, population)
        self.workers = cfg.fl.workers

    def map(self, offer: Offer, jobs: Sequence[Job]) -> list[ClientResult]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # once per round, not once per client (see client_update)
        try:
            out: list[ClientResult] = []
            for part in _parts(jobs, self.workers):
                data, offsets = self.ctx.population.train_data_joined(
                    np.array([j.client_id for j in part], dtype=np.int64))
                out.extend(run_jobs(self.ctx, offer, part, data, offsets, batched=self.batched))
            return out
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        pass


_WORKER: WorkerContext | None = None


def _init_worker(data_path: str, cfg: Config) -> None:
    global _WORKER
    # Ctrl-C reaches the whole process group: the workers finish their jobs and the main
    # process decides (it stops after the round in progress: simulation._StopAtRoundEnd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    _WORKER = WorkerContext(data_path, cfg)


#: A phone's local store entry as it crosses to or from a worker process: numpy arrays.
#: Tensors would cross by torch's file-descriptor sharing, one descriptor per tensor, and
#: the few thousand small local tensors of 1000-phone rounds exhaust the descriptors within
#: a few rounds ("received 0 items of ancdata"); arrays are pickled as bytes.
PlainPhone = dict[str, np.ndarray] | None
#: A job (client id, phone, seed) and a result (client id, payload, phone, bytes down,
#: examples) in that form.
PlainJob = tuple[int, PlainPhone, tuple[int, ...]]
PlainResult = tuple[int, bytes, PlainPhone, int, int]


def _plain(phone: dict[str, torch.Tensor] | None) -> PlainPhone:
    return None if phone is None else {k: v.detach().numpy() for k, v in phone.items()}


def _tensors(phone: PlainPhone) -> dict[str, torch.Tensor] | None:
    return None if phone is None else {k: torch.from_numpy(v) for k, v in phone.items()}


def _run_in_worker(offer: Offer, jobs: list[PlainJob]) -> list[PlainResult]:
    if _WORKER is None:  # pragma: no cover - initializer always runs first
        raise RuntimeError("worker context not initialised")
    real = [Job(client_id=c, phone=_tensors(phone), seed=seed) for c, phone, seed in jobs]
    data, offsets = _WORKER.population.train_data_joined(np.array([j.client_id for j in real], dtype=np.int64))
    return [(r.client_id, r.payload, _plain(r.phone), r.bytes_down, r.num_examples)
            for r in run_jobs(_WORKER, offer, real, data, offsets)]


class ProcessBackend:
    """A pool of worker processes (spawned: no forked torch thread pools), kept for the
    whole run. A round's jobs go out as ``workers`` contiguous parts, one task each (the
    offer is pickled once per part), and each worker runs its part like the in-process
    backend (:func:`run_jobs`: one read, one batched pass), so both give the same bits."""

    def __init__(self, data_path: str | Path, cfg: Config) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.workers = cfg.fl.workers
        self.pool = ProcessPoolExecutor(max_workers=cfg.fl.workers, mp_context=ctx,
                                        initializer=_init_worker, initargs=(str(data_path), cfg))

    def map(self, offer: Offer, jobs: Sequence[Job]) -> list[ClientResult]:
        parts = [[(j.client_id, _plain(j.phone), j.seed) for j in part] for part in _parts(jobs, self.workers)]
        return [ClientResult(client_id=c, payload=payload, phone=_tensors(phone) or {}, bytes_down=down,
                             num_examples=n)
                for part in self.pool.map(_run_in_worker, [offer] * len(parts), parts)
                for c, payload, phone, down, n in part]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayBackend:
    """Ray actors, each with its own worker context (``pip install 'adfed[ray]'``)."""

    def __init__(self, data_path: str | Path, cfg: Config) -> None:
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ValueError("fl.backend = 'ray' needs Ray: pip install 'adfed[ray]'") from exc
        self.ray = ray
        self._started = False
        if not ray.is_initialized():
            ray.init(num_cpus=cfg.fl.workers, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            self._started = True

        @ray.remote(num_cpus=1)
        class _Actor:
            def __init__(self, path: str, config: Config) -> None:
                torch.set_num_threads(1)
                self.ctx = WorkerContext(path, config)

            def run(self, offer: Offer, jobs: list[Job]) -> list[ClientResult]:
                return [run_job(self.ctx, offer, j) for j in jobs]

        # ray.remote turns the class into an ActorClass; mypy still sees the plain class
        self.actors = [_Actor.remote(str(data_path), cfg)  # type: ignore[attr-defined]
                       for _ in range(cfg.fl.workers)]

    def map(self, offer: Offer, jobs: Sequence[Job]) -> list[ClientResult]:
        ref = self.ray.put(offer)
        n = len(self.actors)
        parts = [list(jobs[i::n]) for i in range(n)]
        futures = [a.run.remote(ref, p) for a, p in zip(self.actors, parts, strict=True)]
        results: list[Any] = self.ray.get(futures)
        out: list[ClientResult | None] = [None] * len(jobs)
        for i, part in enumerate(results):
            for j, res in enumerate(part):
                out[i + j * n] = res
        return [r for r in out if r is not None]

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._started:
            self.ray.shutdown()


BACKENDS: dict[str, Callable[[str | Path, Config], Backend]] = {
    "inprocess": InProcessBackend, "process": ProcessBackend, "ray": RayBackend}


def create_backend(name: str, data_path: str | Path, cfg: Config, population: Population | None = None) -> Backend:
    """The backend ``name``; the in-process one shares ``population`` (the simulation's),
    the others open the dataset in their own processes."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"fl.backend must be one of {sorted(BACKENDS)}; got {name!r}") from None
    if name == "inprocess" and population is not None:
        return InProcessBackend(data_path, cfg, population)
    return factory(data_path, cfg)
