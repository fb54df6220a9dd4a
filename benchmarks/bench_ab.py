"""Training-step throughput of the working tree against a git revision, in one process.

This host's speed drifts by up to half from minute to minute, so two benchmark runs a
minute apart cannot tell a 5 % change from noise. Here both versions run in the same
process, pass by pass in turns, and the figure is the median of the per-pass ratios.

The revision's ``adfed`` package is extracted with ``git archive`` into a temporary
directory and imported as ``adfed_base`` (its ``import adfed`` / ``from adfed``
statements are rewritten to that name; nothing else changes). Each version builds its
own default model, optimizers and moving average (``adfed train``'s defaults of that
version) and its own batches from ``--data`` (the same rows), then runs the centralized
training step: forward, ESMM loss, backward, both optimizers, their learning-rate
schedules, the towers' average.

Prints one JSON object: examples/s medians of each, the median ratio (working tree /
revision; > 1 means the working tree is faster) and every pass's ratio.

Usage::

    python benchmarks/bench_ab.py --base HEAD~3 --data data/demo [--batch 1024] [--passes 12]
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
_IMPORT = re.compile(r"^(\s*)(from|import) adfed(?=[.\s])", re.MULTILINE)


def extract(rev: str, into: Path) -> str:
    """Write revision ``rev``'s ``adfed`` package to ``into/adfed_base``; return the commit."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "adfed"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "adfed").rename(into / "adfed_base")
    for path in (into / "adfed_base").rglob("*.py"):
        path.write_text(_IMPORT.sub(r"\1\2 adfed_base", path.read_text()))
    return commit


def _module(package: str, name: str) -> ModuleType:
    return importlib.import_module(f"{package}.{name}")


def step_runner(package: str, data: str, size: int, batches: int) -> Callable[[], float]:
    """One pass of ``batches`` default training steps of ``package``; returns examples/s."""
    model_mod, config, trainer = (_module(package, n) for n in ("model", "config", "trainer"))
    dataset = _module(package, "data.store").Dataset.open(data)
    pool = dataset.load()
    rows = np.random.default_rng(0).permutation(len(pool))[: batches * size]
    todo = [pool.take(rows[i : i + size]).to_batch() for i in range(0, len(rows), size)]
    t = config.TrainConfig()
    model = model_mod.build_model(dataset.schema, seed=0)
    # revisions before train.user_lr / train.ema (a session earlier) run without them
    user_lr = {"local_lr": t.user_lr or None} if hasattr(t, "user_lr") else {}
    optimizers = model_mod.make_optimizers(model, lr=t.lr, sparse_lr=t.sparse_lr, **user_lr)
    average = trainer.weight_average(model.towers, t.ema) if hasattr(trainer, "weight_average") else None
    # and before train.lr_decay_start (this session) without learning-rate schedules
    schedules = trainer.lr_decay(optimizers, t.lr_decay_start) if hasattr(trainer, "lr_decay") else []

    def one_pass() -> float:
        start = time.perf_counter()
        for batch in todo:
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            model_mod.esmm_loss(model(batch), batch).backward()
            for opt in optimizers:
                opt.step()
            for schedule in schedules:
                schedule.step()
            if average is not None:
                average.update_parameters(model.towers)
        return len(rows) / (time.perf_counter() - start)

    return one_pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD~3, a commit)")
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=8, help="steps per pass")
    ap.add_argument("--passes", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        commit = extract(args.base, Path(tmp))
        sys.path.insert(0, tmp)
        base = step_runner("adfed_base", args.data, args.batch, args.batches)
        work = step_runner("adfed", args.data, args.batch, args.batches)
        base(), work()  # warm-up
        rates = np.array([(base(), work()) for _ in range(args.passes)])
    ratios = rates[:, 1] / rates[:, 0]
    print(json.dumps({
        "bench": "train_step_ab", "base": args.base, "base_commit": commit, "batch": args.batch,
        "threads": args.threads, "passes": args.passes,
        "base_median": round(float(np.median(rates[:, 0]))), "work_median": round(float(np.median(rates[:, 1]))),
        "ratio_median": round(float(np.median(ratios)), 3), "ratios": [round(float(r), 3) for r in np.sort(ratios)],
    }, indent=1))


if __name__ == "__main__":
    main()
