"""Training throughput of the default pCVR model (examples per second, one process).

Prints one JSON object: for each (threads, batch size), the best and median
examples/s of full training steps as ``adfed train --mode centralized`` runs them with
its defaults (forward, ESMM loss, backward, both optimizers with the per-user rows'
own lr, then the update of the towers' moving average, ``train.ema``) over
``--rounds`` passes of 8 batches, the default model alone in the process, as the
trainer runs it. The comparisons below run afterwards with five models in turns, pass by
pass, which cancels the host's drift but leaves each pass with caches the other four
models filled (measured: 5-8 % fewer examples/s than alone); ``interleaved_median`` is the
default model's median there, the base of every ratio. The model without its dot
interaction: ``ratio`` = with / without.
``no_ema_median``: the same steps without the moving average (``train.ema=0``).

The sparse tables train with ``RowSparseAdam`` (``sparse_opt="sparse_adam"``); the same
steps with ``torch.optim.SparseAdam`` run interleaved with them, pass by pass, in the
same process: ``torch_sparse_adam_median`` and ``sparse_opt_ratio`` (median over passes
of RowSparseAdam's examples/s / SparseAdam's). ``sparse_step_ms`` times the sparse
optimizer's step alone on the gradients of the same batches (median ms per step, both
optimizers interleaved; ``speedup`` = SparseAdam's ms / RowSparseAdam's).
``mean_pooling_median``: the default model with ``bag_pooling="mean"`` instead of sum,
interleaved the same way.

Batches come from ``--data`` (a generated world) when given, otherwise from the
synthetic world's schema with random ids and bag lengths like the generator's
(installed apps 0-24, app usage 20, intents 0-4). On a shared machine, run it when the
cores are idle: a second busy process makes two OpenMP threads far slower than one.

Usage::

    python benchmarks/bench_model.py [--data data/demo] [--threads 1 2] [--batch 1024 4096]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from adfed.config import ModelConfig, TrainConfig
from adfed.data.examples import Batch, Examples
from adfed.data.schema import Entity, FieldKind, Schema
from adfed.model import build_model, esmm_loss, make_optimizers
from adfed.model.layers import DotInteraction, Towers, init_parameters_
from adfed.model.pcvr import PCVRModel
from adfed.model.sparse_adam import RowSparseAdam
from adfed.trainer import WeightAverage, lr_decay, weight_average

BAG_LENGTHS = {"installed_apps": (0, 25), "app_usage": (20, 21), "intent": (0, 5)}


def random_examples(schema: Schema, n: int, rng: np.random.Generator) -> Examples:
    ids: dict[str, np.ndarray] = {}
    dense: dict[str, np.ndarray] = {}
    bags: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for f in schema.fields:
        if f.kind is FieldKind.DENSE:
            dense[f.name] = rng.normal(size=n).astype(np.float32)
        elif f.is_bag:
            lo, hi = BAG_LENGTHS.get(f.name, (0, f.max_len + 1))
            offsets = np.concatenate([[0], np.cumsum(rng.integers(lo, hi, size=n))])
            bags[f.name] = (rng.integers(0, f.vocab_size, size=int(offsets[-1])), offsets)
        else:
            ids[f.name] = rng.zipf(1.3, size=n) % f.vocab_size
    click = (rng.random(n) < 0.03).astype(np.int8)
    labels: dict[str, np.ndarray] = {"timestamp": np.arange(n), "click": click,
              "conversion": (click & (rng.random(n) < 0.1)).astype(np.int8),
              "label_observed": rng.random(n) < 0.7}
    return Examples(ids=ids, dense=dense, bags=bags, labels=labels)


def _without_interaction(model: PCVRModel) -> PCVRModel:
    emb = model.embeddings
    no_pairs = DotInteraction([Entity.USER] * emb.num_fields)  # no ad fields: no pairs
    towers = Towers(emb.num_fields * emb.dim + emb.num_scalars, ModelConfig().tower)
    init_parameters_(towers, torch.Generator().manual_seed(0))
    return PCVRModel(model.schema, emb, no_pairs, towers, model.user_bias, model.match)


Run = tuple[PCVRModel, list[torch.optim.Optimizer], bool]  # model, optimizers, with EMA


def _run(model: PCVRModel, *, ema: bool = True, **options: str) -> Run:
    """``model`` with the centralized trainer's default optimizers (``options`` override)."""
    t = TrainConfig()
    return model, make_optimizers(model, lr=t.lr, sparse_lr=t.sparse_lr, local_lr=t.user_lr or None,
                                  **options), ema  # type: ignore[arg-type]


def _rates(runs: list[Run], batches: list[Batch], rounds: int) -> list[list[float]]:
    """Examples/s of ``rounds`` passes over ``batches`` per run, the runs interleaved."""
    averages = [weight_average(model.towers, TrainConfig().ema) if ema else None for model, _, ema in runs]
    # the trainer's learning-rate schedules (train.lr_decay_start), stepped as it does
    schedules = [lr_decay(opts, TrainConfig().lr_decay_start) for _, opts, _ in runs]

    def one_pass(model: PCVRModel, opts: list[torch.optim.Optimizer], average: WeightAverage | None,
                 steps: list[LambdaLR]) -> float:
        start = time.perf_counter()
        for b in batches:
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            esmm_loss(model(b), b).backward()
            for opt in opts:
                opt.step()
            for schedule in steps:
                schedule.step()
            if average is not None:
                average.update_parameters(model.towers)
        return sum(len(b) for b in batches) / (time.perf_counter() - start)

    for (model, opts, _), average, steps in zip(runs, averages, schedules, strict=True):
        one_pass(model, opts, average, steps)
    rates: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for out, (model, opts, _), average, steps in zip(rates, runs, averages, schedules, strict=True):
            out.append(one_pass(model, opts, average, steps))
    return rates


def _sparse_step_ms(schema: Schema, batches: list[Batch], rounds: int) -> dict[str, float]:
    """Median ms of one sparse-optimizer step, RowSparseAdam vs torch.optim.SparseAdam.

    Both step on the same gradients (one backward per batch of a fresh default model),
    from the same parameter values, interleaved over ``rounds`` passes.
    """
    model = build_model(schema, seed=0)
    names = [n for n, _ in model.named_parameters() if model.has_sparse_grad(n)]
    params = dict(model.named_parameters())
    grads = []
    for b in batches:
        model.zero_grad(set_to_none=True)
        esmm_loss(model(b), b).backward()
        grads.append([params[n].grad for n in names])
    start = [params[n].detach().clone() for n in names]
    runs = []
    for cls in (RowSparseAdam, torch.optim.SparseAdam):
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        runs.append((ps, cls(ps, lr=1e-3)))
    times: list[list[float]] = [[] for _ in runs]
    for r in range(rounds + 1):
        for out, (ps, opt) in zip(times, runs, strict=True):
            t0 = time.perf_counter()
            for gs in grads:
                for p, g in zip(ps, gs, strict=True):
                    p.grad = g
                opt.step()
            if r:  # the first pass warms up
                out.append((time.perf_counter() - t0) / len(grads) * 1e3)
    ours, theirs = (float(np.median(t)) for t in times)
    return {"row_sparse_adam": round(ours, 3), "torch_sparse_adam": round(theirs, 3),
            "speedup": round(float(np.median(np.array(times[1]) / np.array(times[0]))), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.data:
        from adfed.data.store import Dataset

        ds = Dataset.open(args.data)
        schema, pool = ds.schema, ds.load()
    else:
        from data_gen.params import WorldParams, build_schema

        schema = build_schema(WorldParams())
        pool = random_examples(schema, 8 * max(args.batch), rng)
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size in args.batch:
            rows = rng.permutation(len(pool))[: 8 * size]
            batches = [pool.take(rows[i : i + size]).to_batch() for i in range(0, len(rows), size)]
            alone = _rates([_run(build_model(schema, seed=0))], batches, args.rounds)[0]
            runs = [_run(build_model(schema, seed=0)),
                    _run(build_model(schema, seed=0), sparse_opt="torch_sparse_adam"),
                    _run(_without_interaction(build_model(schema, seed=0))),
                    _run(build_model(schema, seed=0, bag_pooling="mean")),
                    _run(build_model(schema, seed=0), ema=False)]
            full, torch_sparse, base, mean_pool, no_ema = _rates(runs, batches, args.rounds)
            median = float(np.median(full))
            results.append({"threads": threads, "batch": size, "best": round(max(alone)),
                            "median": round(float(np.median(alone))), "interleaved_median": round(median),
                            "no_interaction_median": round(float(np.median(base))),
                            "ratio": round(median / float(np.median(base)), 3),
                            "torch_sparse_adam_median": round(float(np.median(torch_sparse))),
                            "mean_pooling_median": round(float(np.median(mean_pool))),
                            "no_ema_median": round(float(np.median(no_ema))),
                            "sparse_opt_ratio": round(float(np.median(np.array(full) / np.array(torch_sparse))), 3),
                            "sparse_step_ms": _sparse_step_ms(schema, batches, args.rounds)})
    print(json.dumps({"bench": "model_train_step", "results": results}, indent=1))


if __name__ == "__main__":
    main()
