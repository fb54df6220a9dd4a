"""One ``Trainer``, one switch: ``train.mode = "centralized" | "federated"``.

The caller is the same in both modes::

    result = Trainer(cfg).fit()

``fit`` returns a :class:`TrainResult` (summary, per-epoch or per-round rows, the
model); writing the run directory is the caller's job (:mod:`adfed.rundir`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel

from adfed.config import Config
from adfed.data.examples import Examples
from adfed.data.store import Dataset
from adfed.evaluation import Split, evaluate, split_examples, test_users
from adfed.fl.simulation import fit_federated
from adfed.model.assembly import model_from_config
from adfed.model.groups import lr_decay_factor, make_optimizers, model_bytes
from adfed.model.pcvr import (
    LabelCounts,
    PCVRModel,
    embedding_penalty,
    ensure_finite,
    esmm_loss,
    set_output_priors_,
)
from adfed.result import TrainResult

logger = logging.getLogger(__name__)
StepCallback = Callable[[dict[str, Any]], None]
__all__ = ["TrainResult", "Trainer", "fit_centralized", "model_from_config"]


class Trainer:
    """Trains the pCVR model of ``cfg`` on the dataset at ``cfg.data.path``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def fit(
        self,
        dataset: Dataset | None = None,
        *,
        checkpoint_dir: Path | None = None,
        resume: bool = False,
        on_step: StepCallback | None = None,
    ) -> TrainResult:
        """Train and evaluate; ``on_step`` gets each epoch's / round's row as it is made."""
        dataset = dataset or Dataset.open(self.cfg.data.path)
        if self.cfg.train.mode == "centralized":
            return fit_centralized(self.cfg, dataset, on_step=on_step)
        return fit_federated(self.cfg, dataset, checkpoint_dir=checkpoint_dir, resume=resume,
                             on_step=on_step)


def pooled_split(cfg: Config, dataset: Dataset) -> tuple[Split, Examples]:
    """All users' rows split by time, and the test rows that are scored (every user's, or
    those of ``data.max_test_users`` sampled users)."""
    split = split_examples(dataset.load(), cfg.data.test_fraction)
    eval_users = test_users(dataset, cfg.data.max_test_users, cfg.seed)
    test = split.test if eval_users is None else split_examples(
        dataset.load(eval_users), cfg.data.test_fraction).test
    return split, test


def fit_centralized(cfg: Config, dataset: Dataset, *, on_step: StepCallback | None = None) -> TrainResult:
    """Stand-alone training on all users' pooled training rows (the upper baseline)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    split, test = pooled_split(cfg, dataset)
    model = model_from_config(cfg, dataset)
    if cfg.model.starts_at_base_rates("centralized"):
        set_output_priors_(model, LabelCounts.of_labels(split.train.labels), cfg.model.base_rate_heads("centralized"))
    optimizers = make_optimizers(model, lr=cfg.train.lr, sparse_lr=cfg.train.sparse_lr,
                                 dense_opt=cfg.train.optimizer, sparse_opt=cfg.train.sparse_optimizer,
                                 weight_decay=cfg.train.weight_decay, local_lr=cfg.train.user_lr or None)
    schedules = lr_decay(optimizers, cfg.train.lr_decay_start)
    average = weight_average(model.towers, cfg.train.ema)
    rng = np.random.default_rng([cfg.seed, 0xC3])
    rows: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    scored_at = curve_steps(len(split.train), cfg.train.batch_size, cfg.train.epochs, cfg.train.eval_points)
    def scored_model() -> PCVRModel:  # what is evaluated and returned: the towers' average, if any
        return model if average is None else with_towers(model, average.module)

    start = time.perf_counter()
    train_s = 0.0
    seen = 0
    for epoch in range(1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        eval_s = 0.0
        model.train()
        losses = []
        for step, batch in enumerate(split.train.batches(cfg.train.batch_size, rng)):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss = ensure_finite(esmm_loss(model(batch), batch), where=f"epoch {epoch}, step {step}")
            losses.append(float(loss.detach()))
            if cfg.train.embedding_l2 > 0:
                loss = loss + cfg.train.embedding_l2 * embedding_penalty(model, batch)
            loss.backward()
            for opt in optimizers:
                opt.step()
            for schedule in schedules:
                schedule.step()
            if average is not None:
                average.update_parameters(model.towers)
            seen += len(batch)
            steps.append({"step": len(steps) + 1, "epoch": epoch, "examples": seen, "loss": losses[-1]})
            if len(steps) in scored_at:  # a point of the learning curve (not training time)
                t_eval = time.perf_counter()
                point = evaluate(scored_model(), test)
                steps[-1].update({k: point[k] for k in CURVE_METRICS if k in point})
                eval_s += time.perf_counter() - t_eval
        epoch_s = time.perf_counter() - t0 - eval_s
        train_s += epoch_s
        scored = scored_model()
        metrics = evaluate(scored, test)
        steps[-1].update({k: metrics[k] for k in CURVE_METRICS if k in metrics})
        row = {"epoch": epoch, "loss": float(np.mean(losses)), **metrics,
               "wall_time_s": time.perf_counter() - start,
               "examples_per_s": len(split.train) / max(epoch_s, 1e-9)}
        rows.append(row)
        logger.info("epoch %d loss %.4f auc %.4f", epoch, row["loss"], row["auc"])
        if on_step:
            on_step(row)
    final = rows[-1]
    summary = {
        "mode": "centralized",
        "epochs": cfg.train.epochs,
        "seed": cfg.seed,
        "variant": cfg.model.variant,
        **{k: final[k] for k in final if k not in ("epoch", "loss", "examples_per_s")},
        "train_examples": len(split.train),
        "test_examples": len(test),
        "examples_per_s": len(split.train) * cfg.train.epochs / max(train_s, 1e-9),
        "model_bytes": model_bytes(model),
        "wall_time_s": time.perf_counter() - start,
    }
    return TrainResult(summary=summary, rows=rows, rows_name="epochs.csv", model=scored, steps=steps)


#: the test metrics a learning-curve point of ``steps.csv`` holds
CURVE_METRICS = ("auc", "auc_expected", "ctcvr_auc")


def curve_steps(train_rows: int, batch_size: int, epochs: int, points: int) -> set[int]:
    """The steps (counted from 1 over all epochs) after which the learning curve scores the
    test set: every ``1/points`` of all steps, rounded; epoch ends are left out (the
    epoch's own evaluation scores them)."""
    per_epoch = -(-train_rows // batch_size)
    total = per_epoch * epochs
    ends = {per_epoch * e for e in range(epochs + 1)}
    return {round(total * k / points) for k in range(1, points)} - ends


def lr_decay(optimizers: Sequence[torch.optim.Optimizer], start: int) -> list[LambdaLR]:
    """One ``LambdaLR`` per optimizer that scales every parameter group's learning rate
    by :func:`lr_decay_factor`; call ``step()`` on each after every optimizer step.
    An empty list when ``start`` is 0 (constant learning rates).

    Chosen on worlds of 80k and 320k users (docs/results/2026-11-27-scale.md): at constant rates, a 320k-user world scored 0.008 expected AUC *under* an
    80k one. On demo-sized worlds (an epoch of ~290 steps) it changes nothing; decaying
    there (cosine over the epoch) cost 0.015.
    """
    if start == 0:
        return []
    return [LambdaLR(opt, partial(lr_decay_factor, start=start)) for opt in optimizers]


def weight_average(module: nn.Module, decay: float) -> WeightAverage | None:
    """An exponential moving average of ``module``'s parameters (``train.ema``), or None
    when ``decay`` is 0. See :class:`WeightAverage`."""
    return WeightAverage(module, decay) if decay > 0 else None


class WeightAverage(AveragedModel):
    """``AveragedModel`` holding a warmed-up exponential moving average of ``module``.

    Call ``update_parameters(module)`` after every step; ``.module`` is the averaged copy.
    The first update copies the weights; update n (from 1) then moves the average by
    ``1 - min(decay, (1 + n) / (10 + n))`` toward them, so early steps are not held
    back by the initial weights. Centralized training averages the towers
    (:func:`with_towers`); chosen on the worlds of seeds 1 and 2
    (docs/results/2026-11-26-centralized-training.md).

    After the first update, an update is one ``Tensor.lerp_`` per tensor over the parameter
    lists of that first call (``AveragedModel.update_parameters`` collects and groups
    them again at every call: about 0.3 ms more, 2-3 % of a step at batch 1024). The
    lists hold ``module``'s parameter tensors, which the optimizers update in place; a
    module whose parameters are replaced by new tensors must be passed as a new object.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"train.ema must be a float in (0, 1); got {decay}")
        super().__init__(module, multi_avg_fn=self._lerp)
        self.decay = decay
        self._lists: tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]] | None = None

    @torch.no_grad()
    def _lerp(self, averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor],
              n_averaged: torch.Tensor | int) -> None:
        n = float(n_averaged)
        weight = 1.0 - min(self.decay, (1.0 + n) / (10.0 + n))
        for avg, cur in zip(averaged, current, strict=True):
            avg.lerp_(cur, weight)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self._lists is None or self._lists[0] is not model:
            super().update_parameters(model)
            self._lists = (model, [p.detach() for p in self.module.parameters()],
                           [p.detach() for p in model.parameters()])
            return
        self._lerp(self._lists[1], self._lists[2], self.n_averaged)
        self.n_averaged += 1


def with_towers(model: PCVRModel, towers: nn.Module) -> PCVRModel:
    """A copy of ``model`` whose towers hold the weights of ``towers`` (their average).

    Averaging the towers alone scored as well as averaging every parameter (within 0.001
    expected AUC on both study worlds) at a small part of the cost: the big tables are
    most of the weights, and an average of them rewrites all their rows every step.
    """
    out = copy.deepcopy(model)
    out.towers.load_state_dict(towers.state_dict())
    return out
