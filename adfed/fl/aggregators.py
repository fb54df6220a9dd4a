"""Server aggregation: one protocol, one registry, chosen by name (``robust.aggregator``).

An :class:`Aggregator` turns the decoded updates of a round (or of an async buffer) into
one :class:`Aggregate`: the dense delta the server optimizer applies and, per sparse
table, the row deltas added to the rows they name. It is given the weights the server
computed (:func:`adfed.fl.server.server_weights`: example caps and staleness, in one
place) and a seeded RNG, and never sees the server state: DP noise, the secure sum and
robust aggregators (median, trimmed mean, Krum) are further entries or wrappers of an
entry (:func:`build`), never edits of the round code.

Entries now:

- ``mean``: the weighted mean of the dense deltas, and per sparse row the weighted mean
  over ``fl.sparse_aggregation``: ``"all"`` clients of the round (a client that did not
  touch a row counts as a zero delta: dense FedAvg shipped sparsely) or the clients that
  ``"touched"`` it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from adfed.config import Config
from adfed.errors import ConfigError
from adfed.fl.types import FlatDense, SparseRows, Update, flat_span
from adfed.fl.wire import WireSpec

Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Aggregate:
    """What a round's updates amount to: ``dense`` deltas by parameter name (every
    ``dense_shared`` name of the updates) and ``sparse`` row deltas by table (only tables
    with at least one row to change). ``stats`` are figures the server keeps or logs
    (e.g. the noised fraction of unclipped phones, the next clip norm)."""

    dense: Tensors
    sparse: dict[str, SparseRows]
    stats: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RoundInfo:
    """What an aggregator may know of the round besides its updates: the server step
    (sync round or async step, from 1) and the clip norm the phones were sent (0: none)."""

    step: int
    clip: float = 0.0
    clips: tuple[tuple[str, float], ...] = ()  # per-tensor clips, when the phones clip per tensor


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What wrappers may need when they are built: the model's shapes (``spec``: dense
    names and shapes, table rows and widths), the phones with training rows, and the
    run's privacy plan and round vocabulary when DP is on (typed loosely: ``adfed.fl``
    does not import ``adfed.privacy``)."""

    spec: WireSpec
    population: int
    plan: Any = None
    vocabulary: Any = None


class Aggregator(Protocol):
    """``aggregator(updates, weights, rng, info) -> Aggregate``.

    ``weights`` float64 [len(updates)] >= 0; ``rng`` is derived from (seed, round), so an
    aggregator that draws (noise, a random subset) is reproducible. Plain aggregators are
    only called with a positive total weight; wrappers that release noise may be called
    with no update at all (a DP round where nobody arrived).
    """

    def __call__(self, updates: Sequence[Update], weights: np.ndarray, rng: np.random.Generator,
                 info: RoundInfo) -> Aggregate: ...


# -- pure aggregation functions --------------------------------------------------------

def weighted_mean(tensors: Sequence[Mapping[str, torch.Tensor]], weights: np.ndarray) -> Tensors:
    """Weighted mean of dicts of same-shaped tensors, summed in float64; zero total
    weight, no tensors or a weight count that differs raise ValueError."""
    total = float(weights.sum())
    if not tensors:
        raise ValueError("weighted_mean needs at least one update")
    if len(weights) != len(tensors):
        raise ValueError(f"weighted_mean: {len(tensors)} updates but {len(weights)} weights")
    if total <= 0:
        raise ValueError("weighted_mean: total weight is zero (no client had examples)")
    first = tensors[0]
    order = list(first)  # the wire's order: a decoded update's tensors lie back to back in it
    shapes = {n: first[n].shape for n in order}
    sizes = [math.prod(shapes[n]) for n in order]
    acc = torch.zeros(sum(sizes), dtype=torch.float64)
    parts = dict(zip(order, acc.split(sizes), strict=True))
    index = first.index if isinstance(first, FlatDense) else None
    dtype = first.flat.dtype if isinstance(first, FlatDense) else None
    for t, w in zip(tensors, weights, strict=True):
        if w > 0:
            alpha = float(w / total)
            if isinstance(t, FlatDense) and t.index is index:  # one add instead of one per tensor
                acc.add_(t.flat, alpha=alpha)
                continue
            span = flat_span([t[n] for n in order])
            if span is not None and span.numel() == acc.numel():
                acc.add_(span, alpha=alpha)
                continue
            for n in order:
                parts[n].add_(t[n].reshape(-1), alpha=alpha)
    dtypes = {n: first[n].dtype for n in order} if dtype is None else dict.fromkeys(order, dtype)
    return {n: parts[n].view(shapes[n]).to(dtypes[n]) for n in order}


def aggregate_sparse(parts: Sequence[SparseRows], weights: np.ndarray, over: str = "touched") -> SparseRows:
    """Per-row weighted mean of sparse row deltas.

    ``over="touched"``: a row touched by clients C gets
    sum_{c in C} w_c * delta_c / sum_{c in C} w_c. ``over="all"``: the same sum divided
    by the total weight of every client of the round. Rows nobody touched are absent
    from the result (they stay unchanged on the server).
    """
    if over not in ("touched", "all"):
        raise ValueError(f"fl.sparse_aggregation must be 'touched' or 'all'; got {over!r}")
    if len(weights) != len(parts):
        raise ValueError(f"aggregate_sparse: {len(parts)} parts but {len(weights)} weights")
    parts_w = [(p, w) for p, w in zip(parts, weights, strict=True) if w > 0 and len(p.ids) > 0]
    if not parts_w:
        dim = parts[0].values.shape[1] if parts else 0
        return SparseRows(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dim))
    ids = torch.cat([p.ids for p, _ in parts_w])
    vals = torch.cat([p.values.to(torch.float64) * float(w) for p, w in parts_w])
    wts = torch.cat([torch.full((len(p.ids),), float(w), dtype=torch.float64) for p, w in parts_w])
    uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    sums = torch.zeros(len(uniq), vals.shape[1], dtype=torch.float64).index_add_(0, inverse, vals)
    if over == "all":
        return SparseRows(uniq, (sums / float(weights[weights > 0].sum())).to(parts_w[0][0].values.dtype))
    wsum = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, wts)
    return SparseRows(uniq, (sums / wsum[:, None]).to(parts_w[0][0].values.dtype))


def sparse_tables_of(updates: Sequence[Update]) -> list[str]:
    """Every sparse table named by any update, sorted."""
    return sorted({t for u in updates for t in u.sparse})


# -- entries ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WeightedMean:
    """The ``mean`` entry (see module doc)."""

    sparse_over: str = "all"

    def __call__(self, updates: Sequence[Update], weights: np.ndarray, rng: np.random.Generator,
                 info: RoundInfo) -> Aggregate:
        dense = weighted_mean([u.dense for u in updates], weights)
        sparse = {}
        for table in sparse_tables_of(updates):
            dim = next(u.sparse[table].values.shape[1] for u in updates if table in u.sparse)
            empty = SparseRows(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dim))
            rows = aggregate_sparse([u.sparse.get(table, empty) for u in updates], weights, self.sparse_over)
            if len(rows.ids):
                sparse[table] = rows
        return Aggregate(dense=dense, sparse=sparse)


# -- registry --------------------------------------------------------------------------

#: ``factory(cfg) -> Aggregator``
Factory = Callable[[Config], Aggregator]
#: ``wrapper(aggregator, cfg, ctx) -> Aggregator``, or None when the config does not ask for it
Wrapper = Callable[[Aggregator, Config, BuildContext], Aggregator | None]
_REGISTRY: dict[str, Factory] = {}
_WRAPPERS: dict[str, Wrapper] = {}


def register(name: str, factory: Factory, *, force: bool = False) -> None:
    """Register an aggregator factory under ``name`` (``robust.aggregator``)."""
    if name in _REGISTRY and not force:
        raise ValueError(f"aggregator {name!r} is already registered (pass force=True to replace)")
    _REGISTRY[name] = factory


def register_wrapper(name: str, wrapper: Wrapper, *, force: bool = False) -> None:
    """Register a wrapper (DP noise, secure sum, ...), applied by :func:`build` in
    registration order when it returns a new aggregator for the config."""
    if name in _WRAPPERS and not force:
        raise ValueError(f"aggregator wrapper {name!r} is already registered (pass force=True to replace)")
    _WRAPPERS[name] = wrapper


def create(name: str, cfg: Config) -> Aggregator:
    """The named aggregator for ``cfg``; an unknown name is a ConfigError listing the known."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"robust.aggregator must be one of {sorted(_REGISTRY)}; got {name!r}") from None
    return factory(cfg)


def build(cfg: Config, ctx: BuildContext) -> Aggregator:
    """The server's aggregator: ``robust.aggregator``, then every wrapper the config asks for."""
    agg = create(cfg.robust.aggregator, cfg)
    for wrapper in _WRAPPERS.values():
        wrapped = wrapper(agg, cfg, ctx)
        if wrapped is not None:
            agg = wrapped
    return agg


def names() -> list[str]:
    return sorted(_REGISTRY)


register("mean", lambda cfg: WeightedMean(sparse_over=cfg.fl.sparse_aggregation))
