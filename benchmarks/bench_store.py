"""Benchmark: per-client load latency of ``Dataset.client`` on a large dataset.

Generates a synthetic world (or reuses ``--data``), then, in a fresh subprocess (no
warm caches in the Python process; the OS page cache is whatever the generation left),
times ``Dataset.client(u, with_truth=False)`` for ``--clients`` random users. Prints one
JSON object::

    python benchmarks/bench_store.py                      # 1M users, 20k ads
    python benchmarks/bench_store.py --users 200000
    python benchmarks/bench_store.py --data runs/world_1m  # reuse a dataset

``client_ms.cold`` is each user's first read; its row group may already be in the
dataset's row-group cache (256 MiB) when an earlier user shared it, so the median mixes
misses and hits and the upper percentiles are the misses. ``client_ms.warm`` re-reads
the same user right after (cache hit).
``baseline_ms`` is the naive way, ``pq.read_table(shard).slice(start, count)`` (decode
the user's whole shard), for ``--baseline-clients`` users; ``speedup_median`` compares
its median with the cold median.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stats(ms: list[float]) -> dict:
    import numpy as np

    a = np.asarray(ms)
    return {"n": len(a), "median": round(float(np.median(a)), 3),
            "p90": round(float(np.percentile(a, 90)), 3),
            "p99": round(float(np.percentile(a, 99)), 3),
            "mean": round(float(a.mean()), 3), "max": round(float(a.max()), 3)}


def _measure(data: Path, clients: int, baseline_clients: int, seed: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import pyarrow.parquet as pq

    from adfed.data.store import Dataset

    t0 = time.perf_counter()
    ds = Dataset.open(data)
    open_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    users = rng.choice(ds.user_ids, size=min(clients, len(ds.user_ids)), replace=False)
    cold: list[float] = []
    warm: list[float] = []
    rows = 0
    for u in users:
        t = time.perf_counter()
        ex = ds.client(int(u), with_truth=False)
        cold.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        ds.client(int(u), with_truth=False)
        warm.append((time.perf_counter() - t) * 1e3)
        rows += len(ex)

    index = pq.read_table(data / "index.parquet").to_pandas().set_index("user_id")
    base: list[float] = []
    for u in users[:baseline_clients]:
        shard, start, count = (int(index.at[int(u), k]) for k in ("shard", "start", "count"))
        path = data / "impressions" / f"part-{shard:05d}.parquet"
        t = time.perf_counter()
        table = pq.read_table(path).slice(start, count)
        base.append((time.perf_counter() - t) * 1e3)
        assert table.num_rows == count
    manifest = json.loads((data / "manifest.json").read_text())
    cold_ms, base_ms = _stats(cold), _stats(base)
    return {
        "users": int(len(ds.user_ids)), "impressions": ds.num_impressions,
        "shards": int(manifest["counts"]["shards"]), "open_s": round(open_s, 3),
        "mean_rows_per_client": round(rows / len(users), 1),
        "client_ms": {"cold": cold_ms, "warm": _stats(warm)},
        "baseline_ms": base_ms,
        "speedup_median": round(base_ms["median"] / cold_ms["median"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--ads", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, help="reuse this dataset instead of generating one")
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--baseline-clients", type=int, default=50)
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.measure_only:
        print(json.dumps(_measure(args.data, args.clients, args.baseline_clients, args.seed)))
        return

    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        out: dict = {"load_avg_1m": round(os.getloadavg()[0], 2)}
        data = args.data
        if data is None:
            sys.path.insert(0, str(ROOT))
            from data_gen.generate import generate
            from data_gen.params import WorldParams

            t0 = time.perf_counter()
            data = generate(Path(tmp) / "world", WorldParams(num_users=args.users, num_ads=args.ads),
                            seed=args.seed, workers=args.workers)
            out["generate_s"] = round(time.perf_counter() - t0, 2)
        out["data"] = str(data)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, __file__, "--measure-only", "--data", str(data), "--clients",
             str(args.clients), "--baseline-clients", str(args.baseline_clients), "--seed", str(args.seed)],
            capture_output=True, text=True, env=env, check=False,
        )
        if proc.returncode != 0:
            sys.exit(f"measurement failed:\n{proc.stderr}")
        out.update(json.loads(proc.stdout))
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
