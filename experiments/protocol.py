"""The federated-quality protocol: one pass of federated training against one centralized
epoch on several worlds and training seeds, and the rule that decides whether a candidate
replaces the defaults (docs/results/2026-12-06-federated-quality.md).

A candidate is judged on the **choice** worlds (seeds 1-3 at 20k and 100k users, training
seed 0) and reported on the **report** worlds (seeds 41/42/43 at 20k/50k/200k users,
generated for nothing else, training seeds 0-2; **report2**, seeds 51/52/53, a second such
set)::

    python -m experiments.protocol --stage choice --out runs/protocol/defaults
    python -m experiments.protocol --stage choice --out runs/protocol/cand --set fl.local_user_lr=0.2
    python -m experiments.protocol --verdict runs/protocol/cand --against runs/protocol/defaults
    python -m experiments.protocol --stage choice --out runs/protocol/defaults --seeds 0 1  # adds seed 1

Each (world, seed) trains centralized (``train.epochs`` epochs) and federated for
``ceil(users / fl.clients_per_round)`` rounds, evaluating every tenth of them, and keeps
``fl_targets.one_pass``; ``protocol.json`` holds every row and the summary. Worlds are
generated into ``OUT/../worlds`` once (``--worlds-dir`` to share them between candidates).
``--central-from DEFAULTS_OUT`` takes each centralized run from another candidate's
directory where it trained the same thing (centralized training reads only
:data:`CENTRAL_KEYS` of the config; a candidate's ``--set``s are federated settings), so a
candidate trains only its federated runs; each row names the run it took
(``centralized_from``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adfed import config, rundir
from adfed.config import Config, with_overrides
from adfed.data.store import Dataset
from experiments.fl_targets import one_pass
from experiments.runs import Progress, train_and_write

World = tuple[int, int]  # (users, world seed)
CHOICE: tuple[World, ...] = ((20_000, 1), (20_000, 2), (20_000, 3), (100_000, 1), (100_000, 2), (100_000, 3))
REPORT: tuple[World, ...] = ((20_000, 41), (50_000, 42), (200_000, 43))
#: a second set of fresh report worlds (section 13 of the study, 2026-12-07): the same sizes,
#: seeds generated for nothing else, to replicate the report stage of the defaults
REPORT2: tuple[World, ...] = ((20_000, 51), (50_000, 52), (200_000, 53))
STAGES: dict[str, tuple[tuple[World, ...], tuple[int, ...]]] = {
    "choice": (CHOICE, (0,)), "report": (REPORT, (0, 1, 2)), "report2": (REPORT2, (0, 1, 2))}
#: the issue's target: mean expected-AUC gap per world at most TARGET, no seed above WORST
TARGET, WORST = 0.01, 0.015
#: the rule: a candidate's mean gap at least GAIN below the defaults', no world LOSS worse
GAIN, LOSS = 0.005, 0.005
#: the tie-break (section 12 of the study, written 2026-12-07 before its runs): a candidate
#: the rule does not adopt replaces the defaults when its mean gap is not larger, no world
#: is LOSS worse, and its worst run is at least WORST_GAIN closer than the defaults' worst
WORST_GAIN = 0.005
#: the config centralized training reads (trainer.fit_centralized, model_from_config,
#: pooled_split): two centralized runs with these equal are the same run
CENTRAL_KEYS = ("seed", "data", "model", "train")


def world_path(worlds_dir: Path, users: int, seed: int) -> Path:
    """The world of ``users`` users and ``seed`` under ``worlds_dir``, generated once."""
    from data_gen.generate import generate
    from data_gen.params import WorldParams

    path = worlds_dir / f"world-{users}-{seed}"
    if not (path / "manifest.json").exists():
        generate(path, WorldParams(num_users=users, num_ads=10_000), seed=seed)
    return path


def reusable_central(cfg: Config, run: Path) -> dict[str, Any] | None:
    """The summary of the centralized run directory ``run`` when it trained exactly what
    ``cfg`` would (equal :data:`CENTRAL_KEYS`, ``model.output_bias`` compared by the start it
    gives centralized training); None when it is missing, unreadable or trained something
    else."""
    try:
        saved_cfg = config.load(run / "config.toml")
        summary: dict[str, Any] = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    saved, want = config.to_dict(saved_cfg), config.to_dict(cfg)
    for d, c in ((saved, saved_cfg), (want, cfg)):
        d["model"] = {**d["model"], "output_bias": list(c.model.base_rate_heads("centralized"))}
    if any(saved.get(k) != want.get(k) for k in CENTRAL_KEYS):
        return None
    return summary


def one(base: Config, data: Path, users: int, seed: int, out: Path, progress: Progress,
        central_from: Path | None = None) -> dict[str, Any]:
    """Centralized and federated on one world and training seed: ``one_pass``'s figures.
    ``central_from``: an earlier centralized run of the same world and seed to take
    instead of training it again, when :func:`reusable_central` accepts it."""
    rounds = -(-users // base.fl.clients_per_round)
    cfg = with_overrides(base, [f'data.path="{data}"', f"seed={seed}", f"fl.rounds={rounds}",
                                f"fl.eval_every={max(1, rounds // 10)}"])
    dataset = Dataset.open(data)
    central_cfg = with_overrides(cfg, ['train.mode="centralized"'])
    central = None if central_from is None else reusable_central(central_cfg, central_from)
    taken: dict[str, Any] = {}
    if central is not None:
        progress(f"centralized: taken from {central_from}")
        taken = {"centralized_from": str(central_from)}
    else:
        central = train_and_write(central_cfg, dataset, out / "centralized", progress).summary
    fed_cfg = with_overrides(cfg, ['train.mode="federated"'])
    fed = train_and_write(fed_cfg, dataset, out / "federated", progress)
    return {"centralized_auc": central["auc"], "centralized_auc_expected": central.get("auc_expected"),
            **taken, **one_pass(central, fed, fed_cfg, dataset)}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per world: the mean, smallest and largest expected-AUC gap over its seeds (sampled
    AUC's mean beside it); ``target_met`` when every world's mean is at most
    :data:`TARGET` and no seed's gap exceeds :data:`WORST`."""
    worlds: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(r["world"] for r in rows):
        gaps = [r["auc_expected_gap"] for r in rows if r["world"] == key]
        worlds[key] = {"mean_gap": statistics.fmean(gaps), "min_gap": min(gaps), "max_gap": max(gaps),
                       "mean_sampled_gap": statistics.fmean(r["auc_gap"] for r in rows if r["world"] == key),
                       "seeds": len(gaps)}
    met = bool(worlds) and all(w["mean_gap"] <= TARGET and w["max_gap"] <= WORST for w in worlds.values())
    return {"worlds": worlds, "mean_gap": statistics.fmean(w["mean_gap"] for w in worlds.values()) if worlds else None,
            "target_met": met}


def verdict(candidate: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The rule on two ``protocol.json`` summaries of the same worlds: the candidate wins
    when its mean gap is at least :data:`GAIN` smaller and no world's gap is more than
    :data:`LOSS` larger than the defaults'; failing that, by the tie-break, when its mean
    gap is not larger, no world is :data:`LOSS` worse and its worst run is at least
    :data:`WORST_GAIN` closer than the defaults' worst run. ``by`` names which adopted it."""
    cw, dw = candidate["worlds"], defaults["worlds"]
    if set(cw) != set(dw):
        raise ValueError(f"the two runs cover different worlds: {sorted(cw)} vs {sorted(dw)}")
    gain = defaults["mean_gap"] - candidate["mean_gap"]
    worse = {w: cw[w]["mean_gap"] - dw[w]["mean_gap"] for w in cw if cw[w]["mean_gap"] - dw[w]["mean_gap"] > LOSS}
    worst, defaults_worst = max(w["max_gap"] for w in cw.values()), max(w["max_gap"] for w in dw.values())
    by = None
    if gain >= GAIN and not worse:
        by = "rule"
    elif gain >= 0 and not worse and defaults_worst - worst >= WORST_GAIN:
        by = "tie-break"
    return {"gain": gain, "worse": worse, "worst_run": worst, "defaults_worst_run": defaults_worst,
            "adopt": by is not None, "by": by}


def run(base: Config, worlds: Sequence[World], seeds: Sequence[int], out: Path, worlds_dir: Path,
        progress: Progress = lambda _: None, central_from: Path | None = None) -> dict[str, Any]:
    """Every world and seed (skipping those ``out`` already holds), then ``protocol.json``;
    ``central_from``: another run of the protocol whose centralized runs to take where
    they trained the same (:func:`one`)."""
    rows: list[dict[str, Any]] = []
    for users, world_seed in worlds:
        data = world_path(worlds_dir, users, world_seed)
        for seed in seeds:
            where = Path(f"world-{users}-{world_seed}") / f"seed-{seed}"
            target = out / where
            done = target / "one_pass.json"
            if done.exists():
                row = json.loads(done.read_text())
            else:
                progress(f"protocol: {users} users, world seed {world_seed}, training seed {seed}")
                row = {"world": f"{users}-{world_seed}", "users": users, "world_seed": world_seed, "seed": seed,
                       **one(base, data, users, seed, target, progress,
                              None if central_from is None else central_from / where / "centralized")}
                rundir.atomic_write(done, json.dumps(row, indent=2) + "\n")
            rows.append(row)
    results = {"rows": rows, **summarize(rows)}
    rundir.atomic_write(out / "protocol.json", json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict[str, Any]) -> str:
    """The per-world summary as a Markdown table."""
    lines = ["| world (users-seed) | seeds | mean gap (expected AUC) | min | max | mean gap (sampled AUC) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, w in results["worlds"].items():
        lines.append(f"| {key} | {w['seeds']} | {w['mean_gap']:.4f} | {w['min_gap']:.4f} | {w['max_gap']:.4f} "
                     f"| {w['mean_sampled_gap']:.4f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m experiments.protocol")
    parser.add_argument("--stage", choices=sorted(STAGES), help="which worlds and seeds to run")
    parser.add_argument("--out", type=Path, help="directory for the runs and protocol.json")
    parser.add_argument("--worlds-dir", type=Path, help="where worlds are generated (default: OUT/../worlds)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override section.key=value")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="training seeds instead of the stage's (choice: 0; report: 0 1 2); runs already in "
                             "OUT are reused, so adding a seed trains only that seed")
    parser.add_argument("--central-from", type=Path,
                        help="another candidate's OUT (e.g. the defaults'): take its centralized runs where they "
                             "trained the same config (seed, data, model, train) instead of training them again")
    parser.add_argument("--verdict", type=Path, help="a candidate's OUT: apply the rule against --against")
    parser.add_argument("--against", type=Path, help="the defaults' OUT (with --verdict)")
    args = parser.parse_args(argv)
    try:
        if args.verdict is not None:
            if args.against is None:
                parser.error("--verdict needs --against (the defaults' OUT)")
            read = [json.loads((d / "protocol.json").read_text()) for d in (args.verdict, args.against)]
            print(json.dumps(verdict(*read), indent=2))
            return 0
        if args.stage is None or args.out is None:
            parser.error("give --stage and --out (or --verdict and --against)")
        worlds, seeds = STAGES[args.stage]
        if args.seeds:
            seeds = tuple(args.seeds)
        base = with_overrides(Config(), args.sets)
        results = run(base, worlds, seeds, args.out, args.worlds_dir or args.out.parent / "worlds",
                      progress=lambda msg: print(msg, file=sys.stderr), central_from=args.central_from)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(results))
    print(f"target met: {results['target_met']} (mean gap per world <= {TARGET}, no seed above {WORST})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
