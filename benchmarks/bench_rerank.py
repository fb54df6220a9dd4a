"""Benchmark: per-request scoring latency of the device model, ONNX vs torch, one thread.

Loads a trained run (``--run``, a full model from ``adfed train``) or, without one, a
freshly initialised model of the default shape over ``--data`` (latency does not depend
on the weights), exports phone 0's request graph to ONNX and times one request of 20,
100 and 200 candidates (the first held-out request's user and context, random ads):
onnxruntime on one intra-op thread beside the torch model's forward on one thread.
Prints one JSON object::

    python benchmarks/bench_rerank.py                         # data/demo, fresh model
    python benchmarks/bench_rerank.py --run RUN --data data/demo --reps 1000

Target (issue 24): p99 <= 1 ms per request of 100 candidates with the exported model.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from adfed.config import Config, with_overrides
from adfed.data.store import Dataset
from adfed.model.assembly import model_from_config
from adfed.rerank import export
from adfed.rerank.latency import latency_table
from adfed.rerank.requests import read_requests, request_examples, user_table
from adfed.rerank.runs import load_run, phone_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/demo"))
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 100, 200])
    args = ap.parse_args()
    dataset = Dataset.open(args.data)
    req, users = read_requests(dataset), user_table(dataset)
    if args.run is not None:
        cfg, full = load_run(args.run, dataset)
    else:
        cfg = with_overrides(Config(), [f'data.path="{args.data}"'])
        full = model_from_config(cfg, dataset).eval()
    user = int(req.user_id[0])
    phone = phone_model(cfg, dataset, full, user)
    one = request_examples(req.take(np.array([0])), users, dataset.ads)
    inputs = export.graph_inputs(phone)
    onnx = export.export_onnx(phone, export.available_fields(one),
                              export.request_inputs(inputs, one, local=export.local_rows(phone, user)))
    rows = latency_table(phone, onnx, req, 0, users, dataset.ads, args.sizes, reps=args.reps)
    print(json.dumps({
        "data": str(args.data), "run": str(args.run) if args.run else None, "reps": args.reps,
        "onnx_bytes": len(onnx), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "machine": platform.processor() or platform.machine(), "threads": 1, "latency": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
