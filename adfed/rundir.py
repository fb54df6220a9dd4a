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


def json_ready(value: Any) -> Any:
    """``value`` with every non-finite float (in nested dicts too) as None: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    return value


#: what :func:`write_run` and a federated run's checkpoint put in a run directory
#: (``checkpoint.pt``: the pickled checkpoint of adfed before 2026-12, removed by --overwrite)
RUN_FILES = ("config.toml", "summary.json", "epochs.csv", "steps.csv", "rounds.csv",
             "checkpoint.safetensors", "checkpoint.pt", "model.safetensors")
#: the final model's weights (:func:`write_model`, :func:`read_model_tensors`)
MODEL_FILE = "model.safetensors"


#: where ``--overwrite`` sets the old run's files aside until the new run has written its own
REPLACED = ".replaced"


def prepare_out(out: Path, *, resume: bool, overwrite: bool, federated: bool) -> Path | None:
    """Check ``adfed train``'s ``--out`` before any training, and clear it for ``--overwrite``.

    A directory that already holds files is refused unless the run continues it
    (``resume``, a federated run only: a centralized one has no checkpoint) or replaces it
    (``overwrite``: the files of :data:`RUN_FILES` and ``plots/`` are moved into
    ``out/.replaced`` first, so no file of the old run is left beside the new one; other
    files stay). Returns that folder (None when nothing was set aside): the caller passes
    it to :func:`restore_out` if the new run fails, so a bad setting found only during
    training costs nothing already written, or to :func:`finish_out` once the new run is
    written.

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
        return None
    if not overwrite:
        raise ConfigError(f"--out {out} already holds files; pass --overwrite to replace its run, "
                          f"--resume to continue it, or choose another --out")
    aside = out / REPLACED
    shutil.rmtree(aside, ignore_errors=True)  # left by a run that was killed: an older run still
    aside.mkdir()
    for name in (*RUN_FILES, "plots"):
        if (out / name).exists():
            os.replace(out / name, aside / name)
    return aside


def restore_out(out: Path, aside: Path | None) -> None:
    """The replacing run failed: remove what it wrote and put the old run's files back
    (:func:`prepare_out`); nothing to do when ``aside`` is None."""
    if aside is None or not aside.is_dir():
        return
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "plots", ignore_errors=True)
    for p in aside.iterdir():
        os.replace(p, out / p.name)
    aside.rmdir()


def finish_out(aside: Path | None) -> None:
    """The replacing run is written: drop the old run's files set aside by :func:`prepare_out`."""
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def write_config(out: Path, cfg: Config) -> None:
    atomic_write(out / "config.toml", config_mod.dumps(cfg))


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    atomic_write(out / "summary.json", json.dumps(json_ready(summary), indent=2, sort_keys=True) + "\n")


#: columns an evaluation adds to a round's row (sync or async), in the order rounds.csv
#: keeps them; they follow the round's other columns whichever round was scored first
EVAL_COLUMNS = ("auc", "auc_expected", "ctcvr_auc", "logloss", "eval_s")


def row_columns(rows: Sequence[dict[str, Any]], last: Sequence[str] = ()) -> list[str]:
    """The union of the rows' keys in first-seen order, except that those of ``last``
    come at the end in ``last``'s order (so the header does not depend on which row first
    held them)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns and k not in last)
    present = {k for row in rows for k in row}
    return columns + [k for k in last if k in present]


def write_rows(path: Path, rows: Sequence[dict[str, Any]], last: Sequence[str] = ()) -> None:
    """Write dict rows as CSV (columns: :func:`row_columns`; a missing value is empty)."""
    columns = row_columns(rows, last)
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


#: the AUC series of a run's plots: row key -> (legend, colour)
AUC_SERIES = {
    "auc": ("CVR AUC (test clicks)", "tab:blue"),
    "auc_expected": ("expected CVR AUC (all test impressions, truth-weighted)", "tab:green"),
    "ctcvr_auc": ("CTCVR AUC (test impressions: click and conversion)", "tab:orange"),
}
#: the oracle lines: summary key -> (legend, colour of the curve it bounds)
ORACLE_LINES = {
    "oracle_auc": ("CVR oracle (true p_cvr)", "tab:blue"),
    "oracle_auc_expected": ("expected CVR oracle", "tab:green"),
    "oracle_ctcvr_auc": ("CTCVR oracle (true p_click x p_cvr)", "tab:orange"),
}
#: runs with fewer test conversions (positives of the CVR AUC) get ``auc_noisy``
NOISY_POSITIVES = 50


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_auc(
    path: Path,
    rows: Sequence[dict[str, Any]],
    *,
    x: str,
    xlabel: str,
    title: str,
    summary: dict[str, Any],
    reference: dict[str, float] | None = None,
    integer_x: bool = False,
) -> list[str]:
    """Test AUCs of ``rows`` against ``x`` (PNG): the CVR, expected CVR and CTCVR curves
    that the rows hold, each oracle of ``summary`` as a dashed line of its curve's colour,
    and ``reference`` (a centralized run's ``auc`` / ``auc_expected``) as dotted lines.
    Every line is named in words in the legend, below the axes; returns its labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.0, 5.2), dpi=110)
    for key, (label, color) in AUC_SERIES.items():
        pts = [(r[x], r[key]) for r in rows if _finite(r.get(key)) and _finite(r.get(x))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=color, label=label)
    for key, (label, color) in ORACLE_LINES.items():
        if _finite(summary.get(key)):
            ax.axhline(summary[key], ls="--", lw=1, color=color, alpha=0.7, label=f"{label}: {summary[key]:.3f}")
    for key, label in (("auc", "centralized CVR AUC"), ("auc_expected", "centralized expected CVR AUC")):
        value = (reference or {}).get(key)
        if value is not None and _finite(value):
            ax.axhline(value, ls=":", lw=1.5, color=AUC_SERIES[key][1], label=f"{label}: {value:.3f}")
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test AUC (0.5 = chance)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    labels = ax.get_legend_handles_labels()[1]
    if labels:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7, frameon=False)
    save_figure(fig, path)
    return labels


def _sim_time_axis(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Rows with ``sim_time`` in hours (long runs) or seconds, and its axis label."""
    last = max((r["sim_time_s"] for r in rows if _finite(r.get("sim_time_s"))), default=0.0)
    scale, unit = (3600.0, "hours") if last > 7200 else (1.0, "seconds")
    out = [{**r, "sim_time": r["sim_time_s"] / scale} for r in rows if _finite(r.get("sim_time_s"))]
    return out, f"simulated time since the first round ({unit})"


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
    for key, label in (("auc", "CVR oracle (true p_cvr)"), ("auc_expected", "expected CVR oracle")):
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


def write_model(out: Path, model: Any) -> None:
    """Save ``model``'s parameters as ``out/model.safetensors`` (name -> tensor; a
    federated run's evaluation model holds one ``local`` row per user, the rows phones
    keep: what re-ranking assembles a phone's model from)."""
    from safetensors.torch import save

    tensors = {name: p.detach().contiguous().clone() for name, p in model.named_parameters()}
    atomic_write(out / MODEL_FILE, save(tensors, metadata={"format": "adfed-model-1"}))


def read_model_tensors(run: Path) -> dict[str, Any]:
    """The tensors of ``run/model.safetensors`` (name -> torch tensor).

    Raises
    ------
    ConfigError : the file is missing (a run written before adfed saved its model) or
        is not a safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = run / MODEL_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; runs written before adfed saved model weights have none: "
                          f"train again with adfed train --out {run} --overwrite") from None
    try:
        return dict(load(data))
    except (SafetensorError, ValueError) as exc:
        raise ConfigError(f"{path}: not a safetensors file ({exc})") from exc


def finish_summary(summary: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary a run directory records: the trainer's, ``extra`` (e.g. the requested
    value of a clamped setting) and ``auc_noisy``: True when the test set holds fewer
    than :data:`NOISY_POSITIVES` conversions, the positives of the CVR AUC."""
    out = {**summary, **(extra or {})}
    positives = out.get("test_positives")
    if isinstance(positives, int):
        out["auc_noisy"] = positives < NOISY_POSITIVES
    return out


def write_run(out: Path, cfg: Config, result: Any, *, reference: dict[str, float] | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a whole run directory from a :class:`adfed.trainer.TrainResult`; returns the
    summary written (:func:`finish_summary`). ``reference``: a centralized run's summary
    (its ``auc`` and ``auc_expected`` are drawn on the federated plots)."""
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)
    write_model(out, result.model)
    summary = finish_summary(result.summary, extra)
    if result.rows_name == "epochs.csv" and result.steps:
        write_rows(out / result.rows_name, result.rows)
        write_rows(out / "steps.csv", result.steps)
        plot_learning_curve(out / "plots" / "learning_curve.png", result.steps,
                            oracle={"auc": summary.get("oracle_auc", float("nan")),
                                    "auc_expected": summary.get("oracle_auc_expected", float("nan"))})
    elif result.rows_name == "epochs.csv":
        write_rows(out / result.rows_name, result.rows)
        plot_auc(out / "plots" / "learning_curve.png", result.rows, x="epoch", xlabel="epoch",
                 title="Centralized: test AUC per epoch", summary=summary, integer_x=True)
    else:
        write_rows(out / result.rows_name, result.rows, last=EVAL_COLUMNS)
        evaluated = [r for r in result.rows if r.get("auc") is not None]
        plot_auc(out / "plots" / "auc_vs_round.png", evaluated, x="round", xlabel="federated round",
                 title="Federated: test AUC per round", summary=summary, reference=reference,
                 integer_x=True)
        timed, xlabel = _sim_time_axis(evaluated)
        plot_auc(out / "plots" / "auc_vs_sim_time.png", timed, x="sim_time", xlabel=xlabel,
                 title="Federated: test AUC vs simulated time", summary=summary, reference=reference)
    write_summary(out, summary)
    return summary
