"""The run directory (DESIGN.md "Contracts"): config.toml, summary.json, CSVs, plots.

This module is the file edge of training: the Trainer and the engine return values, and
only this module (called from the CLI) writes them. Every file is written to a temporary
name and renamed, so a crash never leaves a half-written file under its final name.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adfed import config as config_mod
from adfed.config import Config
from adfed.errors import ConfigError


def atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode) as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


#: what :func:`write_run` and a federated run's checkpoint put in a run directory
RUN_FILES = ("config.toml", "summary.json", "epochs.csv", "steps.csv", "rounds.csv", "checkpoint.pt")


def prepare_out(out: Path, *, resume: bool, overwrite: bool, federated: bool) -> None:
    """Check ``adfed train``'s ``--out`` before any training, and clear it for ``--overwrite``.

    A directory that already holds files is refused unless the run continues it
    (``resume``, a federated run only: a centralized one has no checkpoint) or replaces it
    (``overwrite``: the files of :data:`RUN_FILES` and ``plots/`` are removed first, so no
    file of the old run is left beside the new one; other files stay).

    Raises
    ------
    ConfigError : ``out`` is a file, or holds files and neither flag is given, or both
        are, or ``resume`` of a centralized run.
    """
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it; pass one")
    if resume and not federated:
        raise ConfigError("--resume continues a federated run from its checkpoint; a centralized run has "
                          "none: pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the run")
    if not out.is_dir() or resume or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"--out {out} already holds files; pass --overwrite to replace its run, "
                          f"--resume to continue it, or choose another --out")
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "plots", ignore_errors=True)


def write_config(out: Path, cfg: Config) -> None:
    atomic_write(out / "config.toml", config_mod.dumps(cfg))


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    atomic_write(out / "summary.json", json.dumps(_clean(summary), indent=2, sort_keys=True) + "\n")


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write dict rows as CSV (columns: union of keys in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write(path, buf.getvalue())


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as ``path`` (PNG) atomically and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_curves(
    path: Path,
    rows: Sequence[dict[str, Any]],
    *,
    x: str,
    ys: Sequence[str],
    title: str,
    hlines: dict[str, float] | None = None,
) -> None:
    """Line plot of ``ys`` against ``x`` from dict rows, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for y in ys:
        pts = [(r[x], r[y]) for r in rows if r.get(y) is not None and r.get(x) is not None]
        pts = [(a, b) for a, b in pts if isinstance(b, (int, float)) and math.isfinite(b)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=y)
    for label, value in (hlines or {}).items():
        if value is not None and math.isfinite(value):
            ax.axhline(value, ls="--", lw=1, color="grey")
            ax.annotate(f"{label} {value:.3f}", (0.01, value), xycoords=("axes fraction", "data"),
                        fontsize=8, va="bottom", color="grey")
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def plot_learning_curve(path: Path, steps: Sequence[dict[str, Any]], *, oracle: dict[str, float]) -> None:
    """Centralized learning curve from ``steps.csv``'s rows: test CVR AUC at the scored
    steps (top, with the oracle's lines) and the training loss per step with a moving
    average over 25 steps (bottom, log scale), both against the training examples seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.0), dpi=110, sharex=True)
    colors = {"auc": "tab:blue", "auc_expected": "tab:green"}
    for key, label in (("auc", "CVR AUC"), ("auc_expected", "CVR AUC, expected")):
        pts = [(r["examples"], r[key]) for r in steps if isinstance(r.get(key), float) and math.isfinite(r[key])]
        if pts:
            top.plot(*zip(*pts, strict=True), marker="o", ms=4, label=label, color=colors[key])
    for key, label in (("auc", "oracle"), ("auc_expected", "oracle, expected")):
        value = oracle.get(key)
        if value is not None and math.isfinite(value):
            top.axhline(value, ls="--", lw=1, color=colors[key], alpha=0.6, label=f"{label} {value:.3f}")
    top.set_ylabel("test CVR AUC (clicked impressions)")
    top.set_title("Centralized: learning curve")
    top.grid(alpha=0.3)
    top.legend(loc="lower right", fontsize=8)
    seen = np.array([r["examples"] for r in steps], dtype=np.float64)
    loss = np.array([r["loss"] for r in steps], dtype=np.float64)
    if len(loss):
        bottom.plot(seen, loss, lw=0.6, alpha=0.35, color="tab:blue", label="training loss per step")
        window = min(25, len(loss))
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        bottom.plot(seen[window - 1:], smooth, lw=1.6, color="tab:blue", label=f"mean of {window} steps")
        bottom.legend(loc="upper right", fontsize=8)
    bottom.set_xlabel("training examples seen")
    bottom.set_yscale("log")
    bottom.set_ylabel("ESMM loss (log scale)")
    bottom.grid(alpha=0.3)
    save_figure(fig, path)


def write_run(out: Path, cfg: Config, result: Any) -> None:
    """Write a whole run directory from a :class:`adfed.trainer.TrainResult`."""
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)
    write_rows(out / result.rows_name, result.rows)
    summary = result.summary
    refs = {"oracle": summary.get("oracle_auc", float("nan"))}
    if summary.get("centralized_auc") is not None:
        refs["centralized"] = summary["centralized_auc"]
    if result.rows_name == "epochs.csv" and result.steps:
        write_rows(out / "steps.csv", result.steps)
        plot_learning_curve(out / "plots" / "learning_curve.png", result.steps,
                            oracle={"auc": summary.get("oracle_auc", float("nan")),
                                    "auc_expected": summary.get("oracle_auc_expected", float("nan"))})
    elif result.rows_name == "epochs.csv":
        plot_curves(out / "plots" / "learning_curve.png", result.rows, x="epoch",
                    ys=["auc", "ctcvr_auc"], title="Centralized: test AUC per epoch", hlines=refs)
    else:
        evaluated = [r for r in result.rows if r.get("auc") is not None]
        plot_curves(out / "plots" / "auc_vs_round.png", evaluated, x="round",
                    ys=["auc", "ctcvr_auc"], title="Federated: test AUC per round", hlines=refs)
        plot_curves(out / "plots" / "auc_vs_sim_time.png", evaluated, x="sim_time_s",
                    ys=["auc"], title="Federated: test AUC vs simulated time (s)", hlines=refs)
    write_summary(out, summary)
