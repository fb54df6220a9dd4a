"""Re-ranking of a world's held-out requests, valued with their truth.

:func:`score_requests` scores every candidate with the cloud's model (torch) and with
the device model as phones run it (the exported ONNX graph under onnxruntime, each
request with its user's ``local`` rows), checking the ONNX scores against the torch
model's on every candidate. :func:`evaluate_orders` values the cloud's, the device's
and the oracle's orders (:mod:`adfed.rerank.metrics`): the figures of ``rerank.json``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from adfed.data.examples import Examples
from adfed.data.store import Dataset, num_train_rows
from adfed.model.pcvr import PCVRModel
from adfed.model.predict import predict
from adfed.rerank import export
from adfed.rerank.device import RerankSettings, cloud_sends, device_scores, objective_value
from adfed.rerank.metrics import (
    ACTIVITY_BUCKETS,
    activity_bucket,
    ndcg_at_k,
    order_by,
    uplift,
    value_at_k,
)
from adfed.rerank.requests import Requests, request_examples, user_table

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per-candidate scores of R requests, float32 [R, N] each.

    ``onnx_max_abs_diff``: the largest |ONNX - torch| over every candidate's pCTR, pCVR
    and pCTCVR of the device model.
    """

    cloud_pctr: np.ndarray
    cloud_pcvr: np.ndarray
    device_pctr: np.ndarray
    device_pcvr: np.ndarray
    onnx_max_abs_diff: float


def _shape(values: np.ndarray, req: Requests) -> np.ndarray:
    return values.reshape(len(req), req.num_candidates)


def candidate_examples(dataset: Dataset, req: Requests) -> Examples:
    """Every candidate's model inputs (:func:`~adfed.rerank.requests.request_examples`)."""
    return request_examples(req, user_table(dataset), dataset.ads)


def onnx_scores(device: PCVRModel, req: Requests, examples: Examples, *,
                progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, bytes]:
    """The device model's (pCTR, pCVR) of every candidate [R, N], one request at a time
    through its exported ONNX graph with the request's user's ``local`` rows; and the
    ONNX bytes. ``device``: a full-size model (one local row per user)."""
    n = req.num_candidates
    inputs = export.graph_inputs(device)
    one = examples.slice(0, n)
    onnx = export.export_onnx(device, export.available_fields(one), export.request_inputs(
        inputs, one, local=export.local_rows(device, int(req.user_id[0]))))
    scorer = export.OnnxScorer(onnx)
    pctr = np.empty((len(req), n), dtype=np.float32)
    pcvr = np.empty_like(pctr)
    for r in range(len(req)):
        feed = export.request_inputs(inputs, examples.slice(r * n, (r + 1) * n),
                                     local=export.local_rows(device, int(req.user_id[r])))
        pctr[r], pcvr[r], _ = scorer.score(feed)
        if progress is not None and (r % 200 == 0 or r == len(req) - 1):
            progress(r + 1, len(req))
    return pctr, pcvr, onnx


def score_requests(cloud: PCVRModel, device: PCVRModel, req: Requests, examples: Examples, *,
                   progress: Progress | None = None) -> tuple[Scores, bytes]:
    """Cloud (torch) and device (ONNX) scores of every candidate, and the ONNX bytes."""
    c_ctr, c_cvr = predict(cloud, examples)
    t_ctr, t_cvr = predict(device, examples)
    d_ctr, d_cvr, onnx = onnx_scores(device, req, examples, progress=progress)
    t_ctr, t_cvr = _shape(t_ctr, req), _shape(t_cvr, req)
    diff = max(float(np.abs(d_ctr - t_ctr).max()), float(np.abs(d_cvr - t_cvr).max()),
               float(np.abs(d_ctr * d_cvr - t_ctr * t_cvr).max())) if len(req) else 0.0
    scores = Scores(cloud_pctr=_shape(c_ctr, req), cloud_pcvr=_shape(c_cvr, req),
                    device_pctr=d_ctr, device_pcvr=d_cvr, onnx_max_abs_diff=diff)
    return scores, onnx


def orders(settings: RerankSettings, req: Requests, s: Scores) -> tuple[Requests, dict[str, np.ndarray]]:
    """The requests as the phone receives them (the cloud's top ``top_n``, in eCPM order)
    and the orders of those: ``cloud`` (eCPM), ``cloud_objective`` (the cloud model's own
    estimate of the phone's objective: the control that isolates what the device's
    features add), ``device`` and ``oracle``; int64 [R, M] each."""
    sent = cloud_sends(req.bid, s.cloud_pctr, s.cloud_pcvr, settings.top_n)
    got = req.with_candidates(sent)

    def take(a: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a, sent, axis=1)

    cloud_ctcvr = take(s.cloud_pctr) * take(s.cloud_pcvr)
    device_ctcvr = take(s.device_pctr) * take(s.device_pcvr)
    assert got.p_click is not None and got.p_cvr is not None  # checked by evaluate_orders
    truth = got.p_click.astype(np.float64) * got.p_cvr
    m = sent.shape[1]
    return got, {
        "cloud": np.tile(np.arange(m), (len(req), 1)),
        "cloud_objective": order_by(objective_value(settings.objective, got.bid, cloud_ctcvr)),
        "device": order_by(device_scores(settings, got.bid, device_ctcvr, cloud_ctcvr)),
        "oracle": order_by(objective_value(settings.objective, got.bid, truth)),
    }


def _values(got: Requests) -> dict[str, np.ndarray]:
    assert got.p_click is not None and got.p_cvr is not None
    ctcvr = got.p_click.astype(np.float64) * got.p_cvr
    return {"conversions": ctcvr, "revenue": ctcvr * got.bid}


def curve_rows(settings: RerankSettings, got: Requests, ords: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per cut-off k: expected conversions and revenue@k of each order, NDCG@k,
    and the uplifts over the cloud's order with their intervals."""
    values, rows = _values(got), []
    for k in sorted(set(settings.ks) | {settings.k}):
        rng = np.random.default_rng([settings.seed, k])
        row: dict[str, Any] = {"k": k}
        for what, value in values.items():
            per = {name: value_at_k(o, value, k) for name, o in ords.items()}
            for name, v in per.items():
                row[f"{what}_{name}"] = float(v.sum())
            for name in ("device", "oracle", "cloud_objective"):
                row.update(uplift(per[name], per["cloud"], rng, reps=settings.bootstrap).as_dict(
                    f"uplift_{what}_{name}"))
        for name, o in ords.items():
            row[f"ndcg_{name}"] = float(ndcg_at_k(o, values["conversions"], k).mean())
        rows.append(row)
    return rows


def by_activity(settings: RerankSettings, got: Requests, ords: dict[str, np.ndarray],
                train_rows: np.ndarray) -> list[dict[str, Any]]:
    """The uplift of conversions@k (device and oracle over cloud) per user-activity
    bucket (:data:`~adfed.rerank.metrics.ACTIVITY_BUCKETS`, training impressions)."""
    value, k, out = _values(got)["conversions"], settings.k, []
    bucket = activity_bucket(train_rows)
    for i, (name, _, _) in enumerate(ACTIVITY_BUCKETS):
        mask = bucket == i
        rng = np.random.default_rng([settings.seed, 100 + i])
        per = {n: value_at_k(o[mask], value[mask], k) for n, o in ords.items()}
        out.append({"users": name, "requests": int(mask.sum()),
                    **uplift(per["device"], per["cloud"], rng, reps=settings.bootstrap).as_dict("uplift_device"),
                    **uplift(per["oracle"], per["cloud"], rng, reps=settings.bootstrap).as_dict("uplift_oracle")})
    return out


def evaluate_orders(settings: RerankSettings, dataset: Dataset, req: Requests, s: Scores,
                    test_fraction: float) -> dict[str, Any]:
    """The figures of ``rerank.json`` (less latency): headline values at ``settings.k``,
    ``curve`` (per k) and ``by_activity``.

    Raises
    ------
    ValueError : the requests carry no truth (a live request cannot be valued).
    """
    if req.p_click is None or req.p_cvr is None:
        raise ValueError("the requests carry no truth (p_click, p_cvr); only a synthetic world's can be valued")
    got, ords = orders(settings, req, s)
    curve = curve_rows(settings, got, ords)
    head = next(r for r in curve if r["k"] == settings.k)
    k = settings.k
    train_rows = num_train_rows(dataset.rows_of_users(req.user_id), test_fraction)
    out: dict[str, Any] = {
        "requests": len(req), "candidates_per_request": req.num_candidates,
        "candidates_sent": got.num_candidates, "objective": settings.objective, "blend": settings.blend,
        "k": k, "position_bias": "1/log2(position+1)",
        "onnx_max_abs_diff": s.onnx_max_abs_diff,
    }
    for what in ("conversions", "revenue"):
        for name in ("device", "oracle", "cloud_objective"):
            pre = f"uplift_{what}_{name}"
            key = f"uplift_{what}_at_{k}" + ("" if name == "device" else f"_{name}")
            out.update({key: head[pre], f"{key}_low": head[f"{pre}_low"], f"{key}_high": head[f"{pre}_high"]})
        for name in ("cloud", "device", "oracle"):
            out[f"{what}_at_{k}_{name}"] = head[f"{what}_{name}"]
    for name in ("cloud", "cloud_objective", "device", "oracle"):
        out[f"ndcg_at_{k}_{name}"] = head[f"ndcg_{name}"]
    oracle_gain = out[f"uplift_conversions_at_{k}_oracle"]
    out["share_of_oracle_uplift"] = out[f"uplift_conversions_at_{k}"] / oracle_gain if oracle_gain > 0 else None
    out["curve"] = curve
    out["by_activity"] = by_activity(settings, got, ords, train_rows)
    return out
