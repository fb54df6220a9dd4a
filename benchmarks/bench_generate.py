"""Benchmark: synthetic-world generation speed and peak memory.

Each measurement runs ``data_gen.generate`` in a fresh subprocess, so its peak RSS is
honest (nothing left over from an earlier, larger run). Prints one JSON object::

    python benchmarks/bench_generate.py                       # 100k and 1M users
    python benchmarks/bench_generate.py --sizes 20000 --workers 2

Per size: impressions, wall seconds, impressions/s, impressions/s per worker core,
impressions per CPU-second (all processes), CPU seconds of the writer (parent) and of
the workers, and peak RSS of the writer process and of the largest worker (both MiB;
the total is at most ``writer + workers * worker``). ``baseline`` is the smallest size
generated in-process (``workers=1``); ``speedup`` compares each size's impressions/s
with it. ``breakdown`` measures the CPU cost per impression of computing chunks and of
writing them, apart and best-of-3, and projects the rate on two dedicated cores: on a
shared machine (see ``load_avg_1m``) wall-clock rates understate it.
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

ROOT = Path(__file__).resolve().parents[1]


def _child(users: int, ads: int, workers: int, chunk_users: int, out: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from data_gen.generate import generate
    from data_gen.params import WorldParams

    params = WorldParams(num_users=users, num_ads=ads)
    t0 = time.perf_counter()
    path = generate(out, params, seed=0, workers=workers, chunk_users=chunk_users,
                    overwrite=True)
    wall = time.perf_counter() - t0
    manifest = json.loads((path / "manifest.json").read_text())
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = int(manifest["counts"]["impressions"])
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {
        "users": users, "ads": ads, "workers": workers, "chunk_users": chunk_users,
        "impressions": n, "wall_s": round(wall, 3),
        "impressions_per_s": round(n / wall),
        "impressions_per_s_per_core": round(n / wall / max(1, workers)),
        "cpu_s": round(cpu, 3), "impressions_per_cpu_s": round(n / cpu),
        "cpu_writer_s": round(me.ru_utime + me.ru_stime, 3),
        "cpu_workers_s": round(kids.ru_utime + kids.ru_stime, 3),
        "peak_rss_writer_mib": round(me.ru_maxrss / 1024, 1),
        "peak_rss_worker_mib": round(kids.ru_maxrss / 1024, 1),
        "dataset_mib": round(size / 2**20, 1),
    }


def _breakdown(ads: int, chunk_users: int, out: Path, chunks: int = 12, reps: int = 3) -> dict:
    """CPU cost per impression of computing and of writing chunks, measured apart.

    Best of ``reps`` (CPU time of this process), so that other load on the machine
    inflates it least. ``projected_impressions_per_s_2_cores`` assumes the parent
    writes while the workers compute: min(writer alone, two cores on both parts).
    """
    sys.path.insert(0, str(ROOT))
    from adfed.data.layout import DatasetWriter
    from data_gen.calibrate import build_world
    from data_gen.generate import GENERATOR, chunk_tables
    from data_gen.params import WorldParams

    params = WorldParams(num_users=chunks * chunk_users, num_ads=ads)
    world = build_world(params, 0)
    chunk_tables(world, 0, 64)  # warm up
    compute = write = float("inf")
    n = 0
    for _ in range(reps):
        t0 = time.process_time()
        parts = [chunk_tables(world, s, s + chunk_users)
                 for s in range(0, params.num_users, chunk_users)]
        compute = min(compute, time.process_time() - t0)
        n = sum(t.impressions.num_rows for t in parts)
        writer = DatasetWriter(out, schema=world.schema, generator=GENERATOR, params={},
                               overwrite=True)
        t0 = time.process_time()
        for t in parts:
            writer.write_users(t.users)
            writer.write_devices(t.devices)
            writer.write_impressions(t.impressions, t.truth)
            writer.write_requests(t.requests)
        writer.close()
        write = min(write, time.process_time() - t0)
    c_ns, w_ns = compute / n * 1e9, write / n * 1e9
    return {"impressions": n, "compute_ns_per_impression": round(c_ns),
            "write_ns_per_impression": round(w_ns),
            "projected_impressions_per_s_2_cores": round(min(1e9 / w_ns, 2e9 / (c_ns + w_ns)))}


def _measure(users: int, args: argparse.Namespace, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="adfed-bench-") as tmp:
        cmd = [sys.executable, __file__, "--child", str(users), "--ads", str(args.ads),
               *(["--breakdown"] if users == 0 else []),
               "--workers", str(workers), "--chunk-users", str(args.chunk_users),
               "--out", str(Path(tmp) / "world")]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000],
                    help="numbers of users, one subprocess each")
    ap.add_argument("--ads", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk-users", type=int, default=4096)
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the in-process (workers=1) baseline run")
    ap.add_argument("--no-breakdown", action="store_true",
                    help="skip the compute / write CPU breakdown")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--breakdown", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        if args.breakdown:
            print(json.dumps(_breakdown(args.ads, args.chunk_users, args.out)))
        else:
            print(json.dumps(_child(args.child, args.ads, args.workers, args.chunk_users,
                                    args.out)))
        return
    result: dict = {"cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "runs": []}
    if not args.no_breakdown:
        result["breakdown"] = _measure(0, args, workers=1)
    if not args.no_baseline:
        result["baseline"] = _measure(min(args.sizes), args, workers=1)
    for n in args.sizes:
        run = _measure(n, args, args.workers)
        if "baseline" in result:
            # the baseline is in-process at the smallest size: a ratio at another size
            # mixes parallelism with amortisation over size, so it is named for what it is
            key = "speedup" if n == min(args.sizes) else "rate_vs_smallest_size_in_process"
            run[key] = round(run["impressions_per_s"] / result["baseline"]["impressions_per_s"], 2)
        result["runs"].append(run)
        print(json.dumps(run), file=sys.stderr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
