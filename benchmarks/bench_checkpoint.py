"""Benchmark: the cost of a federated run's checkpoint of the phones' local store.

`adfed train` writes ``checkpoint.safetensors`` after every round, and with it every
phone's ``local`` rows (a user embedding row and bias: 9 floats a phone). Until
2026-12-06 each checkpoint read every entry of the store again (one ``torch.stack`` over
all phones per key); :meth:`adfed.fl.population.LocalStore.packed` now reads only the
phones put or evicted since the last checkpoint. Prints one JSON object::

    python benchmarks/bench_checkpoint.py                  # 100k phones, 100 changed a round
    python benchmarks/bench_checkpoint.py --phones 1000000 --changed 1000

``full_ms`` packs a store of ``--phones`` entries from scratch (what every checkpoint did
before: the baseline, measured in the same run); ``incremental_ms`` packs it after
``--changed`` phones were put (a round's cohort; the oldest evicted once full);
``encode_ms`` is the whole checkpoint's store part (LRU order + packed keys). Medians over
``--rounds`` rounds; one torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _entry(gen: Any, dim: int) -> dict:
    import torch

    return {"user_id.weight": torch.randn((1, dim), generator=gen), "user_bias.weight": torch.randn((1, 1), generator=gen)}


def measure(phones: int, changed: int, rounds: int, dim: int, seed: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(phones, changed, rounds, dim, seed)
    finally:
        torch.set_num_threads(threads)


def _measure(phones: int, changed: int, rounds: int, dim: int, seed: int) -> dict:
    import torch

    from adfed.fl import checkpoint
    from adfed.fl.population import LocalStore

    gen = torch.Generator().manual_seed(seed)
    store = LocalStore(capacity=phones)
    for u in range(phones):
        store.put_inplace(u, _entry(gen, dim))
    full, incremental, encode = [], [], []
    next_id = phones
    for _ in range(rounds):
        for u in range(next_id, next_id + changed):  # a round's cohort: new phones, the oldest evicted
            store.put_inplace(u, _entry(gen, dim))
        next_id += changed
        t = time.perf_counter()
        packed = store.packed()
        incremental.append(time.perf_counter() - t)
        fresh = LocalStore(capacity=phones, entries=store.entries)  # nothing packed yet: every entry read
        t = time.perf_counter()
        again = fresh.packed()
        full.append(time.perf_counter() - t)
        assert all(torch.equal(again[k][0], packed[k][0]) and torch.equal(again[k][1], packed[k][1]) for k in packed)
        t = time.perf_counter()
        checkpoint._store_entries(store, {})
        encode.append(time.perf_counter() - t)
    ms = {name: round(1000 * statistics.median(v), 2) for name, v in
          (("full_ms", full), ("incremental_ms", incremental), ("encode_ms", encode))}
    return {"benchmark": "checkpoint_store", "phones": phones, "changed_per_round": changed, "rounds": rounds,
            **ms, "speedup": round(ms["full_ms"] / ms["incremental_ms"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phones", type=int, default=100_000, help="entries in the store")
    ap.add_argument("--changed", type=int, default=100, help="phones put per round")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--dim", type=int, default=8, help="user embedding width")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps(measure(a.phones, a.changed, a.rounds, a.dim, a.seed), indent=2))


if __name__ == "__main__":
    main()
