"""Client-level differential privacy on the engine's seams.

On the phone (update pipeline transforms):

- :class:`Clip`: scales the whole shared update (dense deltas and the sparse blocks) to
  L2 norm at most C (the round's ``settings.clip``); reports one bit, "my norm was at
  most C", for adaptive clipping, and nothing else (no loss, no example count: every
  phone weighs one).
- :class:`SkellamShare` (``privacy.noise = "distributed"``): after clipping, scales by
  ``privacy.quantization_scale``, rounds stochastically to integers and adds this
  phone's share of Skellam noise (the difference of two Poisson draws; Agarwal et al.
  2021), sized so that the sum over ``clients_per_round`` phones carries noise of std
  ``z * C * scale``: the server (under secure aggregation) never holds an un-noised sum.
  The server's inverse divides by the scale. When fewer phones arrive the sum carries
  less noise, ``z sqrt(arrived / clients_per_round)``; the run accounts each round at the
  multiplier it really had (and the Skellam sum as Gaussian of the same variance, ignoring
  the rounding's small addition to the sensitivity: an approximation, stated in
  docs/privacy.md).

On the server (aggregator wrappers, :func:`adfed.fl.aggregators.register_wrapper`):

- :class:`GaussianSum` (DP-FedAvg; McMahan et al. 2018): the sum of the clipped updates
  plus N(0, (z C)^2) on every released coordinate (dense part and vocabulary rows),
  divided by a fixed denominator, the expected number of uploads (``q N`` times the
  expected participation from the device profiles), whoever arrived. With
  adaptive clipping (Andrew et al. 2021) the count of unclipped phones is noised too and
  moves C geometrically toward the target quantile.
- :class:`TreeSum` (DP-FTRL; Kairouz et al. 2021): the same sum, with the noise of a
  binary tree over the rounds of a pass over the population instead of fresh noise:
  round t releases the prefix sum's noise minus round t-1's, so the model after t rounds
  carries the noise of at most log2(t) + 1 tree nodes. Node noise is drawn from seeds
  (run seed, pass, node), so the server needs no state for it. Every coordinate of
  every shared table is released each round.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from adfed.fl.aggregators import Aggregate, Aggregator, RoundInfo
from adfed.fl.pipeline import State
from adfed.fl.types import ClientSettings, SparseRows, Update
from adfed.fl.wire import WireSpec
from adfed.privacy.accountant import PrivacyPlan
from adfed.privacy.vocabulary import Vocabulary

BELOW_CLIP = "below_clip"


def update_norm(update: Update) -> float:
    """L2 norm of every shared value of an update (dense deltas and sparse row values), in float64."""
    sq = sum(float(t.double().pow(2).sum()) for t in update.dense.values())
    sq += sum(float(r.values.double().pow(2).sum()) for r in update.sparse.values())
    return math.sqrt(sq)


def clip_update(update: Update, clip: float) -> tuple[Update, float]:
    """``update`` scaled to L2 norm at most ``clip`` (a zero update stays zero), and its norm before."""
    if clip <= 0:
        raise ValueError(f"privacy.clip must be a float > 0; got {clip}")
    norm = update_norm(update)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    if scale == 1.0:
        return update, norm
    dense = {k: v * scale for k, v in update.dense.items()}
    sparse = {k: SparseRows(r.ids, r.values * scale) for k, r in update.sparse.items()}
    return dataclasses.replace(update, dense=dense, sparse=sparse), norm


def clip_per_tensor(update: Update, clips: dict[str, float]) -> tuple[Update, dict[str, float]]:
    """Each tensor of ``update`` (a dense delta, or a sparse table's values) scaled to L2 norm
    at most its own clip; returns the clipped update and the norms before. A tensor without
    a clip is refused (it would leave the phone unbounded)."""
    missing = sorted((set(update.dense) | set(update.sparse)) - set(clips))
    if missing:
        raise ValueError(f"no clip for {', '.join(missing)}; per-tensor clipping needs one for every tensor")

    def scaled(t: torch.Tensor, clip: float) -> tuple[torch.Tensor, float]:
        norm = float(t.double().norm())
        return (t if norm <= clip else t * (clip / norm)), norm

    norms: dict[str, float] = {}
    dense = {}
    for k, v in update.dense.items():
        dense[k], norms[k] = scaled(v, clips[k])
    sparse = {}
    for k, r in update.sparse.items():
        values, norms[k] = scaled(r.values, clips[k])
        sparse[k] = SparseRows(r.ids, values)
    return dataclasses.replace(update, dense=dense, sparse=sparse), norms


@dataclasses.dataclass(frozen=True)
class Clip:
    """The ``clip`` transform (see module doc): the whole update to ``settings.clip``, or,
    with per-tensor clips (``settings.clips``), each tensor to its own, reporting one bit
    per tensor."""

    name: str = "clip"

    def forward(self, update: Update, rng: np.random.Generator, state: State | None,
                settings: ClientSettings) -> tuple[Update, State | None]:
        if settings.clips:
            clips = dict(settings.clips)
            clipped, norms = clip_per_tensor(update, clips)
            bits = {f"{BELOW_CLIP}/{k}": 1.0 if n <= clips[k] else 0.0 for k, n in norms.items()}
            return dataclasses.replace(clipped, num_examples=1, metrics=bits), state
        clipped, norm = clip_update(update, settings.clip)
        bit = 1.0 if norm <= settings.clip else 0.0
        return dataclasses.replace(clipped, num_examples=1, metrics={BELOW_CLIP: bit}), state

    def inverse(self, update: Update) -> Update:
        return update


def _skellam(shape: tuple[int, ...], mu: float, rng: np.random.Generator) -> np.ndarray:
    return (rng.poisson(mu, size=shape) - rng.poisson(mu, size=shape)).astype(np.float64)


def _quantize(t: torch.Tensor, scale: float, mu: float, rng: np.random.Generator) -> torch.Tensor:
    x = t.double().numpy() * scale
    low = np.floor(x)
    q = low + (rng.random(x.shape) < (x - low))  # unbiased stochastic rounding
    return torch.from_numpy(q + _skellam(x.shape, mu, rng)).to(t.dtype)


@dataclasses.dataclass(frozen=True)
class SkellamShare:
    """The ``skellam`` transform (see module doc). ``share_variance`` is this phone's part
    of the sum's noise variance, in quantized units: ``(z C scale)^2 / cohort``; values
    travel as float32 integers (exact below 2^24)."""

    scale: float
    noise_multiplier: float
    cohort: int
    name: str = "skellam"

    def forward(self, update: Update, rng: np.random.Generator, state: State | None,
                settings: ClientSettings) -> tuple[Update, State | None]:
        sigma = self.noise_multiplier * settings.clip * self.scale
        mu = sigma ** 2 / self.cohort / 2  # Skellam(mu, mu) has variance 2 mu
        dense = {k: _quantize(v, self.scale, mu, rng) for k, v in update.dense.items()}
        sparse = {k: SparseRows(r.ids, _quantize(r.values, self.scale, mu, rng)) for k, r in update.sparse.items()}
        return dataclasses.replace(update, dense=dense, sparse=sparse), state

    def inverse(self, update: Update) -> Update:
        dense = {k: v / self.scale for k, v in update.dense.items()}
        sparse = {k: SparseRows(r.ids, r.values / self.scale) for k, r in update.sparse.items()}
        return dataclasses.replace(update, dense=dense, sparse=sparse)


def sum_uploads(updates: Sequence[Update], spec: WireSpec, vocab: dict[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Float64 sums of the dense deltas and of the vocabulary blocks (an upload whose block
    is over other rows than the round's vocabulary is not counted there)."""
    dense = {k: torch.zeros(shape, dtype=torch.float64) for k, (shape, _) in spec.dense.items()}
    blocks = {t: torch.zeros(len(ids), spec.tables[t][1], dtype=torch.float64) for t, ids in vocab.items()}
    for u in updates:
        for k, v in u.dense.items():
            dense[k] += v.double()
        for t, rows in u.sparse.items():
            if t in blocks and torch.equal(rows.ids, vocab[t]):
                blocks[t] += rows.values.double()
    return dense, blocks


def _next_clip(plan: PrivacyPlan, clip: float, updates: Sequence[Update], bit: str, rng: np.random.Generator,
               target: float, lr: float) -> dict[str, float]:
    """The noised fraction of phones whose norm was at most C (their metric ``bit``), and
    the geometric update of C toward the target quantile (Andrew et al. 2021, Algorithm 1)."""
    below = sum(u.metrics.get(bit, 0.0) for u in updates) + rng.normal(0.0, plan.clip_count_std)
    frac = below / plan.denominator
    return {"below_clip": frac, "next_clip": clip * math.exp(-lr * (frac - target))}


@dataclasses.dataclass(frozen=True)
class GaussianSum:
    """DP-FedAvg's server (see module doc); ``distributed``: the phones added the noise."""

    plan: PrivacyPlan
    spec: WireSpec
    vocabulary: Vocabulary | None
    distributed: bool
    target_quantile: float
    clip_lr: float

    def __call__(self, updates: Sequence[Update], weights: np.ndarray, rng: np.random.Generator,
                 info: RoundInfo) -> Aggregate:
        vocab = self.vocabulary.for_round(info.step) if self.vocabulary else {}
        dense, blocks = sum_uploads(updates, self.spec, vocab)
        z = 0.0 if self.distributed else self.plan.update_noise_multiplier
        clips = dict(info.clips)
        # per tensor: the scaled update (each tensor / its clip) has norm <= sqrt(K), so the
        # noise is z sqrt(K) there, z sqrt(K) C_k on tensor k in its own units
        scale = self.plan.clip_groups ** 0.5 if clips else 1.0
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 63)))
        denom = self.plan.denominator

        def release(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            std = z * scale * (clips[name] if clips else info.clip)
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float64) * std if std > 0 else 0.0
            return ((t + noise) / denom).to(dtype)

        out_dense = {k: release(k, v, self.spec.dense[k][1]) for k, v in dense.items()}
        out_sparse = {t: SparseRows(vocab[t], release(t, b, self.spec.tables[t][2])) for t, b in blocks.items()}
        mean_clip = float(np.mean(list(clips.values()))) if clips else info.clip
        stats = {"noise_std": z * scale * mean_clip / denom, "arrived_dp": float(len(updates))}
        if self.distributed:  # the phones' shares: z sqrt(arrived / cohort) of C on the sum
            stats["realized_noise_multiplier"] = self.plan.noise_multiplier * math.sqrt(len(updates) / self.plan.cohort)
        if self.plan.adaptive_clip and clips:
            for k, c in sorted(clips.items()):
                nxt = _next_clip(self.plan, c, updates, f"{BELOW_CLIP}/{k}", rng, self.target_quantile, self.clip_lr)
                stats[f"next_clip/{k}"] = nxt["next_clip"]
        elif self.plan.adaptive_clip:
            stats |= _next_clip(self.plan, info.clip, updates, BELOW_CLIP, rng, self.target_quantile, self.clip_lr)
        return Aggregate(dense=out_dense, sparse=out_sparse, stats=stats)


def tree_nodes(t: int) -> list[tuple[int, int]]:
    """The (level, index) nodes of a binary tree whose sum is the prefix [1, t]: one per set
    bit of t (level = bit position, index = the prefix's blocks of that size so far)."""
    nodes, covered = [], 0
    for level in reversed(range(max(t, 1).bit_length())):
        if t >> level & 1:
            nodes.append((level, (covered >> level)))
            covered += 1 << level
    return nodes


@dataclasses.dataclass(frozen=True)
class TreeSum:
    """DP-FTRL's server (see module doc)."""

    plan: PrivacyPlan
    spec: WireSpec
    vocabulary: Vocabulary | None
    seed: int

    def _node_noise(self, pass_no: int, node: tuple[int, int], std: float) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, pass_no, *node, 0x7EE]).integers(2 ** 63)))
        shapes = {**{k: s for k, (s, _) in self.spec.dense.items()},
                  **{t: (n, d) for t, (n, d, _) in self.spec.tables.items()}}
        return {k: torch.randn(s, generator=gen, dtype=torch.float64) * std for k, s in sorted(shapes.items())}

    def prefix_noise(self, pass_no: int, t: int, std: float) -> dict[str, torch.Tensor]:
        """The noise of the prefix [1, t] of pass ``pass_no`` (zero for t = 0)."""
        total: dict[str, torch.Tensor] = {}
        for node in tree_nodes(t) if t > 0 else []:
            for k, v in self._node_noise(pass_no, node, std).items():
                total[k] = total[k] + v if k in total else v
        return total

    def __call__(self, updates: Sequence[Update], weights: np.ndarray, rng: np.random.Generator,
                 info: RoundInfo) -> Aggregate:
        vocab = self.vocabulary.for_round(info.step) if self.vocabulary else {}
        dense, blocks = sum_uploads(updates, self.spec, vocab)
        pass_no, t = divmod(info.step - 1, self.plan.rounds_per_pass)
        std = self.plan.noise_multiplier * info.clip
        now, before = self.prefix_noise(pass_no, t + 1, std), self.prefix_noise(pass_no, t, std)
        denom = self.plan.denominator

        def noise(k: str, like: torch.Tensor) -> torch.Tensor:
            return now.get(k, torch.zeros_like(like)) - before.get(k, torch.zeros_like(like))

        out_dense = {k: ((v + noise(k, v)) / denom).to(self.spec.dense[k][1]) for k, v in dense.items()}
        out_sparse = {}
        for table, (n, d, dtype) in self.spec.tables.items():
            full = noise(table, torch.zeros(n, d, dtype=torch.float64))
            if table in blocks:
                full[vocab[table]] += blocks[table]
            out_sparse[table] = SparseRows(torch.arange(n), (full / denom).to(dtype))
        return Aggregate(dense=out_dense, sparse=out_sparse,
                         stats={"noise_std": std / denom, "arrived_dp": float(len(updates))})


def build_wrapper(plan: PrivacyPlan, spec: WireSpec, vocabulary: Vocabulary | None, *, seed: int,
                  distributed: bool, target_quantile: float, clip_lr: float) -> Aggregator:
    """The DP aggregator of ``plan.mechanism``. It replaces the inner aggregator: a DP sum
    weighs every phone one and divides by the fixed denominator."""
    if plan.mechanism == "dp_ftrl":
        if distributed:
            raise ValueError("privacy.noise = 'distributed' is built for dp_fedavg; DP-FTRL adds tree noise "
                             "on the server")
        return TreeSum(plan=plan, spec=spec, vocabulary=vocabulary, seed=seed)
    return GaussianSum(plan=plan, spec=spec, vocabulary=vocabulary, distributed=distributed,
                       target_quantile=target_quantile, clip_lr=clip_lr)
