"""The server's side of a round: decode + aggregate + apply, by torch thread count.

Prints one JSON object. Trains one real round of ``--clients`` phones on a dataset (their
encoded uploads), then times, interleaved ``--repeat`` times for each thread count in
``--threads``: decoding every upload (``server.accept`` via the round machine) and
aggregating and applying them (``server.aggregate``). Ratios are against one thread,
measured in the same run. ``fl.server_threads`` sets what the engine uses.

Usage::

    python benchmarks/bench_aggregate.py --data data/demo [--clients 100] [--threads 1,2] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from adfed.config import Config, with_overrides
from adfed.data.store import Dataset
from adfed.fl import server, strategies
from adfed.fl.backends import InProcessBackend
from adfed.fl.population import LocalStore, Population
from adfed.fl.rounds import jobs_for, make_offer, rules, select
from adfed.fl.simulation import build_engine, initial_server_state
from adfed.model.assembly import model_from_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    cfg = with_overrides(Config(), [f'data.path="{args.data}"', 'train.mode="federated"',
                                    f"fl.clients_per_round={args.clients}", "fl.over_selection=1.0"])
    dataset = Dataset.open(args.data)
    population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    opt = strategies.create("fedavg", 1.0)
    state = initial_server_state(cfg, model_from_config(cfg, dataset), opt)
    backend = InProcessBackend(args.data, cfg)
    engine = build_engine(cfg, dataset, population, state, backend, opt)
    offer = make_offer(state, engine, 1)
    clients = select(population, cfg, np.random.default_rng(0))
    results = backend.map(offer, jobs_for(clients, LocalStore(capacity=0), (0, 1, 0)))

    def one(threads: int) -> tuple[float, float]:
        with server.torch_threads(threads):
            t0 = time.perf_counter()
            rnd = server.offer(server.open_round(state, rules(cfg), engine.pipeline.codec), clients)
            for i, r in enumerate(results):
                rnd = server.accept(rnd, r.client_id, r.payload, float(i), engine.spec, engine.pipeline)
            updates = server.updates_in_offer_order(server.close(rnd, 0.0) if rnd.phase is server.Phase.OPEN
                                                    else rnd)
            t1 = time.perf_counter()
            weights = server.server_weights([u.num_examples for u in updates], cfg.fl.max_weight)
            server.aggregate(state, updates, weights, engine.aggregator, opt, np.random.default_rng(0),
                             step=1, threads=threads)
            return t1 - t0, time.perf_counter() - t1

    counts = [int(t) for t in args.threads.split(",")]
    times: dict[int, list[tuple[float, float]]] = {t: [] for t in counts}
    one(counts[0])  # warm up
    for _ in range(args.repeat):
        for t in counts:
            times[t].append(one(t))
    out: dict[str, object] = {"machine": {"cpus": os.cpu_count()}, "clients": len(results),
                              "upload_bytes_mean": float(np.mean([len(r.payload) for r in results])),
                              "torch": torch.__version__}
    base = float(np.median([a for _, a in times[counts[0]]]))
    for t in counts:
        dec = float(np.median([d for d, _ in times[t]]))
        agg = float(np.median([a for _, a in times[t]]))
        out[f"threads_{t}"] = {"decode_ms": dec * 1e3, "aggregate_ms": agg * 1e3,
                               "aggregate_vs_first": agg / base}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
