"""Training one run of an experiment and writing its run directory (shared by every
experiment module, so that each writes its runs the same way)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from adfed import rundir
from adfed.config import Config
from adfed.data.store import Dataset
from adfed.result import TrainResult
from adfed.trainer import Trainer

Progress = Callable[[str], None]


def train_and_write(cfg: Config, dataset: Dataset, out: Path, progress: Progress) -> TrainResult:
    """Train ``cfg`` on ``dataset``, write the run directory ``out``, return the result."""
    progress(f"{out.name}: {cfg.train.mode} {cfg.fl.schedule if cfg.train.mode == 'federated' else ''}")
    result = Trainer(cfg).fit(dataset)
    rundir.write_run(out, cfg, result)
    return result
