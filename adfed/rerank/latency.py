"""Per-request scoring latency of the device model: ONNX (onnxruntime) and torch.

One request of N candidates is scored ``reps`` times after ``warmup`` calls; p50 and p99
are over the calls, in milliseconds. onnxruntime runs on one intra-op thread; torch's
thread count is set to one for the measurement and restored. The inputs are built
before timing (a phone receives the request already parsed); the torch figure is the
model's forward on a prepared batch, without gradients.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from adfed.data.examples import Examples
from adfed.model.pcvr import PCVRModel, remap_user
from adfed.rerank import export
from adfed.rerank.requests import Requests, request_examples


def _percentiles(fn: Callable[[], object], reps: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = np.empty(reps)
    for i in range(reps):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    p50, p99 = np.percentile(times * 1e3, [50, 99])
    return float(p50), float(p99)


def synthetic_request(req: Requests, row: int, n: int, num_ads: int, rng: np.random.Generator) -> Requests:
    """Request ``row``'s user and context with ``n`` random ads (bids 1): distinct when
    the world has ``n`` ads, otherwise drawn with repeats (a world of fewer ads than
    the table's sizes is still timed at every size; the work per candidate is the same)."""
    if n < 1 or num_ads < 1:
        raise ValueError(f"candidates and ads must be >= 1; got {n} candidates of {num_ads} ads")
    one = req.take(np.array([row]))
    ads = rng.choice(num_ads, size=n, replace=n > num_ads).astype(np.int64)[None, :]
    return Requests(request_id=one.request_id, user_id=one.user_id, context=one.context,
                    candidates=ads, bid=np.ones((1, n), dtype=np.float32))


def measure(phone: PCVRModel, onnx: bytes, examples: Examples, user_id: int, *, reps: int = 300,
            warmup: int = 20) -> dict[str, float]:
    """p50 / p99 (ms) of one request's scoring: ``onnx_*`` and ``torch_*``. ``phone``:
    the phone's model (``user_rows=1``); ``examples``: the request's candidate rows."""
    scorer = export.OnnxScorer(onnx, threads=1)
    feed = export.request_inputs(export.graph_inputs(phone), examples, local=export.local_rows(phone, user_id))
    batch = remap_user(examples.to_batch())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            t50, t99 = _percentiles(lambda: phone(batch), reps, warmup)
    finally:
        torch.set_num_threads(threads)
    o50, o99 = _percentiles(lambda: scorer.score(feed), reps, warmup)
    return {"onnx_p50_ms": o50, "onnx_p99_ms": o99, "torch_p50_ms": t50, "torch_p99_ms": t99}


def latency_table(phone: PCVRModel, onnx: bytes, req: Requests, row: int, users: Examples, ads: Examples,
                  sizes: Sequence[int] = (20, 100, 200), *, reps: int = 300,
                  seed: int = 0) -> list[dict[str, float]]:
    """:func:`measure` for requests of each size in ``sizes`` (request ``row``'s user
    and context, random ads), one row per size."""
    rng = np.random.default_rng([seed, 0x1A7])
    rows = []
    for n in sizes:
        one = synthetic_request(req, row, n, len(ads), rng)
        examples = request_examples(one, users, ads)
        rows.append({"candidates": n, **measure(phone, onnx, examples, int(one.user_id[0]), reps=reps)})
    return rows
