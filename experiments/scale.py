"""How does the centralized model's gap to the oracle change with the amount of data?

The model issue asks for a centralized CVR AUC within 0.02 of the oracle on the demo world
(20,000 users, about 780 conversions in all); experiment ``ceiling`` shows that even a
correctly specified regression stays 0.05-0.07 under the oracle there. This experiment
asks the other question: how much data would it take? It regenerates the dataset's own
synthetic world (same seed and parameters, :func:`experiments.ceiling.world_of`) at
several multiples of its user count (a larger world holds the smaller one's users with
the same fields, ``data_gen.params.WorldParams``), trains the base config centrally on
each, and reports every run's expected AUC (:func:`adfed.metrics.expected_auc`) beside
the oracle's. Unless the base config already trains at a constant learning rate, each
size is also trained with ``train.lr_decay_start=0`` (constant rates), the comparison
that chose the decay.

The generated worlds are deleted once trained (they are deterministic: ``adfed data
generate --users N --ads A --seed S`` writes them again byte for byte); the runs stay.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from adfed import rundir
from adfed.config import Config, with_overrides
from adfed.data.store import Dataset
from adfed.errors import DataError
from adfed.trainer import Trainer
from data_gen.generate import generate
from experiments import plotting
from experiments.ceiling import world_of

#: Multiples of the dataset's user count (20k, 80k, 320k users on the demo world; the
#: largest run holds about 6 GB at its peak).
SCALES = (1, 4, 16)
#: Peak resident bytes per impression row of a centralized run (6.1 GB for the 5.96M rows
#: of the demo world at 16x, int32 ids; rounded up). The experiment refuses to start a size that
#: would not fit the memory available.
BYTES_PER_ROW = 1100
#: Summary keys copied into each row of the results.
KEYS = ("auc", "auc_expected", "oracle_auc", "oracle_auc_expected", "ctr_auc", "ece",
        "train_examples", "test_examples", "wall_time_s")


def configs(base: Config) -> dict[str, Config]:
    """The configs trained at every size: ``configured`` (the base config, centralized,
    every test user) and, when it decays its learning rates, ``constant_lr``."""
    # only the final figures are used: no learning-curve points (train.eval_points)
    central = with_overrides(base, ['train.mode="centralized"', "data.max_test_users=0", "train.eval_points=1"])
    runs = {"configured": central}
    if central.train.lr_decay_start:
        runs["constant_lr"] = with_overrides(central, ["train.lr_decay_start=0"])
    return runs


def check_memory(rows: int, users: int, factor: int, available: int) -> None:
    """DataError when the world at ``factor`` times a dataset of ``rows`` impressions and
    ``users`` users would need more than ``available`` bytes (:data:`BYTES_PER_ROW`)."""
    need = rows * factor * BYTES_PER_ROW
    if need > available:
        raise DataError(
            f"experiment scale: the world at {factor}x ({users * factor:,} users, ~{rows * factor / 1e6:.1f}M rows) "
            f"needs about {need / 2**30:.1f} GiB of memory and {available / 2**30:.1f} GiB is available; "
            f"run it on a smaller dataset (adfed data generate --users N)"
        )


def analyse(base: Config, dataset: Dataset, out: Path, progress: Callable[[str], None],
            scales: tuple[int, ...] = SCALES) -> dict[str, Any]:
    """Train every config of :func:`configs` on the world at each multiple in ``scales``
    (module docstring); writes each run under ``OUT/<config>_<users>``."""
    if not scales or any(s < 1 for s in scales):
        raise ValueError(f"scales must be ints >= 1; got {scales}")
    world = world_of(dataset, "scale")
    check_memory(dataset.num_impressions, world.params.num_users, max(scales), psutil.virtual_memory().available)
    rows = []
    for factor in scales:
        users = world.params.num_users * factor
        data = dataset
        generated = None
        if factor != 1:
            generated = out / "worlds" / f"users_{users}"
            progress(f"generating the world at {users:,} users")
            params = dataclasses.replace(world.params, num_users=users)
            data = Dataset.open(generate(generated, params, seed=world.seed, overwrite=True))
        for name, cfg in configs(base).items():
            progress(f"{name}: centralized on {users:,} users")
            cfg = with_overrides(cfg, [f'data.path="{data.path}"'])
            result = Trainer(cfg).fit(data)
            rundir.write_run(out / f"{name}_{users}", cfg, result)
            s = result.summary
            rows.append({"config": name, "users": users, **{k: s[k] for k in KEYS if k in s},
                         "steps": -(-s["train_examples"] // cfg.train.batch_size) * cfg.train.epochs,
                         "gap_expected": s["oracle_auc_expected"] - s["auc_expected"]})
        if generated is not None:
            shutil.rmtree(generated)
    return {"scales": list(scales), "world_seed": world.seed, "rows": rows}


def plot(results: dict[str, Any], path: Path) -> None:
    """Expected CVR AUC against the number of users: each config and the oracle, as a PNG."""
    rows = results["rows"]
    fig, ax = plotting.new_axes()
    first = [r for r in rows if r["config"] == rows[0]["config"]]
    ax.plot([r["users"] for r in first], [r["oracle_auc_expected"] for r in first], "k--", marker="D",
            ms=4, label="oracle")
    ax.plot([r["users"] for r in first], [r["oracle_auc_expected"] - 0.02 for r in first], ":", color="grey",
            label="oracle - 0.02 (the model issue's target)")
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        ax.plot([r["users"] for r in mine], [r["auc_expected"] for r in mine], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xticks([r["users"] for r in first], [f"{r['users']:,}" for r in first])
    ax.minorticks_off()
    ax.set_xlabel("users in the world (same seed and parameters)")
    ax.set_ylabel("expected test CVR AUC")
    plotting.save(fig, ax, path, "experiment scale: centralized model vs oracle")
