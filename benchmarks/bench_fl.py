"""Federated simulation overhead, bytes per client, and memory at population scale.

Prints one JSON object. Three measurements, each against a baseline from the same run:

- ``overhead``: wall time of a federated run (evaluation excluded) divided by the time of
  the very same local training steps (same clients, same batches, same model) done in
  one plain loop with all data preloaded, timed round by round beside the engine (see
  :func:`overhead`). 1.0 means the engine adds nothing. One-time library imports are
  paid before either is timed (:func:`_warm_up`). ``overhead_ratio_vs_block`` divides by
  the same plain loop run once more afterwards, all rounds back to back (warm caches,
  but minutes away from the engine's timing, so it carries the machine's drift). The same
  ratio over this process's CPU time is reported too (``overhead_ratio_cpu``): on a
  shared machine it is the steadier of the two, as other processes' load drops out.
- ``bytes``: mean upload / download per client per round (serialized payload lengths),
  against shipping the whole model (``model_bytes``).
- ``memory`` (``--memory``): peak RSS of a federated round over a large population
  (``--pop-users``, default 1M; or the world ``--pop-data``) at ``--pop-clients`` per
  round, in a subprocess, and the wall seconds of each of its rounds (evaluation
  excluded; the first holds the cold reads of the store): seconds per 1000-phone round.
- ``pass`` (``--pass``): one pass of federated training (users / clients_per_round
  rounds, default settings, evaluation excluded) against one centralized epoch over the
  same training rows (``train_examples / examples_per_s``: evaluation excluded), with
  both AUCs; ``--per-phone`` adds the same pass with batched client training off. Beside
  it the design's floor (``floor_over_epoch``): the phones' batched training, reading
  their rows, and the least any wire does (each phone's download and upload copied once
  into bytes and once out, the uploads summed), each timed inside the same pass.

Usage::

    python benchmarks/bench_fl.py --data data/demo [--rounds 20] [--clients 100] [--repeat 2]
    python benchmarks/bench_fl.py --memory --pop-users 1000000 --pop-clients 1000 --rounds 5
    python benchmarks/bench_fl.py --pass --data data/demo [--per-phone]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adfed.config import Config, with_overrides
from adfed.data.store import Dataset
from adfed.fl import backends, devices
from adfed.fl.backends import InProcessBackend
from adfed.fl.client import local_batches
from adfed.fl.population import Population
from adfed.fl.rounds import client_settings, select
from adfed.model.pcvr import esmm_loss
from adfed.trainer import Trainer, model_from_config


def _config(data: str, rounds: int, clients: int) -> Config:
    return with_overrides(Config(), [
        f'data.path="{data}"', 'train.mode="federated"', f"fl.rounds={rounds}",
        f"fl.clients_per_round={clients}", f"fl.eval_every={rounds}", 'window.kind="none"',
        "data.max_test_users=2000",
    ])


def _trained_clients(cfg: Config, population: Population) -> list[np.ndarray]:
    """The clients each round trains, re-derived from the engine's own seeds."""
    out = []
    for rnd in range(1, cfg.fl.rounds + 1):
        rng = np.random.default_rng([cfg.seed, rnd, 0, 0x5EC])
        selected = select(population, cfg, rng)
        failed = devices.failures(population.profiles, selected, rng)
        out.append(selected[~failed])
    return out


class PlainLoop:
    """The same local steps as the engine, one model, data preloaded, no engine.

    Built before timing starts; :meth:`run_round` trains round ``r``'s clients (same
    clients, same batches as the engine) and returns (wall s, CPU s, steps).
    """

    def __init__(self, cfg: Config, dataset: Dataset) -> None:
        population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
        self.model = model_from_config(cfg, dataset, user_rows=1)
        settings = client_settings(cfg)
        self.work: list[list[list]] = []
        for rnd, clients in enumerate(_trained_clients(cfg, population), start=1):
            datas = population.train_data_many(clients)
            self.work.append([local_batches(d, settings, np.random.default_rng([cfg.seed, rnd, 0, int(c)]))
                              for c, d in zip(clients, datas, strict=True)])
        self.opt = torch.optim.SGD(self.model.parameters(), lr=settings.lr)

    def run_round(self, rnd: int) -> tuple[float, float, int]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the engine trains clients
        steps = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for batches in self.work[rnd - 1]:
            for batch in batches:
                self.opt.zero_grad(set_to_none=True)
                esmm_loss(self.model(batch), batch).backward()
                self.opt.step()
                steps += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        torch.set_num_threads(threads)
        return wall, cpu, steps


def _warm_up(cfg: Config, dataset: Dataset) -> None:
    """Pay one-time library costs before either timing starts.

    The first model build and optimizer step of a process import ``torch._dynamo``
    (~2.5 s here); whichever of the two loops ran first would otherwise carry it.
    """
    model = model_from_config(cfg, dataset, user_rows=1)
    batch = dataset.client(int(dataset.user_ids[0]), with_truth=False).to_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    esmm_loss(model(batch), batch).backward()
    opt.step()


def overhead(data: str, rounds: int, clients: int, backend: str, repeat: int) -> dict[str, object]:
    """Engine time over plain-loop time, interleaved round by round, ``repeat`` times.

    After each federated round (from the trainer's per-round callback) the plain loop
    trains that round's clients; its time is taken out of the run's wall time. On a
    shared machine speed drifts by 20-30 % from minute to minute; timing the two side by
    side, round by round, cancels most of that drift. Ratios are medians over repeats.
    """
    cfg = with_overrides(_config(data, rounds, clients), [f'fl.backend="{backend}"'])
    dataset = Dataset.open(data)
    _warm_up(cfg, dataset)
    pairs = []
    for _ in range(repeat):
        plain = PlainLoop(cfg, dataset)
        acc = np.zeros(3)

        def on_step(row: dict, plain: PlainLoop = plain, acc: np.ndarray = acc) -> None:
            acc[:] += plain.run_round(int(row["round"]))

        t0, c0 = time.perf_counter(), time.process_time()
        result = Trainer(cfg).fit(dataset, on_step=on_step)
        total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
        eval_s = sum(r.get("eval_s", 0.0) for r in result.rows)
        fed_wall, fed_cpu = total - acc[0] - eval_s, total_cpu - acc[1]
        block = PlainLoop(cfg, dataset)  # the same steps again, all rounds back to back
        block_s = sum(block.run_round(r)[0] for r in range(1, cfg.fl.rounds + 1))
        pairs.append({"federated_wall_s": fed_wall, "eval_s": eval_s, "plain_loop_s": float(acc[0]),
                      "federated_cpu_s": fed_cpu, "plain_loop_cpu_s": float(acc[1]),
                      "overhead_ratio": fed_wall / acc[0],
                      "overhead_ratio_cpu": fed_cpu / acc[1],  # evaluation included (a few %)
                      "plain_loop_block_s": block_s, "overhead_ratio_vs_block": fed_wall / block_s})
        steps = int(acc[2])
    s = result.summary
    return {
        "backend": backend, "rounds": rounds, "clients_per_round": clients, "local_steps": steps,
        "overhead_ratio": float(np.median([p["overhead_ratio"] for p in pairs])),
        "overhead_ratio_cpu": float(np.median([p["overhead_ratio_cpu"] for p in pairs])),
        "overhead_ratio_vs_block": float(np.median([p["overhead_ratio_vs_block"] for p in pairs])),
        "pairs": pairs,
        "bytes_up_per_client": s["bytes_up_per_client"],
        "bytes_up_dense_per_client": s["bytes_up_dense_per_client"],
        "bytes_up_sparse_per_client": s["bytes_up_sparse_per_client"],
        "bytes_down_per_client": s["bytes_down_per_client"],
        "model_bytes": s["model_bytes"],
        "upload_vs_full_model": s["bytes_up_per_client"] / s["model_bytes"],
    }


def _round_seconds(rows: list[dict]) -> list[float]:
    """Each round's wall seconds, evaluation excluded (the first also holds the setup)."""
    wall = [0.0] + [float(r["wall_time_s"]) for r in rows]
    return [b - a - float(r.get("eval_s", 0.0)) for a, b, r in zip(wall[:-1], wall[1:], rows, strict=True)]


def _memory_child(data: str, clients: int, rounds: int) -> None:
    cfg = _config(data, rounds, clients)
    cfg = with_overrides(cfg, ["data.max_test_users=1000", "fl.local_cache=0"])
    result = Trainer(cfg).fit()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = _round_seconds(result.rows)
    print(json.dumps({"peak_rss_mib": peak_kib / 1024, "round_s": seconds,
                      "median_round_s_after_first": float(np.median(seconds[1:])) if len(seconds) > 1 else None,
                      "torch_threads": torch.get_num_threads()}))


def memory(users: int, clients: int, rounds: int, data: str | None = None) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        gen_s = None
        if data is None:
            data = str(Path(tmp) / "pop")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "adfed.cli", "data", "generate", "--users", str(users),
                            "--ads", "20000", "--out", data], check=True, capture_output=True)
            gen_s = time.perf_counter() - t0
        out = subprocess.run([sys.executable, __file__, "--memory-child", data, "--pop-clients",
                              str(clients), "--rounds", str(rounds)], check=True, capture_output=True,
                             text=True)
        child = json.loads(out.stdout.strip().splitlines()[-1])
        population = Dataset.open(data).schema.num_users
    return {"population": population, "clients_per_round": clients, "rounds": rounds,
            "generate_s": gen_s, **child}


def _timed(fn: Any, spent: list[float]) -> Any:
    """``fn``, adding the seconds of each call to ``spent[0]``."""
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0
    return timed


def _raw_wire(tasks: Any, results: Any) -> None:
    """The least any wire must do for these phones (a part of :func:`one_pass`'s floor):
    each download's rows and each upload's tensors copied once into one bytes object and
    once out of it, the upload's dense part summed into a mean. No header, no checks."""
    def raw(t: torch.Tensor) -> memoryview:
        return np.ascontiguousarray(t.detach().numpy()).data.cast("B")

    total = None
    for task, (update, _) in zip(tasks, results, strict=True):
        bytearray(b"".join([raw(t) for r in task.rows.values() for t in (r.ids, r.values)]))
        dense = update.dense.flat if hasattr(update.dense, "flat") else torch.cat([t.reshape(-1) for t in update.dense.values()])
        up = bytearray(b"".join([raw(dense), *(raw(t) for r in update.sparse.values() for t in (r.ids, r.values))]))
        values = torch.frombuffer(up, dtype=dense.dtype, count=dense.numel())
        total = values.clone() if total is None else total.add_(values)


def one_pass(data: str, clients: int, per_phone: bool, central_threads: int) -> dict[str, object]:
    """One federated pass (users / clients rounds, default settings) vs one centralized epoch
    trained with ``central_threads`` torch threads (the engine trains phones on one)."""
    dataset = Dataset.open(data)
    base = [f'data.path="{data}"']
    threads = torch.get_num_threads()
    torch.set_num_threads(central_threads)
    try:
        central = Trainer(with_overrides(Config(), [*base, 'train.mode="centralized"', "train.epochs=1"])).fit(dataset)
    finally:
        torch.set_num_threads(threads)
    epoch_s = central.summary["train_examples"] / central.summary["examples_per_s"]
    rounds = dataset.schema.num_users // clients
    cfg = with_overrides(Config(), [*base, 'train.mode="federated"', f"fl.rounds={rounds}",
                                    f"fl.clients_per_round={clients}", f"fl.eval_every={rounds}"])
    out: dict[str, object] = {"users": dataset.schema.num_users, "clients_per_round": clients, "rounds": rounds,
                              "centralized_threads": central_threads, "centralized_epoch_s": epoch_s, "centralized_auc": central.summary["auc"],
                              "train_examples": central.summary["train_examples"]}
    for name, batched in [("batched", True), *([("per_phone", False)] if per_phone else [])]:
        InProcessBackend.batched = batched
        spent, reading, wire = [0.0], [0.0], [0.0]
        real, real_read = backends.client_updates, Population.train_data_joined
        timed_training = _timed(real, spent)
        timed_wire = _timed(_raw_wire, wire)

        def training(model: Any, tasks: Any, data: Any, offsets: Any, train: Any = timed_training,
                     wire_floor: Any = timed_wire) -> Any:
            results = train(model, tasks, data, offsets)
            wire_floor(tasks, results)  # inside the rounds' wall time: taken out of the pass below
            return results

        backends.client_updates = training
        Population.train_data_joined = _timed(real_read, reading)  # type: ignore[method-assign]
        try:
            fed = Trainer(cfg).fit(dataset)
        finally:
            InProcessBackend.batched = True
            backends.client_updates = real
            Population.train_data_joined = real_read  # type: ignore[method-assign]
        fed_s = sum(_round_seconds(fed.rows)) - wire[0]
        out[f"federated_pass_s_{name}"] = fed_s
        out[f"federated_auc_{name}"] = fed.summary["auc"]
        out[f"pass_over_epoch_{name}"] = fed_s / epoch_s
        if batched:  # the phones' batched forward/backward and steps alone
            out["batched_training_s"] = spent[0]
            out["batched_training_over_epoch"] = spent[0] / epoch_s
            # this design's floor: that training, reading the phones' rows, and the least
            # any wire does (each phone's bytes copied once in and once out, :func:`_raw_wire`)
            out["reading_s"] = reading[0]
            out["raw_wire_s"] = wire[0]
            out["floor_s"] = spent[0] + reading[0] + wire[0]
            out["floor_over_epoch"] = out["floor_s"] / epoch_s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--backends", default="inprocess")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved (federated, plain) measurements; medians reported")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--pop-users", type=int, default=1_000_000)
    ap.add_argument("--pop-clients", type=int, default=1000)
    ap.add_argument("--memory-child")
    ap.add_argument("--pop-data", help="an existing world for --memory (instead of generating --pop-users)")
    ap.add_argument("--pass", dest="one_pass", action="store_true",
                    help="one federated pass against one centralized epoch (--data, --clients)")
    ap.add_argument("--per-phone", action="store_true", help="--pass: also with batched client training off")
    ap.add_argument("--central-threads", type=int, default=1,
                    help="--pass: torch threads of the centralized epoch (2 threads on a loaded 2-core machine "
                         "measured 33x slower than 1)")
    args = ap.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child, args.pop_clients, args.rounds)
        return
    out: dict[str, object] = {"machine": {"cpus": os.cpu_count()}}
    out["torch_threads"] = torch.get_num_threads()
    if args.memory:
        out["memory"] = memory(args.pop_users, args.pop_clients, args.rounds, args.pop_data)
    elif args.one_pass:
        out["pass"] = one_pass(args.data, args.clients, args.per_phone, args.central_threads)
    else:
        out["overhead"] = [overhead(args.data, args.rounds, args.clients, b, args.repeat) for b in args.backends.split(",")]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
