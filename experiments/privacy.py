"""Privacy experiments (issue: differential privacy): what ε costs, and what the round
vocabulary costs.

- ``privacy``: the configured federated run (its ``fl.clients_per_round`` is the expected
  cohort) non-private, then the configured mechanism (``privacy.mechanism``: DP-FedAvg by
  default, ``--set privacy.mechanism="dp_ftrl"`` for DP-FTRL) at each ε of ``EPSILONS`` (the noise multiplier
  calibrated by the accountant for the planned rounds at δ = 1/N^1.1) and at ε = ∞ (the
  same clipping, Poisson sampling and fixed denominator, no noise: what DP's mechanics
  cost before any noise). CVR AUC and expected AUC at equal rounds. Beside the runs, the
  accountant alone: the noise multiplier that ε = 8 needs, and the noise std it puts on
  each coordinate of the mean update, for populations of 100k, 1M and 10M phones at the
  same cohort and rounds (the procedural world makes these populations cheap to have;
  the accountant needs no run).
- ``vocabulary``: DP-FedAvg at ε = ∞ with the round vocabulary at several sizes against
  every row (uploads over the whole table: numerically the same as touched-row uploads
  with a fixed denominator, and their upper bound in bytes): AUC at equal rounds and
  bytes up per phone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from adfed.config import Config, with_overrides
from adfed.data.store import Dataset
from adfed.fl.population import Population
from adfed.privacy.accountant import calibrate, make_plan
from adfed.trainer import TrainResult
from experiments import plotting
from experiments.runs import Progress, train_and_write

EPSILONS = (1.0, 2.0, 4.0, 8.0)
POPULATIONS = (100_000, 1_000_000, 10_000_000)
VOCABULARY_SIZES = (256, 1024, 4096)


def _row(result: TrainResult) -> dict[str, Any]:
    s = result.summary
    keys = ("auc", "auc_expected", "ctcvr_auc", "mechanism", "epsilon", "epsilon_pld", "delta", "noise_multiplier",
            "sampling_rate", "clip", "bytes_up_per_client", "bytes_down_per_client", "rounds", "wall_time_s")
    return {k: s.get(k) for k in keys}


def sweep(base: Config, dataset: Dataset, out: Path, progress: Progress) -> dict[str, Any]:
    fed = with_overrides(base, ['train.mode="federated"'])
    runs: dict[str, dict[str, Any]] = {"non_private": _row(train_and_write(fed, dataset, out / "non_private", progress))}
    dp = with_overrides(fed, ["privacy.dp=true"])
    runs["eps_inf"] = _row(train_and_write(with_overrides(dp, ["privacy.noise_multiplier=0"]), dataset, out / "eps_inf",
                                progress))
    for eps in EPSILONS:
        cfg = with_overrides(dp, [f"privacy.target_epsilon={eps}", 'privacy.on_target="calibrate"'])
        runs[f"eps_{eps:g}"] = _row(train_and_write(cfg, dataset, out / f"eps_{eps:g}", progress))
    base_auc = runs["non_private"]["auc"]
    for r in runs.values():
        r["auc_minus_non_private"] = r["auc"] - base_auc
        if r.get("auc_expected") is not None and runs["non_private"].get("auc_expected") is not None:
            r["auc_expected_minus_non_private"] = r["auc_expected"] - runs["non_private"]["auc_expected"]
    population = len(Population(dataset, test_fraction=fed.data.test_fraction, seed=fed.seed))
    return {"population": population, "clients_per_round": fed.fl.clients_per_round, "rounds": fed.fl.rounds,
            "runs": runs, "population_scaling": scaling(dp, fed.fl.rounds)}


def scaling(dp: Config, rounds: int, eps: float = 8.0) -> list[dict[str, float]]:
    """The accountant alone: z for ε at δ = 1/N^1.1 over ``rounds`` rounds of the same
    cohort, and the per-coordinate noise std of the mean update (z C / cohort)."""
    out = []
    for n in POPULATIONS:
        plan = dataclasses.replace(make_plan(dp, n), vocabulary_noise=None)
        z = calibrate(plan, rounds, eps)
        out.append({"population": n, "epsilon": eps, "delta": plan.delta, "sampling_rate": plan.sampling_rate,
                    "noise_multiplier": z, "mean_noise_std": z * dp.privacy.clip / plan.cohort})
    return out


def vocabulary(base: Config, dataset: Dataset, out: Path, progress: Progress) -> dict[str, Any]:
    dp = with_overrides(base, ['train.mode="federated"', "privacy.dp=true", "privacy.noise_multiplier=0"])
    runs = {"all_rows": _row(train_and_write(with_overrides(dp, ["privacy.vocabulary_size=0"]), dataset, out / "all_rows",
                                  progress))}
    for size in VOCABULARY_SIZES:
        runs[f"vocab_{size}"] = _row(train_and_write(with_overrides(dp, [f"privacy.vocabulary_size={size}"]), dataset,
                                          out / f"vocab_{size}", progress))
    for r in runs.values():
        r["auc_minus_all_rows"] = r["auc"] - runs["all_rows"]["auc"]
    return {"runs": runs}


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    fig, ax = plotting.new_axes()
    runs = results["runs"]
    eps = [e for e in EPSILONS if f"eps_{e:g}" in runs]
    mechanism = {"dp_fedavg": "DP-FedAvg", "dp_ftrl": "DP-FTRL"}.get(
        str(runs[f"eps_{eps[0]:g}"].get("mechanism")) if eps else "", "DP-FedAvg")  # results before 2026-12-07: FedAvg
    for key, label in (("auc", "CVR AUC"), ("auc_expected", "expected CVR AUC")):
        ys = [runs[f"eps_{e:g}"].get(key) for e in eps]
        if all(y is not None for y in ys):
            line = ax.plot(eps, ys, marker="o", label=f"{label}, {mechanism}")[0]
            ax.axhline(runs["non_private"][key], ls="--", color=line.get_color(), label=f"{label}, non-private")
            ax.axhline(runs["eps_inf"][key], ls=":", color=line.get_color(), label=f"{label}, ε = ∞ (clip only)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ε (δ = 1/N^1.1)")
    ax.set_ylabel("test AUC")
    plotting.save(fig, ax, path, f"privacy: N={results['population']}, {results['clients_per_round']} "
                                 f"phones/round, {results['rounds']} rounds")


def plot_vocabulary(results: dict[str, Any], path: Path) -> None:
    fig, ax = plotting.new_axes()
    runs = results["runs"]
    for name, r in runs.items():
        ax.scatter(r["bytes_up_per_client"] / 1e3, r["auc"], label=name)
    ax.set_xlabel("upload per phone (kB)")
    ax.set_ylabel("test CVR AUC")
    plotting.save(fig, ax, path, "round vocabulary: AUC vs upload size (DP mechanics, no noise)")
