"""Aggregation and server optimizers: one registry, chosen by name.

Aggregation is pure: weighted means of dense deltas, and per-row means of sparse row
deltas over the clients that touched each row. Server optimizers turn the aggregated
delta into new global parameters (Reddi et al., "Adaptive Federated Optimization",
ICLR 2021: FedAdam, FedYogi, FedAdagrad; FedAvg = server SGD on the mean delta).

FedProx (Li et al., MLSys 2020) is FedAvg on the server plus a proximal term in the
client objective (``ClientSettings.prox_mu``); it is registered here so that one name
selects both halves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from adfed.fl.types import SparseRows, Update

Tensors = dict[str, torch.Tensor]


# -- weights and aggregation (pure) ----------------------------------------------------

def client_weights(updates: Sequence[Update], max_weight: float) -> np.ndarray:
    """Aggregation weights: example counts, capped so no client can claim too much.

    A self-reported count is never trusted blindly: it is clipped to [0, max_weight].
    Returns float64 [len(updates)], all zero when no client has examples.
    """
    counts = np.array([max(0, u.num_examples) for u in updates], dtype=np.float64)
    return np.minimum(counts, max_weight)


def weighted_mean(tensors: Sequence[Tensors], weights: np.ndarray) -> Tensors:
    """Weighted mean of dicts of same-shaped tensors; zero total weight raises."""
    total = float(weights.sum())
    if not tensors:
        raise ValueError("weighted_mean needs at least one update")
    if len(weights) != len(tensors):
        raise ValueError(f"weighted_mean: {len(tensors)} updates but {len(weights)} weights")
    if total <= 0:
        raise ValueError("weighted_mean: total weight is zero (no client had examples)")
    names = list(tensors[0])
    acc = [torch.zeros_like(tensors[0][n], dtype=torch.float64) for n in names]  # float64 sums
    for t, w in zip(tensors, weights, strict=True):
        if w > 0:
            torch._foreach_add_(acc, [t[n] for n in names], alpha=float(w / total))
    return {n: a.to(tensors[0][n].dtype) for n, a in zip(names, acc, strict=True)}


def aggregate_sparse(
    parts: Sequence[SparseRows], weights: np.ndarray, over: str = "touched"
) -> SparseRows:
    """Per-row weighted mean of sparse row deltas.

    ``over="touched"``: a row touched by clients C gets
    sum_{c in C} w_c * delta_c / sum_{c in C} w_c (the mean over the clients that touched
    it). ``over="all"``: the same sum divided by the total weight of every client in the
    round, i.e. a client that did not touch a row counts as a zero delta for it; this is
    exactly dense FedAvg on the whole table, shipped sparsely. Rows nobody touched are
    absent from the result (they stay unchanged on the server).
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


# -- server optimizers -----------------------------------------------------------------

class ServerOptimizer(Protocol):
    """Applies an aggregated dense delta: ``apply(params, delta, state) -> (params, state)``."""

    def init(self, params: Tensors) -> dict[str, Any]: ...

    def apply(
        self, params: Tensors, delta: Tensors, state: dict[str, Any]
    ) -> tuple[Tensors, dict[str, Any]]: ...


@dataclasses.dataclass(frozen=True)
class ServerSGD:
    """FedAvg: ``x <- x + lr * mean_delta`` (lr=1 is plain FedAvg)."""

    lr: float = 1.0

    def init(self, params: Tensors) -> dict[str, Any]:
        return {}

    def apply(self, params: Tensors, delta: Tensors, state: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        return {k: params[k] + self.lr * delta[k] for k in params}, state


@dataclasses.dataclass(frozen=True)
class ServerAdaptive:
    """FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021, Algorithm 2)."""

    kind: str
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def init(self, params: Tensors) -> dict[str, Any]:
        return {
            "m": {k: torch.zeros_like(v) for k, v in params.items()},
            "v": {k: torch.full_like(v, self.tau**2) for k, v in params.items()},
        }

    def apply(self, params: Tensors, delta: Tensors, state: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        new_m, new_v, new_p = {}, {}, {}
        for k, x in params.items():
            d = delta[k]
            m = self.beta1 * state["m"][k] + (1 - self.beta1) * d
            d2 = d * d
            v_prev = state["v"][k]
            if self.kind == "adagrad":
                v = v_prev + d2
            elif self.kind == "yogi":
                v = v_prev - (1 - self.beta2) * d2 * torch.sign(v_prev - d2)
            else:  # adam
                v = self.beta2 * v_prev + (1 - self.beta2) * d2
            new_m[k], new_v[k] = m, v
            new_p[k] = x + self.lr * m / (torch.sqrt(v) + self.tau)
        return new_p, {"m": new_m, "v": new_v}


# -- registry --------------------------------------------------------------------------

#: ``factory(server_lr, tau) -> ServerOptimizer``; ``tau`` is the adaptivity (epsilon)
#: of the adaptive optimizers, ignored by the others.
Factory = Callable[[float, float], ServerOptimizer]
_REGISTRY: dict[str, Factory] = {}
#: Strategies whose clients add a proximal term (the client half of FedProx).
PROXIMAL = {"fedprox"}


def register(name: str, factory: Factory, *, force: bool = False) -> None:
    """Register a server optimizer factory ``factory(server_lr, tau)`` under ``name``."""
    if name in _REGISTRY and not force:
        raise ValueError(f"strategy {name!r} is already registered (pass force=True to replace)")
    _REGISTRY[name] = factory


def create(name: str, server_lr: float, tau: float = 1e-3) -> ServerOptimizer:
    """Build the named server optimizer; unknown names list the known ones."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(_REGISTRY)}") from None
    return factory(server_lr, tau)


def names() -> list[str]:
    return sorted(_REGISTRY)


register("fedavg", lambda lr, tau: ServerSGD(lr=lr))
register("fedprox", lambda lr, tau: ServerSGD(lr=lr))
register("fedadam", lambda lr, tau: ServerAdaptive(kind="adam", lr=lr, tau=tau))
register("fedyogi", lambda lr, tau: ServerAdaptive(kind="yogi", lr=lr, tau=tau))
register("fedadagrad", lambda lr, tau: ServerAdaptive(kind="adagrad", lr=lr, tau=tau))
