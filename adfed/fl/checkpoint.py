"""The federated run's checkpoint: one safetensors file, tensors plus JSON state.

Nothing is pickled: the tensors (global model, server optimizer state, the phones'
local store, in-flight async uploads as raw bytes) are safetensors entries; everything
else (round, clock, window, counters, the rows so far, settings) is JSON in the file's
metadata under ``adfed``. Reading it can only produce tensors and JSON values, whatever
the file holds. Written to a temporary file and renamed, so a crash leaves the previous
checkpoint whole.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adfed.errors import ConfigError
from adfed.fl.fedbuff import AsyncState, Event, Started
from adfed.fl.population import LocalStore
from adfed.fl.server import Expected, Late, ServerState
from adfed.fl.types import GlobalState, Passes
from adfed.fl.window import WindowState
from adfed.fl.wirespec import read_header

CHECKPOINT = "checkpoint.safetensors"
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    state: ServerState
    rows: list[dict[str, Any]]
    async_state: AsyncState
    store: LocalStore
    wall_s: float
    settings: dict[str, Any]


def _flatten(prefix: str, tree: Any, out: dict[str, torch.Tensor]) -> Any:
    """Tensors of a nested dict go to ``out`` under ``prefix/key/...``; returns the
    tree's shape with each tensor replaced by its key."""
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree.detach().contiguous().clone()
        return {"$tensor": prefix}
    if isinstance(tree, dict):
        return {k: _flatten(f"{prefix}/{k}", v, out) for k, v in tree.items()}
    return tree


def _unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"$tensor"}:
            return tensors[tree["$tensor"]]
        return {k: _unflatten(v, tensors) for k, v in tree.items()}
    return tree


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.zeros(0, dtype=torch.uint8)


def _store_entries(store: LocalStore, out: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The LRU order and, per key, the phones holding it and their stacked values
    (:meth:`LocalStore.packed`: only what changed since the last checkpoint is read)."""
    out["store/order"] = torch.from_numpy(np.fromiter(store.entries.keys(), dtype=np.int64, count=len(store.entries)))
    keys = {}
    for i, (k, (holders, values)) in enumerate(sorted(store.packed().items())):
        out[f"store/{i}/users"] = holders
        out[f"store/{i}/values"] = values
        keys[str(i)] = k
    return {"keys": keys, "evicted": store.evicted, "capacity": store.capacity}


def _restore_store(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LocalStore:
    entries: collections.OrderedDict[int, dict[str, torch.Tensor]] = collections.OrderedDict(
        (int(u), {}) for u in tensors["store/order"].tolist())
    for i, k in meta["keys"].items():
        for u, value in zip(tensors[f"store/{i}/users"].tolist(), tensors[f"store/{i}/values"], strict=True):
            entries[int(u)][k] = value
    return LocalStore(capacity=int(meta["capacity"]), entries=entries, evicted=int(meta["evicted"]))


def _async(st: AsyncState, out: dict[str, torch.Tensor]) -> dict[str, Any]:
    events = []
    for i, e in enumerate(st.events):
        if e.payload is not None:
            out[f"async/{i}/payload"] = _bytes_tensor(e.payload)
        phone = _flatten(f"async/{i}/phone", e.phone, out) if e.phone is not None else None
        events.append({"at_s": e.at_s, "seq": e.seq, "client": e.client, "bytes_down": e.bytes_down,
                       "payload": e.payload is not None, "phone": phone})
    return {"clock_s": st.clock_s, "seq": st.seq, "failed": st.failed, "events": events,
            "pending": [[p.start_s, p.seq, p.client] for p in st.pending]}


def _restore_async(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> AsyncState:
    events = tuple(
        Event(at_s=float(e["at_s"]), seq=int(e["seq"]), client=int(e["client"]),
              payload=tensors[f"async/{i}/payload"].numpy().tobytes() if e["payload"] else None,
              phone=_unflatten(e["phone"], tensors) if e["phone"] is not None else None,
              bytes_down=int(e["bytes_down"]))
        for i, e in enumerate(meta["events"]))
    pending = tuple(Started(float(s), int(q), int(c)) for s, q, c in meta["pending"])
    return AsyncState(clock_s=float(meta["clock_s"]), seq=int(meta["seq"]), events=events, pending=pending,
                      failed=int(meta["failed"]))


def _late(late: tuple[Late, ...], out: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """The last round's late uploads (``window.late = "next"``): payloads as tensors."""
    for i, u in enumerate(late):
        out[f"late/{i}/payload"] = _bytes_tensor(u.payload)
    return [{"client": u.client, "after_s": u.after_s, "bytes_down": u.bytes_down,
             "expect": dataclasses.asdict(u.expect)} for u in late]


def _restore_late(meta: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> tuple[Late, ...]:
    return tuple(Late(client=int(u["client"]), payload=tensors[f"late/{i}/payload"].numpy().tobytes(),
                      expect=Expected(**u["expect"]), after_s=float(u["after_s"]), bytes_down=int(u["bytes_down"]))
                 for i, u in enumerate(meta))


def encode(ck: Checkpoint) -> bytes:
    """The checkpoint as safetensors bytes (see module doc)."""
    tensors: dict[str, torch.Tensor] = {}
    s = ck.state
    meta = {
        "format": FORMAT,
        "server": {"version": s.model.version, "round": s.round, "sim_time_s": s.sim_time_s, "clip": s.clip,
                   "clips": [list(c) for c in s.clips],
                   "dense": _flatten("dense", s.model.dense, tensors),
                   "sparse": _flatten("sparse", s.model.sparse, tensors),
                   "average": None if s.average is None else {
                       "dense": _flatten("average/dense", s.average.dense, tensors),
                       "sparse": _flatten("average/sparse", s.average.sparse, tensors),
                       "version": s.average.version},
                   "opt_state": _flatten("opt", s.opt_state, tensors),
                   "window": {"deadline_s": s.window.deadline_s, "history": [list(h) for h in s.window.history]},
                   "passes": None if s.passes is None else {"number": s.passes.number, "cursor": s.passes.cursor,
                                                            "deferred": _flatten("passes/deferred", torch.from_numpy(
                                                                s.passes.deferred.astype(np.int64)), tensors)},
                   "late": _late(s.late, tensors)},
        "rows": ck.rows,
        "async": _async(ck.async_state, tensors),
        "store": _store_entries(ck.store, tensors),
        "wall_s": ck.wall_s,
        "settings": ck.settings,
    }
    return st_save(tensors, metadata={"adfed": json.dumps(meta)})


def decode(payload: bytes, where: Path) -> Checkpoint:
    """Inverse of :func:`encode`; a damaged or foreign file is a one-line ConfigError."""
    try:
        tensors = st_load(payload)
        meta = json.loads(read_header(payload, len(payload), str(where))[0]["adfed"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
        srv = meta["server"]
        window = WindowState(deadline_s=float(srv["window"]["deadline_s"]),
                             history=tuple(tuple(float(x) for x in h) for h in srv["window"]["history"]))
        model = GlobalState(dense=_unflatten(srv["dense"], tensors), sparse=_unflatten(srv["sparse"], tensors),
                            version=int(srv["version"]))
        avg = srv.get("average")  # absent in checkpoints from before fl.server_ema
        average = None if avg is None else GlobalState(
            dense=_unflatten(avg["dense"], tensors), sparse=_unflatten(avg["sparse"], tensors),
            version=int(avg["version"]))
        ps = srv.get("passes")  # absent in checkpoints from before fl.sampling
        passes = None if ps is None else Passes(number=int(ps["number"]), cursor=int(ps["cursor"]),
                                                deferred=_unflatten(ps["deferred"], tensors).numpy().astype(np.int64))
        state = ServerState(model=model, opt_state=_unflatten(srv["opt_state"], tensors), window=window,
                            round=int(srv["round"]), sim_time_s=float(srv["sim_time_s"]),
                            clip=float(srv.get("clip", 0.0)),
                            clips=tuple((str(k), float(v)) for k, v in srv.get("clips", [])), average=average,
                            passes=passes, late=_restore_late(srv.get("late", []), tensors))
        return Checkpoint(state=state, rows=list(meta["rows"]), async_state=_restore_async(meta["async"], tensors),
                          store=_restore_store(meta["store"], tensors), wall_s=float(meta["wall_s"]),
                          settings=dict(meta["settings"]))
    except (SafetensorError, ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise ConfigError(f"--resume: {where} is not a readable adfed checkpoint ({exc}); "
                          f"start a new run: --overwrite instead of --resume") from exc


def save(directory: Path, ck: Checkpoint) -> None:
    """Write ``directory/checkpoint.safetensors`` atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (CHECKPOINT + ".tmp")
    tmp.write_bytes(encode(ck))
    os.replace(tmp, directory / CHECKPOINT)


def load(path: Path) -> Checkpoint:
    return decode(path.read_bytes(), path)
