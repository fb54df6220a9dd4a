"""``adfed rerank``'s work and its files: OUT/rerank.json, rerank_by_k.csv, the plot,
the exported device model (device_model.onnx) and, when no cloud run is given, the
cloud's ``cloud_only`` run trained here (OUT/cloud_run)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from adfed import config as config_mod
from adfed import rundir
from adfed.data.store import Dataset
from adfed.errors import ConfigError
from adfed.model.pcvr import PCVRModel
from adfed.rerank import evaluate as ev
from adfed.rerank.device import RerankSettings
from adfed.rerank.latency import latency_table
from adfed.rerank.requests import read_requests, user_table
from adfed.rerank.runs import load_run, phone_model
from adfed.tags.evaluate import mine_tags
from adfed.tags.model import TagSettings

logger = logging.getLogger(__name__)

Say = Callable[[str], None]
#: the request sizes of the latency table; the headline latency is at 100 candidates
LATENCY_SIZES = (20, 100, 200)


def cloud_model(run: Path, cloud_run: Path | None, dataset: Dataset, out: Path, say: Say) -> tuple[Path, PCVRModel]:
    """The cloud's ``cloud_only`` model: ``cloud_run``'s, or one trained now with
    ``run``'s config (centralized, ``model.variant="cloud_only"``; the cloud sees every
    impression's cloud-visible fields) and saved as ``out/cloud_run``.

    Raises
    ------
    ConfigError : ``cloud_run``'s model reads private fields (not a cloud model).
    """
    if cloud_run is not None:
        cfg, model = load_run(cloud_run, dataset)
        if cfg.model.variant != "cloud_only":
            raise ConfigError(f"--cloud-run {cloud_run}: its model.variant is {cfg.model.variant!r}; the cloud "
                              f"ranks without private fields: train one with --set model.variant=cloud_only")
        return cloud_run, model
    from adfed.trainer import Trainer

    base = config_mod.load(run / "config.toml")
    cfg = config_mod.with_overrides(base, ['model.variant="cloud_only"', 'train.mode="centralized"',
                                           f'data.path="{dataset.path}"'])
    target = out / "cloud_run"
    aside = rundir.prepare_out(target, resume=False, overwrite=True, federated=False)
    say(f"no --cloud-run: training the cloud's cloud_only model (centralized) into {target}")
    try:
        result = Trainer(cfg).fit(dataset)
        rundir.write_run(target, cfg, result)
    except BaseException:
        rundir.restore_out(target, aside)
        raise
    rundir.finish_out(aside)
    return target, result.model.eval()


def plot_uplift(path: Path, curve: list[dict[str, Any]], objective: str) -> None:
    """Uplift of expected conversions and revenue@k over the cloud's order against k:
    the device's and the oracle's, with their bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in curve]
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.0), dpi=110, sharex=True)
    for ax, what in zip(axes, ("conversions", "revenue"), strict=True):
        for name, color, label in (("device", "tab:blue", "device order (phone's model)"),
                                   ("oracle", "tab:gray", "oracle order (the truth)"),
                                   ("cloud_objective", "tab:orange", "cloud model, phone's objective")):
            key = f"uplift_{what}_{name}"
            mid = np.array([r[key] for r in curve]) * 100
            ax.plot(ks, mid, marker="o", ms=3, color=color, label=label)
            ax.fill_between(ks, [r[f"{key}_low"] * 100 for r in curve], [r[f"{key}_high"] * 100 for r in curve],
                            color=color, alpha=0.15)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("k (positions counted)")
        ax.set_ylabel(f"expected {what}@k vs the cloud's eCPM order (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"On-device re-ranking (phone's objective: {objective}; 95% bootstrap intervals)")
    rundir.save_figure(fig, path)


def run_rerank(run: Path, data: Path, out: Path, settings: RerankSettings, *, cloud_run: Path | None = None,
               say: Say = logger.info, progress: ev.Progress | None = None) -> dict[str, Any]:
    """Re-rank ``data``'s held-out requests with ``run``'s model on the phones and write
    OUT's files; returns ``rerank.json``'s content."""
    dataset = Dataset.open(data)
    req = read_requests(dataset)
    if len(req) == 0:
        raise ConfigError(f"{data}: requests.parquet holds no request")
    cfg, device = load_run(run, dataset)
    if cfg.model.variant == "cloud_only":
        raise ConfigError(f"--run {run}: its model.variant is 'cloud_only'; the phone re-ranks with the full "
                          f"model (give it as --cloud-run instead)")
    out.mkdir(parents=True, exist_ok=True)
    cloud_path, cloud = cloud_model(run, cloud_run, dataset, out, say)
    say(f"scoring {len(req)} requests x {req.num_candidates} candidates (cloud: torch; device: ONNX)")
    examples = ev.candidate_examples(dataset, req)
    scores, onnx = ev.score_requests(cloud, device, req, examples, progress=progress)
    rundir.atomic_write(out / "device_model.onnx", onnx)
    result = ev.evaluate_orders(settings, dataset, req, scores, cfg.data.test_fraction)
    say("measuring latency (one thread) for " + ", ".join(map(str, LATENCY_SIZES)) + " candidates")
    phone = phone_model(cfg, dataset, device, int(req.user_id[0]))
    lat = latency_table(phone, onnx, req, 0, user_table(dataset), dataset.ads, LATENCY_SIZES, seed=settings.seed)
    head = next(r for r in lat if r["candidates"] == 100)
    result.update(latency_p50_ms=head["onnx_p50_ms"], latency_p99_ms=head["onnx_p99_ms"], latency_candidates=100,
                  latency=lat, run=str(run), cloud_run=str(cloud_path), data=str(data),
                  mode=cfg.train.mode, settings=dataclasses.asdict(settings))
    write_outputs(out, result, settings)
    return result


def write_outputs(out: Path, result: dict[str, Any], settings: RerankSettings) -> None:
    """rerank.json, rerank_by_k.csv and plots/uplift_vs_k.png."""
    rundir.atomic_write(out / "rerank.json", json.dumps(result, indent=2, default=float) + "\n")
    rundir.write_rows(out / "rerank_by_k.csv", result["curve"])
    plot_uplift(out / "plots" / "uplift_vs_k.png", result["curve"], settings.objective)



def add_tags(out: Path, result: dict[str, Any], data: Path, truth: np.ndarray | None, *, seed: int = 0,
             settings: TagSettings | None = None) -> None:
    """Mine user tags on ``data`` (:func:`adfed.tags.evaluate.mine_tags`; ``truth``: the
    true propensity per user and category, or None) and rewrite rerank.json with them
    under ``tags``."""
    result["tags"] = mine_tags(Dataset.open(data), truth, settings or TagSettings(), seed=seed)
    rundir.atomic_write(out / "rerank.json", json.dumps(result, indent=2, default=float) + "\n")
