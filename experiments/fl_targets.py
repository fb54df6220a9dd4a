"""Experiments behind the federated engine's targets (issue: federated engine).

Each experiment trains several runs on one dataset and writes ``OUT/<name>/``: every run's
directory (config.toml, summary.json, rounds.csv, plots), ``results.json`` and a
comparison plot. Numbers are what these runs measured; nothing is tuned per target.

- ``fl_vs_central``: centralized training, then federated training with the configured
  strategy (and the FedAvg defaults until late 2026-12-06, ``experiments/configs/fedavg.toml``,
  too when that is another one); for each, the first evaluated round
  whose AUC reaches ``centralized_auc - 0.01``, with its simulated time, and the same in
  expected AUC on synthetic data (``reached_expected``).
- ``window``: the same sync run waiting for every sampled client
  (``window.kind="none"``, no over-selection) vs the adaptive window with over-selection: median simulated round time ratio and
  the AUC difference at equal rounds.
- ``async``: sync (adaptive window) vs FedBuff at the same client concurrency and the
  same number of client updates: the simulated time each needs to reach the sync run's
  target AUC, taken as the best 3-point moving average of the sync AUC curve (single
  evaluations wander by a few 0.01; a run "reaches" the target when its own moving
  average does).
- ``ceiling`` (the model issue's target): the centralized model beside the oracle, the
  oracle without the user residual and an optimistic well-specified regression, on the
  same test rows with paired bootstrap intervals (:mod:`experiments.ceiling`).
- ``scale``: the centralized model and the oracle on the dataset's world regenerated at
  1x, 4x and 16x its users, with decaying and constant learning rates (:mod:`experiments.scale`).
- ``replay``: FedAvg's and FedAdam's arithmetic replayed centrally (one pass in batches
  of whole users, SGD vs Adam), no federation (:mod:`experiments.replay`).
- ``replay_parts``: the same with Adam on one part at a time (towers, small tables, big
  rows), users drawn once or redrawn as the engine does (:func:`experiments.replay.analyse_parts`).
- ``privacy`` and ``vocabulary``: DP-FedAvg's ε sweep against non-private training, and
  the round vocabulary's cost (:mod:`experiments.privacy`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adfed import rundir
from adfed.config import Config, with_file, with_overrides
from adfed.data.store import Dataset
from adfed.fl.population import Population
from adfed.trainer import TrainResult
from experiments import ceiling, plotting, privacy, replay, scale
from experiments.runs import Progress, train_and_write

#: the federated defaults until late 2026-12-06 (FedAvg), a config preset
FEDAVG_PRESET = Path(__file__).parent / "configs" / "fedavg.toml"


def first_reaching(rows: list[dict[str, Any]], target: float, key: str = "auc") -> dict[str, Any] | None:
    """The first evaluated row whose ``key`` (``auc`` or ``auc_expected``) is at least ``target``."""
    for row in rows:
        auc = row.get(key)
        if auc is not None and auc >= target:
            return {"round": row["round"], "sim_time_s": row["sim_time_s"], key: auc}
    return None


def smoothed(rows: list[dict[str, Any]], width: int = 3) -> list[dict[str, Any]]:
    """The evaluated rows from the ``width``-th on, each with ``auc`` replaced by the mean
    of its last ``width`` evaluations. Full windows only: a run's first evaluation alone
    is not a moving average (an earlier version let one lucky first point count)."""
    evaluated = [r for r in rows if r.get("auc") is not None]
    return [{**r, "auc": float(np.mean([e["auc"] for e in evaluated[i + 1 - width : i + 1]]))}
            for i, r in enumerate(evaluated) if i + 1 >= width]


def fl_vs_central(base: Config, dataset: Dataset, out: Path, progress: Progress) -> dict[str, Any]:
    central = train_and_write(with_overrides(base, ['train.mode="centralized"']), dataset, out / "centralized", progress)
    target = central.summary["auc"] - 0.01
    # the same target in expected AUC (synthetic data only): free of label-sampling noise
    central_expected = central.summary.get("auc_expected")
    target_expected = None if central_expected is None else central_expected - 0.01
    fed_cfg = with_overrides(base, ['train.mode="federated"'])
    runs = {fed_cfg.fl.strategy: fed_cfg}
    if fed_cfg.fl.strategy != "fedavg":  # the FedAvg defaults until late 2026-12-06, beside
        runs["fedavg"] = with_file(fed_cfg, FEDAVG_PRESET)
    federated = {}
    first: TrainResult | None = None
    for name, cfg in runs.items():
        fed = train_and_write(cfg, dataset, out / name, progress)
        first = first or fed
        federated[name] = {
            "final_auc": fed.summary["auc"],
            "reached": first_reaching(fed.rows, target),
            "final_auc_expected": fed.summary.get("auc_expected"),
            "reached_expected": None if target_expected is None
            else first_reaching(fed.rows, target_expected, "auc_expected"),
            "rounds": fed.summary["rounds"],
            "sim_time_s": fed.summary["sim_time_s"],
            "server_lr": cfg.fl.server_lr_for(),
            "bytes_up_per_client": fed.summary["bytes_up_per_client"],
            "bytes_up_dense_per_client": fed.summary["bytes_up_dense_per_client"],
            "bytes_up_sparse_per_client": fed.summary["bytes_up_sparse_per_client"],
            "bytes_down_per_client": fed.summary["bytes_down_per_client"],
            "model_bytes": fed.summary["model_bytes"],
        }
    return {
        "one_pass": one_pass(central.summary, first, fed_cfg, dataset) if first else {},
        "centralized_auc": central.summary["auc"],
        "oracle_auc": central.summary.get("oracle_auc"),
        "target_auc": target,
        "centralized_auc_expected": central_expected,
        "target_auc_expected": target_expected,
        "federated": federated,
    }


def one_pass(central: Mapping[str, Any], fed: TrainResult, cfg: Config, dataset: Dataset) -> dict[str, Any]:
    """The federated run after one pass over the users (``users / clients_per_round``
    rounds: as many examples as one centralized epoch) against the centralized epoch: the
    gap in sampled and expected CVR AUC at the last evaluation at or before that round,
    and the wall time federated / centralized for the same examples (evaluation excluded
    on both sides). ``central``: the centralized run's summary."""
    clients = len(Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed))
    rounds = -(-clients // cfg.fl.clients_per_round)
    evaluated = [r for r in fed.rows if r.get("auc") is not None and r["round"] <= rounds]
    if not evaluated:
        return {"rounds": rounds, "reached": False}
    row = evaluated[-1]
    upto = [r for r in fed.rows if r["round"] <= row["round"]]
    fed_wall = row["wall_time_s"] - sum(r.get("eval_s", 0.0) for r in upto)
    s = central
    central_train_s = s["train_examples"] * s.get("epochs", 1) / s["examples_per_s"]
    out = {"rounds": rounds, "evaluated_round": row["round"], "reached": row["round"] == rounds,
           "auc": row["auc"], "auc_gap": s["auc"] - row["auc"],
           "federated_wall_s": fed_wall, "centralized_train_s": central_train_s,
           "wall_ratio": fed_wall / central_train_s}
    if row.get("auc_expected") is not None and s.get("auc_expected") is not None:
        out |= {"auc_expected": row["auc_expected"], "auc_expected_gap": s["auc_expected"] - row["auc_expected"]}
    return out


def window(base: Config, dataset: Dataset, out: Path, progress: Progress) -> dict[str, Any]:
    fed = with_overrides(base, ['train.mode="federated"'])
    # The baseline waits for every sampled client: no deadline and no over-selection.
    wait_all = train_and_write(with_overrides(fed, ['window.kind="none"', "fl.over_selection=1.0"]),
                    dataset, out / "wait_all", progress)
    adaptive = train_and_write(with_overrides(fed, ['window.kind="adaptive"']), dataset, out / "adaptive", progress)
    med_all = wait_all.summary["median_round_sim_s"]
    med_ad = adaptive.summary["median_round_sim_s"]
    return {
        "median_round_sim_s_wait_all": med_all,
        "median_round_sim_s_adaptive": med_ad,
        "speedup": med_all / med_ad,
        "auc_wait_all": wait_all.summary["auc"],
        "auc_adaptive": adaptive.summary["auc"],
        "auc_loss": wait_all.summary["auc"] - adaptive.summary["auc"],
        # the target is judged on expected AUC where the dataset has truth (docs/results/2026-11-27-window.md)
        "auc_expected_wait_all": wait_all.summary.get("auc_expected"),
        "auc_expected_adaptive": adaptive.summary.get("auc_expected"),
        "auc_expected_loss": (wait_all.summary["auc_expected"] - adaptive.summary["auc_expected"]
                              if "auc_expected" in wait_all.summary and "auc_expected" in adaptive.summary else None),
        "late_clients_adaptive": adaptive.summary["late_clients"],
        "sim_time_s_wait_all": wait_all.summary["sim_time_s"],
        "sim_time_s_adaptive": adaptive.summary["sim_time_s"],
    }


def asynchronous(base: Config, dataset: Dataset, out: Path, progress: Progress) -> dict[str, Any]:
    fed = with_overrides(base, ['train.mode="federated"'])
    sync = train_and_write(with_overrides(fed, ['window.kind="adaptive"']), dataset, out / "sync", progress)
    k = fed.fl.clients_per_round
    # same number of client updates as the sync run: rounds * k = steps * buffer
    buffer = min(fed.fl.async_buffer, k)
    steps = fed.fl.rounds * k // buffer
    asy = train_and_write(with_overrides(fed, ['fl.schedule="async"', f"fl.async_concurrency={k}",
                                    f"fl.async_buffer={buffer}", f"fl.rounds={steps}",
                                    f"fl.eval_every={max(1, fed.fl.eval_every * k // buffer)}"]),
               dataset, out / "async", progress)
    width = min(3, sum(r.get("auc") is not None for r in sync.rows))  # 3, or all of a shorter run
    sync_curve, async_curve = smoothed(sync.rows, width), smoothed(asy.rows, width)
    target = max(r["auc"] for r in sync_curve)
    sync_hit = first_reaching(sync_curve, target)
    async_hit = first_reaching(async_curve, target)
    ratio = None
    if sync_hit and async_hit:
        ratio = sync_hit["sim_time_s"] / async_hit["sim_time_s"]
    return {"target_auc": target,
            "target_rule": f"best {width}-point moving average of the sync AUC (full windows; a run reaches "
                           f"it when its own {width}-point moving average does)",
            "sync": sync_hit, "async": async_hit, "sync_over_async_time": ratio,
            "sync_final_auc": sync.summary["auc"], "async_final_auc": asy.summary["auc"],
            "sync_sim_time_s": sync.summary["sim_time_s"], "async_sim_time_s": asy.summary["sim_time_s"],
            "async_buffer": buffer, "async_steps": steps}


def model_ceiling(base: Config, dataset: Dataset, out: Path, progress: Progress) -> dict[str, Any]:
    ceiling.world_of(dataset)  # an import has no world to regenerate: say so before training
    central = train_and_write(with_overrides(base, ['train.mode="centralized"', "data.max_test_users=0"]),
                   dataset, out / "centralized", progress)
    return {"centralized_summary_auc": central.summary["auc"],
            **ceiling.analyse(base, dataset, central.model, progress)}


EXPERIMENTS: dict[str, Callable[[Config, Dataset, Path, Progress], dict[str, Any]]] = {
    "fl_vs_central": fl_vs_central,
    "window": window,
    "async": asynchronous,
    "ceiling": model_ceiling,
    "replay": lambda base, dataset, out, progress: replay.analyse(base, dataset, progress),
    "replay_parts": lambda base, dataset, out, progress: replay.analyse_parts(base, dataset, progress),
    "scale": scale.analyse,
    "privacy": privacy.sweep,
    "vocabulary": privacy.vocabulary,
}
#: Experiments whose plot is not the default AUC-vs-simulated-time one of their runs.
PLOTS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "ceiling": ceiling.plot, "replay": replay.plot, "replay_parts": replay.plot_parts, "scale": scale.plot,
    "privacy": privacy.plot_sweep, "vocabulary": privacy.plot_vocabulary}


def run(name: str, base: Config, out: Path, progress: Progress = lambda _: None) -> dict[str, Any]:
    """Run experiment ``name`` and write ``OUT/name/results.json``; returns the results."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
    dataset = Dataset.open(base.data.path)
    target = out / name
    results = EXPERIMENTS[name](base, dataset, target, progress)
    results = {"experiment": name, "data": str(base.data.path), "seed": base.seed, **results}
    rundir.atomic_write(target / "results.json", json.dumps(results, indent=2, default=_json) + "\n")
    if name in PLOTS:
        PLOTS[name](results, target / f"{name}.png")
    else:
        _plot(name, target)
    return results


def _json(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)  # type: ignore[arg-type]
    raise TypeError(type(o))


def _plot(name: str, target: Path) -> None:
    """AUC vs simulated time of every federated run of the experiment, in one PNG."""
    fig, ax = plotting.new_axes()
    for run_dir in sorted(p for p in target.iterdir() if (p / "rounds.csv").exists()):
        rows = [r for r in rundir.read_rows(run_dir / "rounds.csv") if r.get("auc")]
        ax.plot([float(r["sim_time_s"]) for r in rows], [float(r["auc"]) for r in rows],
                marker="o", ms=3, label=run_dir.name)
    central = target / "centralized" / "summary.json"
    if central.exists():
        ax.axhline(json.loads(central.read_text())["auc"], ls="--", color="grey", label="centralized")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("test CVR AUC")
    plotting.save(fig, ax, target / f"{name}.png", f"experiment {name}")
