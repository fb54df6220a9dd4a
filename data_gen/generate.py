"""Stream a whole synthetic world to disk.

Users are cut into chunks of ``chunk_users`` consecutive ids; worker processes build
each chunk's tables (users, devices, impressions + truth, requests) with the pure
functions of this package, and the parent writes them in chunk order through
:class:`adfed.data.layout.DatasetWriter`. At most ``2 * workers`` chunks are in flight,
so memory is bounded by the chunk size, not by ``num_users``. The output is
byte-identical for the same ``(params, seed, chunk_users)``, whatever ``workers``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Generator
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from adfed.data.layout import DatasetWriter
from adfed.errors import DataError
from data_gen.ads import ads_table
from data_gen.calibrate import build_world
from data_gen.devices import devices_from_state
from data_gen.impressions import impressions_from_state
from data_gen.params import WorldParams
from data_gen.requests import requests_from_state
from data_gen.truth import user_truth_features
from data_gen.users import user_state, users_table_from_state
from data_gen.world import World

logger = logging.getLogger(__name__)

GENERATOR = "adfed.data_gen"
DEFAULT_CHUNK_USERS = 4096


def world_from_manifest(manifest: dict[str, Any], where: str = "manifest.json") -> World | None:
    """The world that wrote a dataset with this ``manifest.json`` (``where``: its path, for
    errors); None when another program (an importer) wrote it."""
    if manifest.get("generator") != GENERATOR:
        return None
    params = manifest.get("params")
    try:
        return build_world(WorldParams.from_dict(params), int(params["seed"]))  # type: ignore[arg-type,index]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        what = "has no 'params'" if not isinstance(params, dict) else \
            f"holds 'params' that are not a generated world's ({type(exc).__name__}: {exc})"
        raise DataError(f"{where}: written by {GENERATOR} but {what}; regenerate the dataset with adfed data "
                        f"generate --overwrite") from exc


@dataclasses.dataclass(frozen=True)
class ChunkTables:
    """All tables of one chunk of consecutive users."""

    users: pa.Table
    devices: pa.Table
    impressions: pa.Table
    truth: pa.Table
    requests: pa.Table


def chunk_tables(world: World, start: int, stop: int) -> ChunkTables:
    """Tables of users ``start .. stop-1`` (one user state, shared by every table)."""
    st = user_state(world, np.arange(start, stop, dtype=np.int64))
    uf = user_truth_features(world, st)
    imp, truth = impressions_from_state(world, st, uf)
    return ChunkTables(users=users_table_from_state(st), devices=devices_from_state(world, st),
                       impressions=imp, truth=truth, requests=requests_from_state(world, st, uf))


# Per-process world of a pool worker, built once by _init_worker (spawned processes share
# nothing with the parent).
_WORKER_WORLD: World | None = None


def _init_worker(params: WorldParams, seed: int) -> None:
    global _WORKER_WORLD
    _WORKER_WORLD = build_world(params, seed)


def _work(bounds: tuple[int, int]) -> ChunkTables:
    if _WORKER_WORLD is None:
        raise RuntimeError("data_gen worker used before _init_worker")
    return chunk_tables(_WORKER_WORLD, *bounds)


def _ordered_results(world: World, starts: range, chunk_users: int,
                     workers: int) -> Generator[ChunkTables, None, None]:
    """Chunk tables in order; a pool with at most ``2 * workers`` chunks in flight.

    With fewer chunks than two per worker, processes would cost more to start than they
    save: the chunks are built here.
    """
    n = world.params.num_users
    bounds = ((s, min(s + chunk_users, n)) for s in starts)  # lazy: O(1) memory
    if workers <= 1 or len(starts) < 2 * workers:
        for b in bounds:
            yield chunk_tables(world, *b)
        return
    ctx = mp.get_context("spawn")  # safe after torch or threads were started in the parent
    with ctx.Pool(workers, initializer=_init_worker,
                  initargs=(world.params, world.seed)) as pool:
        pending: deque[AsyncResult[ChunkTables]] = deque()
        for b in itertools.islice(bounds, 2 * workers):
            pending.append(pool.apply_async(_work, (b,)))
        while pending:
            result = pending.popleft().get()
            nxt = next(bounds, None)
            if nxt is not None:
                pending.append(pool.apply_async(_work, (nxt,)))
            yield result


def generate(
    out: Path,
    params: WorldParams,
    *,
    seed: int,
    workers: int = 2,
    chunk_users: int = DEFAULT_CHUNK_USERS,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Generate the world ``(params, seed)`` into directory ``out``.

    Parameters
    ----------
    out : target directory (written as ``out.partial`` and renamed when complete).
    params : world parameters.
    seed : world seed, an int >= 0.
    workers : worker processes; 1 builds every chunk in this process.
    chunk_users : users per chunk (memory per chunk is roughly 2 KiB per user).
    overwrite : replace an existing ``out``.
    progress : called with the number of users of each chunk once it is written.

    Returns
    -------
    The dataset directory ``out``.

    Raises
    ------
    ValueError : bad ``workers`` / ``chunk_users`` / ``seed``.
    adfed.errors.DataError : ``out`` exists and ``overwrite`` is False.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1; got {workers!r}")
    if not isinstance(chunk_users, int) or chunk_users < 1:
        raise ValueError(f"chunk_users must be an int >= 1; got {chunk_users!r}")
    world = build_world(params, seed)
    writer = DatasetWriter(Path(out), schema=world.schema, generator=GENERATOR,
                           params={**params.to_dict(), "seed": seed}, overwrite=overwrite)
    try:
        writer.write_ads(ads_table(world))
        starts = range(0, params.num_users, chunk_users)
        results = contextlib.closing(_ordered_results(world, starts, chunk_users, workers))
        with results as chunks:  # closing stops the pool at once if writing fails
            for start, t in zip(starts, chunks, strict=True):
                stop = min(start + chunk_users, params.num_users)
                writer.write_users(t.users)
                writer.write_devices(t.devices)
                writer.write_impressions(t.impressions, t.truth)
                writer.write_requests(t.requests)
                logger.debug("data_gen: users %d..%d written", start, stop)
                if progress is not None:
                    progress(stop - start)
    except BaseException:
        writer.abort()
        raise
    return writer.close(extra={"generation": {"chunk_users": chunk_users}})
