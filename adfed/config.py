"""Every knob of adfed as frozen dataclasses; TOML load/dump; ``--set`` overrides.

The section and key names are a stable contract (DESIGN.md "Contracts"): keys are added,
never renamed. Validation happens on construction, so a bad value can never reach the
engine; the error names the key, the constraint and the value.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import tomli_w

from adfed.errors import ConfigError


def _check(cond: bool, key: str, constraint: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key} must be {constraint}; got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str = "data/demo"
    test_fraction: float = 0.2  # each user's last impressions form the test set
    max_test_users: int = 0  # evaluate on at most this many users (0 = all)

    def __post_init__(self) -> None:
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction", "in (0, 1)", self.test_fraction)
        _check(self.max_test_users >= 0, "data.max_test_users", "an int >= 0", self.max_test_users)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    variant: Literal["full", "cloud_only"] = "full"
    embedding_dim: int = 16
    # one shared hidden layer, then each head: as accurate as (128, 64) and 1.3x the
    # training examples/s (docs/results/2026-11-26-towers.md)
    tower: tuple[int, ...] = (64,)
    bag_pooling: Literal["sum", "mean", "sqrtn"] = "sum"  # multi-hot / sequence fields
    # heads start at the training click / conversion rates ("base_rates") or at 0.5
    # ("zero"); "auto": base_rates when federated (much better there), zero when
    # centralized (mixed there: docs/results/2026-11-26-fedavg-small-tables.md, "The zero start").
    # "auto_cvr" (the default since 2026-12-07): as auto, but federated runs start only the
    # CVR head's bias at its rate, the CTR head's at zero (both heads at their rates cost
    # 0.005-0.009 at 200k users, the CTR head's alone is slow to start:
    # docs/results/2026-12-06-federated-quality.md, section 10). Whenever a head starts at
    # its rate, the CVR tower's last weights start at zero
    output_bias: Literal["auto", "auto_cvr", "base_rates", "zero"] = "auto_cvr"
    # fields of one vocabulary (schema vocab_of: intent -> ad_category) read one table
    share_vocab_tables: bool = True
    # a logit weight per head on "how many bag ids equal the ad's id of the same vocabulary"
    # (an intent that is the ad's category; model.layers.VocabMatch)
    vocab_match: bool = True

    def starts_at_base_rates(self, mode: str) -> bool:
        """Whether a run in ``mode`` ("centralized" | "federated") sets output priors."""
        return bool(self.base_rate_heads(mode))

    def base_rate_heads(self, mode: str) -> tuple[str, ...]:
        """The heads (``"ctr"``, ``"cvr"``) whose bias a run in ``mode`` starts at the base
        rate (:func:`adfed.model.pcvr.set_output_priors_`); () for none."""
        if self.output_bias == "base_rates" or (self.output_bias == "auto" and mode == "federated"):
            return ("ctr", "cvr")
        return ("cvr",) if self.output_bias == "auto_cvr" and mode == "federated" else ()

    def __post_init__(self) -> None:
        _check(self.embedding_dim >= 1, "model.embedding_dim", "an int >= 1", self.embedding_dim)
        _check(len(self.tower) >= 1 and all(w >= 1 for w in self.tower), "model.tower",
               "a list of one or more ints >= 1, e.g. [64]", self.tower)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    mode: Literal["centralized", "federated"] = "centralized"
    epochs: int = 1  # a second epoch only lost (docs/results/2026-11-26-centralized-training.md)
    batch_size: int = 1024  # 1024 beat 2048 on worlds of seeds 1 and 2, 3 seeds each (docs/results/2026-11-26-centralized-training.md)
    lr: float = 0.01
    sparse_lr: float = 0.01
    weight_decay: float = 0.0
    # L2 on the embedding rows each batch reads (centralized and on phones); 0 = off
    embedding_l2: float = 0.0
    # lr of the per-user (LOCAL) rows, user embedding and bias, in centralized training;
    # 0 = sparse_lr. Each row sees only its user's few dozen rows
    # (docs/results/2026-11-26-centralized-training.md).
    user_lr: float = 0.003
    # centralized: evaluate and save an exponential moving average of the weights
    # (largest decay per step, reached after a warm-up: trainer.weight_average; 0 = off,
    # the last step's weights)
    ema: float = 0.99
    # centralized: the dense parameters' optimizer and the sparse rows' (phones use fl.local_optimizer)
    optimizer: Literal["adam", "sgd"] = "adam"
    sparse_optimizer: Literal["sparse_adam", "adagrad", "sgd"] = "sparse_adam"
    # centralized: steps at the full learning rates; after step n > lr_decay_start every
    # lr is scaled by lr_decay_start / n (0 = constant). A demo-sized world's epoch is
    # ~290 steps, where decay only cost; larger worlds gain (docs/results/2026-11-27-scale.md)
    lr_decay_start: int = 300
    # centralized: the test set is also scored after every 1/eval_points of all steps
    # (the end of each epoch always is), for the learning curve (steps.csv, the PNG);
    # 1 = epoch ends only. The scoring time is not counted as training time.
    eval_points: int = 4

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "an int >= 1", self.epochs)
        _check(self.eval_points >= 1, "train.eval_points", "an int >= 1 (1 = epoch ends only)", self.eval_points)
        _check(self.batch_size >= 1, "train.batch_size", "an int >= 1", self.batch_size)
        _check(self.lr > 0, "train.lr", "a float > 0", self.lr)
        _check(self.sparse_lr > 0, "train.sparse_lr", "a float > 0", self.sparse_lr)
        _check(self.weight_decay >= 0, "train.weight_decay", "a float >= 0", self.weight_decay)
        _check(self.embedding_l2 >= 0, "train.embedding_l2", "a float >= 0", self.embedding_l2)
        _check(self.user_lr >= 0, "train.user_lr", "a float >= 0 (0 = train.sparse_lr)", self.user_lr)
        _check(0 <= self.ema < 1, "train.ema", "a float in [0, 1) (0 = off)", self.ema)
        _check(self.lr_decay_start >= 0, "train.lr_decay_start", "an int >= 0 (0 = constant lr)",
               self.lr_decay_start)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FLConfig:
    rounds: int = 100
    clients_per_round: int = 100
    over_selection: float = 1.3
    # how sync rounds draw phones: "uniform" (each round anew: in a pass's worth of rounds
    # ~37 % of the phones never come and others twice) or "passes" (a random order per
    # pass; a phone offline at its turn is offered in a later round, so a pass offers nearly
    # every phone once; docs/results/2026-12-06-federated-quality.md, section 6). Privacy
    # on: the accountant's sampler instead; async: uniform draws
    sampling: Literal["uniform", "passes"] = "passes"
    # one full-batch step of plain SGD per phone (FedAvg with E=1, B=all: every phone
    # with <= 4096 training rows), lr per kind of parameter; the small dense tables need
    # ~50x the towers' lr under SGD (docs/results/2026-11-26-fedavg-small-tables.md)
    local_epochs: int = 1
    local_batch_size: int = 4096
    local_lr: float = 2.0
    local_sparse_lr: float = 2.0
    local_table_lr: float = 100.0
    # SGD lr of the phone's own (LOCAL) rows, user embedding and bias; 0 = local_sparse_lr
    local_user_lr: float = 0.2
    local_optimizer: Literal["sgd", "adam"] = "sgd"  # adam: fresh state every round
    # rounds (async: server steps) at the full local lrs; after n > lr_decay_start, every
    # phone lr is scaled by lr_decay_start / n (0 = constant; docs/results/2026-11-27-federated.md).
    # 200 since 2026-12-07 with server_lr_decay_start, server_ema and model.output_bias (CV:
    # docs/results/2026-12-06-federated-quality.md, section 10); the defaults before:
    # --config experiments/configs/towers-adam-2026-12-06.toml
    lr_decay_start: int = 200
    # the defaults since late 2026-12-06: a server Adam on the towers, the tables and rows as
    # FedAvg, phones drawn in passes (chosen by the protocol of
    # docs/results/2026-12-06-federated-quality.md, section 6); the FedAvg defaults before
    # then: --config experiments/configs/fedavg.toml
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"] = "fedadam"
    # 0 = the strategy's own (server_lr_for): 1.0 for fedavg / fedprox, 0.01 for fedadam /
    # fedyogi / fedadagrad
    server_lr: float = 0.0
    # rounds (async: server steps) at the full server lr; after n > server_lr_decay_start,
    # the server lr (dense part and sparse rows) is scaled by server_lr_decay_start / n
    # (0 = constant). With server_adaptive_scope = "towers" that is the towers' adaptive
    # step only: the tables and rows add the mean delta undecayed. The phones' lrs follow
    # fl.lr_decay_start (from round 200 as well: centralized training's step 300)
    server_lr_decay_start: int = 200
    # rounds (async: server steps) whose phones train on the CTR term of the ESMM loss only
    # (its CTCVR term weighs 0), so that the CVR tower does not learn from a pCTR still far
    # from the click rate (0 = from the first round; a diagnosis of the slow starts of
    # docs/results/2026-12-06-federated-quality.md, section 12)
    ctcvr_warmup_rounds: int = 0
    # sparse rows: mean over all clients of the round (= dense FedAvg) | over touching ones
    sparse_aggregation: Literal["touched", "all"] = "all"
    server_tau: float = 1e-8  # adaptivity (epsilon) of fedadam/fedyogi/fedadagrad
    # decays of the first and second moments of fedadam/fedyogi (fedadagrad: the first);
    # (0.9, 0.99) in Reddi et al. 2021; 0.999 with the towers' Adam (section 6 of the study)
    server_betas: tuple[float, float] = (0.9, 0.999)
    # Adam's bias correction of the moments in fedadam/fedyogi/fedadagrad (Reddi et al.
    # leave it out, so their first ~100 steps are up to 2-4.5x lr; correcting did not help
    # on a 20k world: docs/results/2026-12-06-federated-quality.md)
    server_bias_correction: bool = True
    # what fedadam/fedyogi/fedadagrad step: "all" shared parameters (dense and sparse rows)
    # or the "towers" only (the dense part but the small tables; tables and sparse rows
    # then step as FedAvg)
    server_adaptive_scope: Literal["all", "towers"] = "towers"
    # how the server steps the two heads' output biases under server_adaptive_scope =
    # "towers": with the towers' adaptive optimizer ("adaptive"), or as the tables are, the
    # phones' mean delta ("average"), so that a bias far from its base rate moves there in
    # a few rounds instead of at most server_lr a round (docs/results/2026-12-06-federated-
    # quality.md, section 12)
    output_bias_step: Literal["adaptive", "average"] = "adaptive"
    # the released model (evaluated, saved, exported) is a moving average of the global
    # model over server steps, warmed up as train.ema (0 = off: the last model). Phones
    # still train from the last model; no privacy cost (post-processing). Measured in
    # docs/results/2026-12-06-federated-quality.md, sections 6 and 10 (0.99, as train.ema,
    # since 2026-12-07)
    server_ema: float = 0.99
    prox_mu: float = 0.01
    max_weight: float = 200.0  # cap on a client's aggregation weight (examples)
    schedule: Literal["sync", "async"] = "sync"
    async_concurrency: int = 100
    async_buffer: int = 50  # 20 diverged (NaN) at the local lrs of the FedAvg defaults; docs/results/2026-11-27-async.md
    async_max_staleness: int = 20
    backend: Literal["inprocess", "process", "ray"] = "inprocess"
    workers: int = 2
    eval_every: int = 5
    local_cache: int = 100_000  # clients whose `local` group is kept in memory
    # a federated run's checkpoint is written after its first and last rounds, after the
    # first round that ends this many wall seconds after the previous write, and after the
    # round in progress when Ctrl-C is pressed (0 = after every round). Writing it every
    # round took 29 % of a 500-round pass at 50k users (docs/benchmarks.md)
    checkpoint_every_s: float = 60.0
    # the client update pipeline: transforms applied in order between local training and
    # upload (adfed.fl.pipeline: names(); "identity" sends the update as trained)
    update_pipeline: tuple[str, ...] = ("identity",)
    # torch threads of the server's aggregation step (1: a 100-client round aggregated
    # ~20x faster than with 2 on this 2-core machine; docs/benchmarks.md, "Threads")
    server_threads: int = 1

    def __post_init__(self) -> None:
        _check(len(self.update_pipeline) >= 1, "fl.update_pipeline",
               'a non-empty list of transform names (["identity"] sends updates as trained)',
               self.update_pipeline)
        for key in ("rounds", "clients_per_round", "local_epochs", "local_batch_size",
                    "async_concurrency", "async_buffer", "workers", "eval_every", "server_threads"):
            value = getattr(self, key)
            _check(isinstance(value, int) and value >= 1, f"fl.{key}", "an int >= 1", value)
        _check(self.over_selection >= 1.0, "fl.over_selection", "a float >= 1.0", self.over_selection)
        for key in ("local_lr", "local_sparse_lr", "local_table_lr", "server_tau", "max_weight"):
            _check(getattr(self, key) > 0, f"fl.{key}", "a float > 0", getattr(self, key))
        _check(self.server_lr >= 0, "fl.server_lr", "a float >= 0 (0 = the strategy's own)", self.server_lr)
        _check(self.prox_mu >= 0, "fl.prox_mu", "a float >= 0", self.prox_mu)
        _check(0 <= self.server_ema < 1, "fl.server_ema", "a float in [0, 1) (0 = off), e.g. 0.98", self.server_ema)
        _check(self.local_user_lr >= 0, "fl.local_user_lr", "a float >= 0 (0 = fl.local_sparse_lr)", self.local_user_lr)
        _check(len(self.server_betas) == 2 and all(0 <= b < 1 for b in self.server_betas), "fl.server_betas",
               "two floats in [0, 1), e.g. [0.9, 0.99]", self.server_betas)
        _check(self.async_max_staleness >= 0, "fl.async_max_staleness", "an int >= 0",
               self.async_max_staleness)
        _check(self.local_cache >= 0, "fl.local_cache", "an int >= 0", self.local_cache)
        _check(self.checkpoint_every_s >= 0, "fl.checkpoint_every_s", "a float >= 0 (0 = after every round)",
               self.checkpoint_every_s)
        for key in ("lr_decay_start", "server_lr_decay_start"):
            _check(getattr(self, key) >= 0, f"fl.{key}", "an int >= 0 (0 = constant lr)", getattr(self, key))
        _check(self.output_bias_step == "adaptive" or self.server_adaptive_scope == "towers", "fl.output_bias_step",
               '"adaptive" unless fl.server_adaptive_scope = "towers" (with "all" every part steps adaptively)',
               self.output_bias_step)
        _check(isinstance(self.ctcvr_warmup_rounds, int) and self.ctcvr_warmup_rounds >= 0, "fl.ctcvr_warmup_rounds",
               "an int >= 0 (0 = the whole loss from the first round)", self.ctcvr_warmup_rounds)

    def server_lr_for(self) -> float:
        """The server learning rate the run uses: ``server_lr``, or when it is 0 the
        strategy's own (1.0 for fedavg / fedprox: plain averaging; 0.01 for the adaptive
        ones, as in Reddi et al. 2021)."""
        if self.server_lr > 0:
            return self.server_lr
        return 1.0 if self.strategy in ("fedavg", "fedprox") else 0.01


@dataclasses.dataclass(frozen=True, kw_only=True)
class WindowConfig:
    kind: Literal["none", "fixed", "adaptive"] = "adaptive"
    deadline_s: float = 60.0  # fixed deadline, and the adaptive window's first deadline
    quantile: float = 0.8  # adaptive: deadline follows this quantile of completion times
    smoothing: float = 0.5  # adaptive: weight of the new estimate (EMA)
    history: int = 5  # adaptive: rounds of completion times considered
    min_deadline_s: float = 1.0
    max_deadline_s: float = 600.0
    min_clients: int = 10  # a round that gets fewer arrivals is retried
    max_retries: int = 3
    # which on-time uploads a sync round aggregates: "first" (it closes at its
    # fl.clients_per_round-th upload; with over-selection the slower, heavier phones are
    # the ones cut) or "random" (it waits for the deadline or everyone, then takes a
    # uniformly random fl.clients_per_round of the on-time uploads; the rest are counted
    # as surplus). Privacy on: every on-time upload counts either way
    take: Literal["first", "random"] = "first"
    # what a sync round does with an upload that comes after it closed: "drop" it (counted
    # late; with the deadline the late ones are the heavier phones, whose rows then never
    # count) or aggregate it in the "next" round if it comes before that one closes, one
    # model version stale and weighted as FedBuff weighs staleness (1 / sqrt(2)); counted
    # as carried in rounds.csv. Privacy on: "drop" only (the accountant's sampling)
    late: Literal["drop", "next"] = "drop"

    def __post_init__(self) -> None:
        _check(self.deadline_s > 0, "window.deadline_s", "a float > 0", self.deadline_s)
        _check(0 < self.quantile <= 1, "window.quantile", "in (0, 1]", self.quantile)
        _check(0 < self.smoothing <= 1, "window.smoothing", "in (0, 1]", self.smoothing)
        _check(self.history >= 1, "window.history", "an int >= 1", self.history)
        _check(0 < self.min_deadline_s <= self.max_deadline_s, "window.min_deadline_s",
               "> 0 and <= window.max_deadline_s", self.min_deadline_s)
        _check(self.min_clients >= 1, "window.min_clients", "an int >= 1", self.min_clients)
        _check(self.max_retries >= 0, "window.max_retries", "an int >= 0", self.max_retries)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    # client-level differential privacy (adfed.privacy; docs/privacy.md)
    dp: bool = False
    # dp_fedavg: Poisson sampling, clipped updates, Gaussian noise on the sum (McMahan et al.
    # 2018); dp_ftrl: tree-aggregated noise, each phone at most once per pass over the
    # population (Kairouz et al. 2021), no reliance on sampling amplification
    mechanism: Literal["dp_fedavg", "dp_ftrl"] = "dp_fedavg"
    clip: float = 10.0  # L2 norm C of a phone's whole shared update (the first C if adaptive); ~median norm at the default lrs
    noise_multiplier: float = 1.0  # z: noise std on the sum is z * C
    adaptive_clip: bool = False  # follow target_quantile of update norms (Andrew et al. 2021)
    # flat: one clip C for the whole update; per_tensor: a clip per tensor (C / sqrt(K) each
    # to start, each adapted to its own quantile with adaptive_clip), noise per tensor in
    # proportion to its clip (the small CVR head no longer shares a budget with the tables)
    clip_mode: Literal["flat", "per_tensor"] = "flat"
    target_quantile: float = 0.5
    clip_lr: float = 0.2  # eta of the geometric clip update
    clip_count_noise: float = 0.0  # std of the noise on the count of clipped phones; 0: clients_per_round / 20
    # 0: none; else calibrate z to reach it after fl.rounds ("calibrate") or stop
    # training before the round that would exceed it ("stop")
    target_epsilon: float = 0.0
    on_target: Literal["calibrate", "stop"] = "calibrate"
    delta: float = 0.0  # 0: 1 / N^1.1 for N phones with training rows
    # server: Gaussian noise added to the sum by the server; distributed: each phone adds
    # its share of Skellam noise after clipping and quantization (for secure aggregation)
    noise: Literal["server", "distributed"] = "server"
    quantization_scale: float = 1024.0  # distributed: clipped values x this, rounded
    # rows of each sparse_shared table in the round vocabulary that DP uploads cover
    # (popular rows from a DP count, then random rows); 0: every row of the table
    vocabulary_size: int = 2048
    vocabulary_random: float = 0.25  # fraction of the vocabulary drawn at random each round
    vocabulary_noise: float = 4.0  # noise multiplier of the DP count of rows (one release)

    def __post_init__(self) -> None:
        _check(self.clip > 0, "privacy.clip", "a float > 0", self.clip)
        _check(self.noise_multiplier >= 0, "privacy.noise_multiplier", "a float >= 0", self.noise_multiplier)
        _check(0 < self.target_quantile < 1, "privacy.target_quantile", "in (0, 1)", self.target_quantile)
        _check(self.clip_lr > 0, "privacy.clip_lr", "a float > 0", self.clip_lr)
        _check(self.clip_count_noise >= 0, "privacy.clip_count_noise", "a float >= 0", self.clip_count_noise)
        _check(self.target_epsilon >= 0, "privacy.target_epsilon", "a float >= 0 (0 = no target)",
               self.target_epsilon)
        _check(0 <= self.delta < 1, "privacy.delta", "in [0, 1) (0 = 1/N^1.1)", self.delta)
        _check(self.quantization_scale > 0, "privacy.quantization_scale", "a float > 0", self.quantization_scale)
        _check(self.vocabulary_size >= 0, "privacy.vocabulary_size", "an int >= 0 (0 = every row)",
               self.vocabulary_size)
        _check(0 <= self.vocabulary_random <= 1, "privacy.vocabulary_random", "in [0, 1]", self.vocabulary_random)
        _check(self.vocabulary_noise > 0, "privacy.vocabulary_noise", "a float > 0", self.vocabulary_noise)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RobustConfig:
    # the server's aggregator, by name in the registry of adfed.fl.aggregators ("mean":
    # the weighted mean of dense deltas and the per-row mean of sparse rows)
    aggregator: str = "mean"

    def __post_init__(self) -> None:
        _check(bool(self.aggregator), "robust.aggregator", 'an aggregator name (e.g. "mean")',
               self.aggregator)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration of a run (DESIGN.md "Contracts")."""

    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    fl: FLConfig = dataclasses.field(default_factory=FLConfig)
    window: WindowConfig = dataclasses.field(default_factory=WindowConfig)
    robust: RobustConfig = dataclasses.field(default_factory=RobustConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        _check(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "seed", "an int in [0, 2**63)", self.seed)
        _check(not self.privacy.dp or self.fl.schedule == "sync", "fl.schedule",
               '"sync" with privacy.dp (the accountant assumes synchronous rounds)', self.fl.schedule)
        _check(not self.privacy.dp or self.window.late == "drop", "window.late",
               '"drop" with privacy.dp (a late upload in the next round breaks the accountant\'s sampling)',
               self.window.late)
        # a sync round accepts at most clients_per_round updates: more would retry forever
        _check(self.train.mode != "federated" or self.fl.schedule != "sync"
               or self.window.min_clients <= self.fl.clients_per_round, "window.min_clients",
               f"<= fl.clients_per_round ({self.fl.clients_per_round}): pass --set "
               f"window.min_clients={self.fl.clients_per_round} or more clients a round", self.window.min_clients)


# -- (de)serialisation -----------------------------------------------------------------

def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(value in choices, key, "one of " + " | ".join(map(repr, choices)), value)
        return value
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), key, "a list", value)
        (inner, _) = typing.get_args(tp)
        return tuple(_coerce(v, inner, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, "true or false", value)
    elif tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, "an int", value)
    elif tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        _check(math.isfinite(value), key, "a finite number", value)
        return float(value)
    elif tp is str:
        _check(isinstance(value, str), key, "a string", value)
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key {full!r}; known keys: {sorted(known)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _check(isinstance(value, dict), full, "a table", value)
            kwargs[key] = _build(tp, value, f"{full}.")  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (e.g. parsed TOML)."""
    return _build(Config, raw, "")


def to_dict(cfg: Config) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return list(v)
        return v

    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = (
            {k: conv(x) for k, x in dataclasses.asdict(v).items()}
            if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
        )
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def load(path: str | Path) -> Config:
    """Load a TOML config file; errors name the file and the key."""
    return _from_file(path, lambda top: top)


def with_file(cfg: Config, path: str | Path) -> Config:
    """``cfg`` with the keys of a TOML file set over it (a preset such as
    ``experiments/configs/fedavg.toml``); keys the file leaves out keep ``cfg``'s values."""
    def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in top.items()}}
    return _from_file(path, lambda top: merge(to_dict(cfg), top))


def _from_file(path: str | Path, combine: Callable[[dict[str, Any]], dict[str, Any]]) -> Config:
    """The config of ``combine(the TOML file's keys)``; an invalid key or value is a
    ConfigError that names the file."""
    top = _read_toml(Path(path))
    try:
        return from_dict(combine(top))
    except ConfigError as exc:
        raise ConfigError(exc.args[0] if str(path) in exc.args[0] else f"{path}: {exc.args[0]}") from exc


def dumps(cfg: Config) -> str:
    return tomli_w.dumps(to_dict(cfg))


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in TOML syntax; bare words are strings)."""
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value; got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word: "mode = federated" means "federated"
    return key.split("."), value


def with_overrides(cfg: Config, items: list[str]) -> Config:
    """Apply ``--set`` overrides; unknown keys and bad values raise ConfigError."""
    raw = to_dict(cfg)
    for item in items:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config section {'.'.join(path[:-1])!r} in --set {item}")
            node = node[part]
        node[path[-1]] = value
    return from_dict(raw)
