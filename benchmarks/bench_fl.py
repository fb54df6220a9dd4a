"""Federated simulation overhead, bytes per client, and memory at population scale.

Prints one JSON object. Three measurements, each against a baseline from the same run:

- ``overhead``: wall time of a federated run (evaluation excluded) divided by the time of
  the very same local training steps (same clients, same batches, same model) done in
  one plain loop with all data preloaded. 1.0 means the engine adds nothing. The same
  ratio over this process's CPU time is reported too (``overhead_ratio_cpu``): on a
  shared machine it is the steadier of the two, as other processes' load drops out.
- ``bytes``: mean upload / download per client per round (serialized payload lengths),
  against shipping the whole model (``model_bytes``).
- ``memory`` (``--memory``): peak RSS of a federated round over a large population
  (``--pop-users``, default 1M) at ``--pop-clients`` per round, in a subprocess.

Usage::

    python benchmarks/bench_fl.py --data data/demo [--rounds 20] [--clients 100]
    python benchmarks/bench_fl.py --memory --pop-users 1000000 --pop-clients 1000
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

import numpy as np
import torch

from adfed.config import Config, with_overrides
from adfed.data.store import Dataset
from adfed.fl import devices
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


def plain_loop_seconds(cfg: Config, dataset: Dataset) -> tuple[float, float, int]:
    """The same local steps, one model, data preloaded, no engine: (wall s, CPU s, steps)."""
    population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    model = model_from_config(cfg, dataset, user_rows=1)
    settings = client_settings(cfg)
    work = []
    for rnd, clients in enumerate(_trained_clients(cfg, population), start=1):
        for c in clients:
            data = population.train_data(int(c))
            batches = local_batches(data, settings, np.random.default_rng([cfg.seed, rnd, 0, int(c)]))
            work.append(batches)
    torch.set_num_threads(1)
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr)
    steps = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for batches in work:
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            esmm_loss(model(batch), batch).backward()
            opt.step()
            steps += 1
    return time.perf_counter() - t0, time.process_time() - c0, steps


def overhead(data: str, rounds: int, clients: int, backend: str) -> dict[str, float]:
    cfg = with_overrides(_config(data, rounds, clients), [f'fl.backend="{backend}"'])
    dataset = Dataset.open(data)
    t0, c0 = time.perf_counter(), time.process_time()
    result = Trainer(cfg).fit(dataset)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    eval_s = sum(r.get("eval_s", 0.0) for r in result.rows)
    plain_s, plain_cpu, steps = plain_loop_seconds(cfg, dataset)
    s = result.summary
    return {
        "backend": backend, "rounds": rounds, "clients_per_round": clients, "local_steps": steps,
        "federated_wall_s": total - eval_s, "eval_s": eval_s, "plain_loop_s": plain_s,
        "overhead_ratio": (total - eval_s) / plain_s,
        "federated_cpu_s": total_cpu, "plain_loop_cpu_s": plain_cpu,
        "overhead_ratio_cpu": total_cpu / plain_cpu,  # evaluation included (a few %)
        "bytes_up_per_client": s["bytes_up_per_client"],
        "bytes_up_dense_per_client": s["bytes_up_dense_per_client"],
        "bytes_up_sparse_per_client": s["bytes_up_sparse_per_client"],
        "bytes_down_per_client": s["bytes_down_per_client"],
        "model_bytes": s["model_bytes"],
        "upload_vs_full_model": s["bytes_up_per_client"] / s["model_bytes"],
    }


def _memory_child(data: str, clients: int, rounds: int) -> None:
    cfg = _config(data, rounds, clients)
    cfg = with_overrides(cfg, ["data.max_test_users=1000", "fl.local_cache=0"])
    Trainer(cfg).fit()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mib": peak_kib / 1024}))


def memory(users: int, clients: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "pop")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "adfed.cli", "data", "generate", "--users", str(users),
                        "--ads", "20000", "--out", data], check=True, capture_output=True)
        gen_s = time.perf_counter() - t0
        out = subprocess.run([sys.executable, __file__, "--memory-child", data, "--pop-clients",
                              str(clients), "--rounds", str(rounds)], check=True, capture_output=True,
                             text=True)
        child = json.loads(out.stdout.strip().splitlines()[-1])
    return {"population": users, "clients_per_round": clients, "rounds": rounds,
            "generate_s": gen_s, **child}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--backends", default="inprocess")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--pop-users", type=int, default=1_000_000)
    ap.add_argument("--pop-clients", type=int, default=1000)
    ap.add_argument("--memory-child")
    args = ap.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child, args.pop_clients, args.rounds)
        return
    out: dict[str, object] = {"machine": {"cpus": os.cpu_count()}}
    if args.memory:
        out["memory"] = memory(args.pop_users, args.pop_clients, args.rounds)
    else:
        out["overhead"] = [overhead(args.data, args.rounds, args.clients, b) for b in args.backends.split(",")]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
