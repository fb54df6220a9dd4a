"""The accountant: dp-accounting events for our mechanisms, cross-checked independently."""

from __future__ import annotations

import dataclasses
import math

import dp_accounting as dpa
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant

from adfed.config import Config, with_overrides
from adfed.errors import ConfigError
from adfed.privacy.accountant import calibrate, epsilon, make_plan


def _cfg(*over: str) -> Config:
    return with_overrides(Config(), ["privacy.dp=true", "fl.clients_per_round=100", *over])


@pytest.mark.parametrize(("z", "rounds"), [(0.8, 50), (1.2, 200), (3.0, 400)])
def test_reported_epsilon_lies_between_independent_pld_and_rdp(z: float, rounds: int) -> None:
    # Prepare: our plan, and the same mechanism built by hand with dp-accounting
    plan = dataclasses.replace(make_plan(_cfg(f"privacy.noise_multiplier={z}"), 20_000), vocabulary_noise=None)
    q, delta = 100 / 20_000, 20_000 ** -1.1
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event)
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(event)

    # Execute
    ours = epsilon(plan, rounds)

    # Assert
    assert 0.95 * pld.get_epsilon(delta) <= ours <= 1.05 * rdp.get_epsilon(delta)
    assert epsilon(plan, rounds, accountant="pld") == pytest.approx(pld.get_epsilon(delta), rel=1e-6)


def test_dp_ftrl_composes_one_tree_per_pass_under_replace_special() -> None:
    plan = dataclasses.replace(make_plan(_cfg('privacy.mechanism="dp_ftrl"', "privacy.noise_multiplier=2"), 1000),
                               vocabulary_noise=None)
    assert plan.rounds_per_pass == 10
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_SPECIAL)
    acc.compose(dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(dpa.SingleEpochTreeAggregationDpEvent(2.0, 10), 2),
                                     dpa.SingleEpochTreeAggregationDpEvent(2.0, 5)]))
    assert epsilon(plan, 25) == pytest.approx(acc.get_epsilon(plan.delta), rel=1e-9)
    with pytest.raises(ValueError, match="PLD accountant has no tree-aggregation event"):
        epsilon(plan, 25, accountant="pld")


def test_epsilon_grows_with_rounds_and_the_vocabulary_count_costs_once() -> None:
    plan = make_plan(_cfg(), 20_000)
    eps = [epsilon(plan, r) for r in (0, 10, 100, 1000)]
    assert eps == sorted(eps) and eps[0] > 0  # round 0: the DP row count alone
    assert epsilon(dataclasses.replace(plan, vocabulary_noise=None), 0) == 0.0
    assert math.isinf(epsilon(dataclasses.replace(plan, noise_multiplier=0.0), 10))


def test_calibrate_finds_the_smallest_noise_that_meets_the_target() -> None:
    plan = dataclasses.replace(make_plan(_cfg(), 200_000), vocabulary_noise=None)
    z = calibrate(plan, 300, 4.0)
    assert epsilon(dataclasses.replace(plan, noise_multiplier=z), 300) <= 4.0
    assert epsilon(dataclasses.replace(plan, noise_multiplier=z * 0.98), 300) > 4.0


def test_adaptive_clipping_takes_its_share_of_the_noise() -> None:
    plan = make_plan(_cfg("privacy.adaptive_clip=true", "privacy.noise_multiplier=1.0"), 20_000)
    assert plan.clip_count_std == 5.0  # clients_per_round / 20
    assert plan.update_noise_multiplier == pytest.approx((1 - 1 / 100) ** -0.5)
    with pytest.raises(ConfigError, match=r"privacy.noise_multiplier \(12\) must be < 2 x privacy.clip_count_noise"):
        make_plan(_cfg("privacy.adaptive_clip=true", "privacy.noise_multiplier=12"), 20_000)


@pytest.mark.parametrize(("over", "population", "match"), [
    (["privacy.delta=0.01"], 1000, r"privacy.delta must be < 1/N = 0.001 for N = 1000 phones"),
    (["privacy.noise_multiplier=-1"], 1000, r"privacy.noise_multiplier must be a float >= 0; got -1"),
    (["privacy.clip=0"], 1000, r"privacy.clip must be a float > 0; got 0"),
    (['privacy.mechanism="dp_ftrl"', "privacy.adaptive_clip=true"], 1000, r"'dp_ftrl' runs with a fixed flat clip"),
    ([], 1, r"privacy.dp needs at least 2 phones"),
])
def test_bad_privacy_settings_are_one_line_errors(over: list[str], population: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_plan(_cfg(*over), population)


def test_dp_needs_the_sync_schedule() -> None:
    with pytest.raises(ConfigError, match=r'fl.schedule must be "sync" with privacy.dp'):
        _cfg('fl.schedule="async"')


def test_realized_noise_is_accounted_round_by_round() -> None:
    plan = dataclasses.replace(make_plan(_cfg("privacy.noise_multiplier=1.0"), 20_000), vocabulary_noise=None)
    planned = epsilon(plan, 3)
    assert epsilon(plan, 3, realized=[1.0, 1.0, 1.0]) == pytest.approx(planned, rel=1e-9)
    assert epsilon(plan, 3, realized=[1.0, 0.7, 1.0]) > planned  # a round with fewer shares than planned
    assert math.isinf(epsilon(plan, 2, realized=[1.0, 0.0]))


def test_a_run_without_dp_never_imports_dp_accounting(modules_loaded_by) -> None:  # noqa: ANN001
    """It pulls in scipy.signal (~0.7 s a process); the trainer and every worker import
    this module, but only an accounting call needs the library."""
    code = "import adfed.trainer, adfed.fl.backends\nfrom adfed.privacy import accountant"

    assert modules_loaded_by(code, ("dp_accounting",)) == set()
