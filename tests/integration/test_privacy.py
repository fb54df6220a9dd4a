"""Differential privacy end to end on the small world: runs, sampling, uploads, targets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from adfed.data.store import Dataset
from adfed.errors import ConfigError
from adfed.fl import strategies
from adfed.fl.backends import InProcessBackend, Job
from adfed.fl.population import Population
from adfed.fl.rounds import make_offer, select_dp
from adfed.fl.simulation import build_engine, initial_server_state
from adfed.fl.wire import decode_update
from adfed.model.assembly import model_from_config
from adfed.privacy import setup as privacy_setup
from adfed.trainer import Trainer

DP = ["privacy.dp=true", "fl.clients_per_round=60", "privacy.vocabulary_size=500"]


def test_dp_fedavg_run_reports_epsilon_every_round(small_world, fl_config):
    result = Trainer(fl_config(small_world, *DP, "fl.rounds=3")).fit()
    eps = [r["epsilon"] for r in result.rows]
    assert eps == sorted(eps) and eps[0] > 0
    s = result.summary
    assert s["mechanism"] == "dp_fedavg" and s["epsilon"] == eps[-1]
    assert s["epsilon_pld"] < s["epsilon"]  # PLD is the tighter bound
    assert s["sampling_rate"] == pytest.approx(60 / s["population"])
    assert s["delta"] == pytest.approx(s["population"] ** -1.1)
    assert s["noise_multiplier"] == 1.0 and s["clip"] == 10.0
    assert np.isfinite(s["auc"])


def test_dp_uploads_are_vocabulary_blocks_whatever_the_phone_read(small_world, fl_config):
    # Prepare: two phones with different data, one DP offer
    cfg = fl_config(small_world, *DP)
    dataset = Dataset.open(small_world)
    population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    cfg, plan, vocabulary = privacy_setup.setup(cfg, dataset, population)
    opt = strategies.create("fedavg", 1.0)
    state = initial_server_state(cfg, model_from_config(cfg, dataset), opt)
    backend = InProcessBackend(small_world, cfg)
    engine = build_engine(cfg, dataset, population, state, backend, opt, plan=plan, vocabulary=vocabulary)
    offer = make_offer(state, engine, 1)
    clients = [int(c) for c in population.clients[:2]]

    # Execute
    results = backend.map(offer, [Job(client_id=c, phone=None, seed=(0, c)) for c in clients])
    updates = [decode_update(r.payload, engine.spec)[1] for r in results]

    # Assert: same row ids for both (the round's vocabulary), no loss, no example count
    assert offer.vocabulary and set(updates[0].sparse) == set(offer.vocabulary)
    for u in updates:
        for table, rows in u.sparse.items():
            assert torch.equal(rows.ids, offer.vocabulary[table])
        assert u.metrics.keys() == {"below_clip"} and u.num_examples == 1
    assert len(results[0].payload) == len(results[1].payload)  # sizes say nothing either
    assert results[0].bytes_down == results[1].bytes_down


def test_the_dp_samplers_are_what_the_accountant_assumes(small_world, fl_config):
    dataset = Dataset.open(small_world)
    population = Population(dataset, test_fraction=0.2, seed=0)
    population.profiles.online_prob[:] = 1.0
    n = len(population)
    # DP-FedAvg: Poisson, each phone independently with q = cohort / N
    cfg = fl_config(small_world, *DP)
    sizes = [len(select_dp(population, cfg, r, np.random.default_rng(r))) for r in range(1, 301)]
    assert np.mean(sizes) == pytest.approx(60, rel=0.05)
    assert np.std(sizes) == pytest.approx(np.sqrt(n * (60 / n) * (1 - 60 / n)), rel=0.2)  # binomial, not fixed k
    # DP-FTRL: each phone at most once per pass, every phone in a pass
    cfg = fl_config(small_world, *DP, 'privacy.mechanism="dp_ftrl"')
    per_pass = -(-n // 60)
    seen = np.concatenate([select_dp(population, cfg, r, np.random.default_rng(r)) for r in range(1, per_pass + 1)])
    assert len(seen) == len(set(seen.tolist())) == n


def test_the_fixed_denominator_counts_the_phones_the_adaptive_window_cuts(small_world, fl_config):
    # the denominator is what arrives on average: online, not dropping out, and on time
    dataset = Dataset.open(small_world)
    population = Population(dataset, test_fraction=0.2, seed=0)
    cfg = fl_config(small_world, *DP, "fl.rounds=12", "privacy.vocabulary_size=0", "privacy.noise_multiplier=0")
    prof = population.profiles
    available = float(np.mean(prof.online_prob[population.clients] * (1 - prof.dropout_prob[population.clients])))
    assert privacy_setup.expected_participation(cfg, population) == pytest.approx(available * cfg.window.quantile)
    no_window = fl_config(small_world, *DP, 'window.kind="none"')
    assert privacy_setup.expected_participation(no_window, population) == pytest.approx(available)
    # and the run's arrivals agree with it, after the window's first rounds have adapted
    result = Trainer(cfg).fit()
    arrived = np.mean([r["arrived_dp"] for r in result.rows[4:]])
    assert arrived == pytest.approx(result.summary["dp_denominator"], rel=0.1)  # without the window's share: 0.2 off


def test_stop_policy_ends_before_the_target_is_exceeded(small_world, fl_config):
    # at z = 1 and q ~ 60/2900, epsilon is ~0.84 after 2 rounds and ~0.90 after 5
    cfg = fl_config(small_world, *DP, "fl.rounds=50", "privacy.target_epsilon=0.87",
                    'privacy.on_target="stop"', "privacy.vocabulary_size=0")
    result = Trainer(cfg).fit()
    assert result.summary["stopped_at_target_epsilon"] is True
    assert 1 < len(result.rows) < 5 and result.summary["epsilon"] <= 0.87


def test_calibrate_policy_sets_the_noise_for_the_planned_rounds(small_world, fl_config):
    cfg = fl_config(small_world, *DP, "fl.rounds=2", "privacy.target_epsilon=4", "privacy.vocabulary_size=0")
    s = Trainer(cfg).fit().summary
    assert s["epsilon"] <= 4.0 and s["epsilon"] > 3.9 and s["noise_multiplier"] != 1.0


def test_a_target_spent_before_round_one_is_a_one_line_error(small_world, fl_config):
    cfg = fl_config(small_world, *DP, "privacy.target_epsilon=0.01", "privacy.vocabulary_noise=1")
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon 0.01 is already exceeded before round 1"):
        Trainer(cfg).fit()


def test_a_stop_target_that_round_one_exceeds_is_a_one_line_error(small_world, fl_config):
    # at z = 1 and q ~ 60/2900 one round costs ~0.8: a stop target below it would train nothing
    cfg = fl_config(small_world, *DP, "privacy.target_epsilon=0.3", 'privacy.on_target="stop"',
                    "privacy.vocabulary_size=0")
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon 0.3 is exceeded by round 1 \(epsilon 0\.\d+ at "
                                          r"noise multiplier 1\); raise it or privacy.noise_multiplier"):
        Trainer(cfg).fit()


@pytest.mark.parametrize("extra", [['privacy.mechanism="dp_ftrl"'], ['privacy.noise="distributed"'],
                                   ["privacy.adaptive_clip=true"],
                                   ['privacy.clip_mode="per_tensor"', "privacy.adaptive_clip=true"]])
def test_every_mechanism_runs_and_resumes_to_the_same_model(small_world, fl_config, tmp_path, extra):
    cfg = fl_config(small_world, *DP, "fl.rounds=3", *extra)
    full = Trainer(cfg).fit()
    Trainer(dataclasses.replace(cfg, fl=dataclasses.replace(cfg.fl, rounds=2))).fit(checkpoint_dir=tmp_path)
    resumed = Trainer(cfg).fit(checkpoint_dir=tmp_path, resume=True)
    assert np.isfinite(full.summary["auc"])
    a, b = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
    if extra == ["privacy.adaptive_clip=true"]:
        assert full.summary["clip"] != 10.0  # the clip moved
    if 'privacy.clip_mode="per_tensor"' in extra:  # one clip per tensor, each moved from C / sqrt(K)
        clips = full.summary["clips"]
        assert len(clips) > 10 and len(set(clips.values())) > 1
