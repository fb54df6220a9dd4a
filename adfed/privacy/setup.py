"""Everything a DP run fixes before round 1: the plan (with the noise multiplier
calibrated to ``privacy.target_epsilon`` if asked) and the round vocabulary (from one DP
count of the rows that sampled phones read)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from adfed.config import Config
from adfed.data.schema import ParamGroup
from adfed.data.store import Dataset
from adfed.errors import ConfigError
from adfed.fl.client import needed_rows
from adfed.fl.population import Population
from adfed.model.assembly import model_from_config
from adfed.model.groups import get_dense
from adfed.privacy.accountant import PrivacyPlan, calibrate, epsilon, make_plan
from adfed.privacy.vocabulary import Vocabulary, dp_row_counts, plan_vocabulary

logger = logging.getLogger(__name__)

#: rows one phone may add to the DP row count (its L2 contribution is sqrt of this)
MAX_ROWS_PER_PHONE = 64


#: phones asked, in expectation, for the DP row count
COUNTED_PHONES = 1000


def expected_participation(cfg: Config, population: Population) -> float:
    """The expected share of sampled phones whose upload is aggregated: online, not
    dropping out (the device profiles' probabilities, not anyone's data) and, under the
    adaptive window, on time: the window's deadline follows ``window.quantile`` of the
    completion times, so that share of the phones that finish arrives before it. A fixed
    window or none counts no lateness (a fixed deadline's share depends on each phone's
    example count, which a DP constant may not read)."""
    prof = population.profiles
    clients = population.clients
    available = float(np.mean(prof.online_prob[clients] * (1 - prof.dropout_prob[clients])))
    on_time = cfg.window.quantile if cfg.window.kind == "adaptive" else 1.0
    return available * on_time


def setup(cfg: Config, dataset: Dataset, population: Population
          ) -> tuple[Config, PrivacyPlan, Vocabulary | None]:
    """The run's config (noise multiplier calibrated when ``on_target = "calibrate"``), its
    plan and vocabulary. The DP row count asks a Poisson sample of the phones (rate
    ``COUNTED_PHONES / N``), which the accountant amplifies. One-line ConfigErrors for
    targets that cannot be met."""
    p = cfg.privacy
    scratch = model_from_config(cfg, dataset, user_rows=1)
    tables = {n: int(t.shape[0]) for n, t in get_dense(scratch, ParamGroup.SPARSE_SHARED).items()}
    needs_count = bool(tables) and p.vocabulary_size > 0 and any(p.vocabulary_size < n for n in tables.values())
    participation = expected_participation(cfg, population)
    rate = min(1.0, COUNTED_PHONES / len(population))
    groups = len(get_dense(scratch, ParamGroup.DENSE_SHARED)) + len(tables) if p.clip_mode == "per_tensor" else 1
    plan = dataclasses.replace(make_plan(cfg, len(population), participation=participation, clip_groups=groups),
                               vocabulary_rate=rate)
    if not needs_count:
        plan = dataclasses.replace(plan, vocabulary_noise=None)
    if p.target_epsilon > 0:
        spent = epsilon(plan, 0)
        if spent > p.target_epsilon:
            raise ConfigError(f"privacy.target_epsilon {p.target_epsilon} is already exceeded before round 1 "
                              f"(the DP row count costs {spent:.3g}); raise it or privacy.vocabulary_noise")
        if p.on_target == "stop" and (first := epsilon(plan, 1)) > p.target_epsilon:
            raise ConfigError(f"privacy.target_epsilon {p.target_epsilon} is exceeded by round 1 (epsilon "
                              f"{first:.3g} at noise multiplier {p.noise_multiplier:g}); raise it or "
                              f"privacy.noise_multiplier, or set privacy.on_target=\"calibrate\"")
        if p.on_target == "calibrate":
            z = calibrate(plan, cfg.fl.rounds, p.target_epsilon)
            logger.info("privacy: noise multiplier %.4f reaches epsilon %.3g after %d rounds", z,
                        p.target_epsilon, cfg.fl.rounds)
            cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(p, noise_multiplier=z))
            plan = dataclasses.replace(plan, noise_multiplier=z)
    if not needs_count:
        return cfg, plan, plan_vocabulary(tables, {}, 0, 0.0, cfg.seed) if tables else None
    pick = np.random.default_rng([cfg.seed, 0xC0DE, 1]).random(len(population)) < rate
    touched = [needed_rows(scratch, d) for d in population.train_data_many(population.clients[pick])]
    counts = dp_row_counts(touched, tables, max_rows=MAX_ROWS_PER_PHONE, noise_multiplier=p.vocabulary_noise,
                           rng=np.random.default_rng([cfg.seed, 0xC0DE]))
    return cfg, plan, plan_vocabulary(tables, counts, p.vocabulary_size, p.vocabulary_random, cfg.seed)
