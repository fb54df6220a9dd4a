"""Execution backends for client updates: in-process, process pool, Ray.

Every backend runs the same :func:`run_job` on a worker context that owns an opened
dataset and a scratch model; results come back in job order, so aggregation sees the
same sequence whatever the backend. Client updates run single-threaded
(:func:`adfed.fl.client.client_update`), which makes them bitwise identical across
in-process and process-pool backends.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from adfed.config import Config
from adfed.data.examples import Examples
from adfed.data.store import Dataset
from adfed.fl.client import ClientTask, client_update, needed_rows
from adfed.fl.population import Population
from adfed.fl.types import ClientSettings, SparseRows, Update
from adfed.fl.wire import Entry, encoded_size, tensor_layout, update_size
from adfed.model.groups import check_round_tensors


@dataclasses.dataclass(frozen=True)
class RoundModel:
    """The global model as sent in one round (tables are read, never written, by workers)."""

    version: int
    dense: dict[str, torch.Tensor]
    tables: dict[str, torch.Tensor]
    settings: ClientSettings


@dataclasses.dataclass(frozen=True)
class Job:
    client_id: int
    local: dict[str, torch.Tensor] | None
    seed: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ClientResult:
    update: Update
    local: dict[str, torch.Tensor]
    bytes_down: int  # dense model + the rows this client needs, serialized
    bytes_up: int  # the serialized update
    bytes_up_dense: int  # tensor bytes of its dense_shared part (within bytes_up)
    bytes_up_sparse: int  # tensor bytes of its sparse_shared ids and rows (within bytes_up)


class WorkerContext:
    """What a worker keeps between jobs: the dataset and a scratch model."""

    def __init__(self, data_path: str | Path, cfg: Config) -> None:
        from adfed.trainer import model_from_config

        dataset = Dataset.open(data_path)
        self.population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
        self.scratch = model_from_config(cfg, dataset, user_rows=1)
        # (version, download bytes of the dense part, wire layout of a dense delta)
        self._dense_wire: tuple[int, int, list[Entry]] = (-1, 0, [])
        self._checked: tuple[int, int] = (-1, 0)

    def check(self, model: RoundModel) -> None:
        """Check the round's dense part and tables once per version (not per client)."""
        key = (model.version, id(model.dense))
        if self._checked != key:
            check_round_tensors(model.dense, f"round model {model.version}")
            check_round_tensors(model.tables, f"round model {model.version}")
            self._checked = key

    def dense_bytes(self, model: RoundModel) -> int:
        return self._dense(model)[1]

    def dense_delta_layout(self, model: RoundModel) -> list[Entry]:
        """The wire layout of a dense delta of ``model`` (its dense part's, as ``dense/*``)."""
        return self._dense(model)[2]

    def _dense(self, model: RoundModel) -> tuple[int, int, list[Entry]]:
        if self._dense_wire[0] != model.version:
            self._dense_wire = (model.version, encoded_size(model.dense), tensor_layout(model.dense, "dense/"))
        return self._dense_wire


def run_job(ctx: WorkerContext, model: RoundModel, job: Job, data: Examples | None = None) -> ClientResult:
    """Download (dense + needed rows), train, and encode one client's update.

    ``data`` is the client's training data when the caller has already read it
    (:meth:`Population.train_data_many`); otherwise it is read here.
    """
    if data is None:
        data = ctx.population.train_data(job.client_id)
    ctx.check(model)
    ids = needed_rows(ctx.scratch, data)
    rows = {t: SparseRows(i, model.tables[t][i]) for t, i in ids.items()}
    task = ClientTask(client_id=job.client_id, version=model.version, settings=model.settings,
                      dense=model.dense, rows=rows, local=job.local, seed=job.seed, checked=True)
    update, local = client_update(ctx.scratch, task, data)
    rows_down = {f"{t}.ids": r.ids for t, r in rows.items()} | {f"{t}.rows": r.values for t, r in rows.items()}
    bytes_down = ctx.dense_bytes(model) + encoded_size(rows_down)
    sparse_bytes = sum(_nbytes(r.ids) + _nbytes(r.values) for r in update.sparse.values())
    return ClientResult(update=update, local=local, bytes_down=bytes_down,
                        bytes_up=update_size(update, ctx.dense_delta_layout(model)),
                        bytes_up_dense=sum(_nbytes(t) for t in update.dense.values()),
                        bytes_up_sparse=sparse_bytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Backend(Protocol):
    def map(self, model: RoundModel, jobs: Sequence[Job]) -> list[ClientResult]: ...

    def close(self) -> None: ...


class InProcessBackend:
    """Runs clients one after another in this process (the default)."""

    def __init__(self, data_path: str | Path, cfg: Config) -> None:
        self.ctx = WorkerContext(data_path, cfg)

    def map(self, model: RoundModel, jobs: Sequence[Job]) -> list[ClientResult]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # once per round, not once per client (see client_update)
        try:
            datas = self.ctx.population.train_data_many(np.array([j.client_id for j in jobs], dtype=np.int64))
            return [run_job(self.ctx, model, job, data) for job, data in zip(jobs, datas, strict=True)]
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        pass


_WORKER: WorkerContext | None = None


def _init_worker(data_path: str, cfg: Config) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = WorkerContext(data_path, cfg)


def _run_in_worker(model: RoundModel, job: Job) -> ClientResult:
    if _WORKER is None:  # pragma: no cover - initializer always runs first
        raise RuntimeError("worker context not initialised")
    return run_job(_WORKER, model, job)


class ProcessBackend:
    """A pool of worker processes (spawned: no forked torch thread pools)."""

    def __init__(self, data_path: str | Path, cfg: Config) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.workers = cfg.fl.workers
        self.pool = ProcessPoolExecutor(max_workers=cfg.fl.workers, mp_context=ctx,
                                        initializer=_init_worker, initargs=(str(data_path), cfg))

    def map(self, model: RoundModel, jobs: Sequence[Job]) -> list[ClientResult]:
        chunk = max(1, len(jobs) // (4 * self.workers))
        return list(self.pool.map(_run_in_worker, [model] * len(jobs), jobs, chunksize=chunk))

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

            def run(self, model: RoundModel, jobs: list[Job]) -> list[ClientResult]:
                return [run_job(self.ctx, model, j) for j in jobs]

        # ray.remote turns the class into an ActorClass; mypy still sees the plain class
        self.actors = [_Actor.remote(str(data_path), cfg)  # type: ignore[attr-defined]
                       for _ in range(cfg.fl.workers)]

    def map(self, model: RoundModel, jobs: Sequence[Job]) -> list[ClientResult]:
        ref = self.ray.put(model)
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


def create_backend(name: str, data_path: str | Path, cfg: Config) -> Backend:
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"fl.backend must be one of {sorted(BACKENDS)}; got {name!r}") from None
    return factory(data_path, cfg)
