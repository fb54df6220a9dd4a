"""Privacy accounting with dp-accounting (RDP and PLD); nothing hand-written.

:class:`PrivacyPlan` fixes, for one run, what the accountant assumes: the mechanism, the
noise multiplier, the sampling (rate ``q`` for DP-FedAvg's Poisson sampling; passes over
the population for DP-FTRL), the population size and δ. :func:`dp_event` turns it and a
number of rounds into a dp-accounting event; :func:`epsilon` reads ε at δ off an RDP or a
PLD accountant; :func:`calibrate` finds the smallest noise multiplier that reaches a
target ε after a number of rounds.

- DP-FedAvg: each round is a Poisson-subsampled Gaussian mechanism (rate q, noise
  multiplier z), self-composed over the rounds (add-or-remove-one neighbours).
- DP-FTRL: tree aggregation restarted every pass over the population; within a pass each
  phone participates at most once (``SingleEpochTreeAggregationDpEvent``), and the passes
  compose (replace-one-with-zero neighbours, as in Kairouz et al. 2021).
- The round vocabulary's DP row count (one Gaussian release before round 1 over a
  Poisson sample of the phones) composes with either.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from adfed.config import Config
from adfed.errors import ConfigError

# dp-accounting is imported where it is used: it pulls in scipy.signal (~0.7 s), which a
# run without DP (and every worker process, which imports this module) never needs
if TYPE_CHECKING:
    import dp_accounting as dpa
    from dp_accounting.privacy_accountant import NeighboringRelation


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """What a DP run assumes, fixed before round 1 (see module doc)."""

    mechanism: str  # "dp_fedavg" | "dp_ftrl"
    noise_multiplier: float  # z: the noise std of the sum over the clip norm (both noises together)
    population: int  # N: phones with training rows
    cohort: int  # expected phones per round: q * N (DP-FedAvg) or the pass's chunk (DP-FTRL)
    delta: float
    vocabulary_noise: float | None  # z of the DP row count; None: no count (no sparse tables)
    clip_count_std: float  # std of the noise on the count of unclipped phones (adaptive clipping)
    adaptive_clip: bool
    #: expected share of sampled phones whose upload arrives (online, not dropping out,
    #: on time under the adaptive window; from the device profiles and the window's
    #: quantile, not from any phone's data): the fixed denominator
    #: of the DP sum is ``cohort * participation``, the expected number of uploads
    participation: float = 1.0
    #: the Poisson rate at which phones are asked for the DP row count (one release)
    vocabulary_rate: float = 1.0
    #: K: tensors clipped one by one (privacy.clip_mode = "per_tensor"); 1: flat clipping
    clip_groups: int = 1

    @property
    def denominator(self) -> float:
        return self.cohort * self.participation

    @property
    def sampling_rate(self) -> float:
        return self.cohort / self.population

    @property
    def rounds_per_pass(self) -> int:
        return math.ceil(self.population / self.cohort)

    @property
    def update_noise_multiplier(self) -> float:
        """The noise multiplier of the update sum alone. With adaptive clipping part of the
        budget goes to the count of unclipped phones (std ``clip_count_std``): the update
        gets ``(z^-2 - (2 sigma_b)^-2)^-1/2`` so that both together are a Gaussian
        mechanism with multiplier z (Andrew et al. 2021, Theorem 1)."""
        z = self.noise_multiplier
        if not self.adaptive_clip or z == 0:
            return z
        # K centred bits have L2 sensitivity sqrt(K) / 2
        return (z ** -2 - (2 * self.clip_count_std / self.clip_groups ** 0.5) ** -2) ** -0.5


def make_plan(cfg: Config, population: int, *, noise_multiplier: float | None = None,
              participation: float = 1.0, clip_groups: int = 1) -> PrivacyPlan:
    """The plan of ``cfg.privacy`` over ``population`` phones; one-line ConfigErrors for
    settings no accountant can honour."""
    p = cfg.privacy
    if population < 2:
        raise ConfigError(f"privacy.dp needs at least 2 phones with training rows; the data has {population}")
    delta = p.delta or population ** -1.1
    if delta >= 1 / population:
        raise ConfigError(f"privacy.delta must be < 1/N = {1 / population:.3g} for N = {population} phones "
                          f"(a larger delta allows releasing one phone's data); got {p.delta}")
    if p.mechanism == "dp_ftrl" and (p.adaptive_clip or p.noise == "distributed" or p.clip_mode != "flat"):
        raise ConfigError("privacy.mechanism 'dp_ftrl' runs with a fixed flat clip and server noise: set "
                          "privacy.adaptive_clip=false, privacy.clip_mode=\"flat\" and privacy.noise=\"server\" "
                          "(or use dp_fedavg)")
    if p.clip_mode != "flat" and p.noise == "distributed":
        raise ConfigError('privacy.clip_mode="per_tensor" is built for server noise; use privacy.noise="server"')
    cohort = min(cfg.fl.clients_per_round, population)
    count_std = p.clip_count_noise or cohort / 20
    z = p.noise_multiplier if noise_multiplier is None else noise_multiplier
    if p.adaptive_clip and z > 0 and z >= 2 * count_std / clip_groups ** 0.5:
        raise ConfigError(f"privacy.noise_multiplier ({z:.3g}) must be < 2 x privacy.clip_count_noise / sqrt(K) "
                          f"({2 * count_std / clip_groups ** 0.5:.3g}, K = {clip_groups} clipped parts) with "
                          f"adaptive clipping: raise clip_count_noise or lower the noise")
    return PrivacyPlan(mechanism=p.mechanism, noise_multiplier=z, population=population, cohort=cohort,
                       delta=delta, vocabulary_noise=p.vocabulary_noise, clip_count_std=count_std,
                       adaptive_clip=p.adaptive_clip, participation=participation, clip_groups=clip_groups)


def _relation(plan: PrivacyPlan) -> NeighboringRelation:
    from dp_accounting.privacy_accountant import NeighboringRelation

    return NeighboringRelation.REPLACE_SPECIAL if plan.mechanism == "dp_ftrl" else NeighboringRelation.ADD_OR_REMOVE_ONE


def dp_event(plan: PrivacyPlan, rounds: int, *, with_vocabulary: bool = True,
             realized: Sequence[float] | None = None) -> dpa.DpEvent:
    """The dp-accounting event of ``rounds`` rounds under ``plan``. ``realized``: the
    noise multiplier each round really carried (distributed noise: the phones' shares of
    the phones that arrived), accounted round by round instead of the plan's."""
    import dp_accounting as dpa

    if plan.noise_multiplier == 0 or (realized is not None and min(realized, default=1.0) <= 0):
        return dpa.NonPrivateDpEvent()
    events: list[dpa.DpEvent] = []
    if realized is not None:
        if plan.mechanism != "dp_fedavg" or len(realized) != rounds:
            raise ValueError("realized noise is accounted for dp_fedavg, one multiplier per round")
        events.extend(dpa.PoissonSampledDpEvent(plan.sampling_rate, dpa.GaussianDpEvent(z)) for z in realized)
    elif plan.mechanism == "dp_fedavg":
        step = dpa.PoissonSampledDpEvent(plan.sampling_rate, dpa.GaussianDpEvent(plan.noise_multiplier))
        events.append(dpa.SelfComposedDpEvent(step, rounds))
    else:
        full, rest = divmod(rounds, plan.rounds_per_pass)
        if full:
            tree = dpa.SingleEpochTreeAggregationDpEvent(plan.noise_multiplier, plan.rounds_per_pass)
            events.append(dpa.SelfComposedDpEvent(tree, full))
        if rest:
            events.append(dpa.SingleEpochTreeAggregationDpEvent(plan.noise_multiplier, rest))
    if with_vocabulary and plan.vocabulary_noise is not None:
        count = dpa.GaussianDpEvent(plan.vocabulary_noise)
        events.append(count if plan.vocabulary_rate >= 1 else dpa.PoissonSampledDpEvent(plan.vocabulary_rate, count))
    return dpa.ComposedDpEvent(events)


def epsilon(plan: PrivacyPlan, rounds: int, *, accountant: str = "rdp", with_vocabulary: bool = True,
            realized: Sequence[float] | None = None) -> float:
    """ε at ``plan.delta`` after ``rounds`` rounds; ``accountant`` is "rdp" (a conservative
    bound, cheap: used every round) or "pld" (tighter; DP-FedAvg only). ``realized``: see
    :func:`dp_event`."""
    if plan.noise_multiplier == 0:
        return math.inf
    if rounds == 0 and (not with_vocabulary or plan.vocabulary_noise is None):
        return 0.0
    import dp_accounting as dpa
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_event(plan, rounds, with_vocabulary=with_vocabulary, realized=realized)
    if isinstance(event, dpa.NonPrivateDpEvent):
        return math.inf
    if accountant == "pld":
        if plan.mechanism != "dp_fedavg":
            raise ValueError("the PLD accountant has no tree-aggregation event; use accountant='rdp'")
        acc: dpa.PrivacyAccountant = pld_privacy_accountant.PLDAccountant(_relation(plan))
    else:
        acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=_relation(plan))
    acc.compose(event)
    return float(acc.get_epsilon(plan.delta))


def calibrate(plan: PrivacyPlan, rounds: int, target: float, *, tol: float = 1e-3) -> float:
    """The smallest noise multiplier (within ``tol`` relative) whose ε (RDP) after
    ``rounds`` rounds is at most ``target``; ConfigError when none up to 1e4 is."""
    def eps(z: float) -> float:
        return epsilon(dataclasses.replace(plan, noise_multiplier=z), rounds)

    hi = 1.0
    while eps(hi) > target:
        hi *= 2
        if hi > 1e4:
            raise ConfigError(f"privacy.target_epsilon {target} cannot be reached in {rounds} rounds at "
                              f"any noise multiplier up to 1e4 (the DP row count alone costs more?); raise it")
    lo = hi / 2 if hi > 1.0 else 0.0
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        if mid > 0 and eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi
