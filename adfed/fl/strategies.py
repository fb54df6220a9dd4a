"""Server optimizers: one registry, chosen by name (``fl.strategy``).

Server optimizers turn the aggregate (:mod:`adfed.fl.aggregators`) into new global
parameters (Reddi et al., "Adaptive Federated Optimization", ICLR 2021: FedAdam, FedYogi,
FedAdagrad; FedAvg = server SGD on the mean delta): the dense part with :meth:`apply`, the
rows of each ``sparse_shared`` table with :meth:`apply_rows`. The adaptive optimizers keep
per-row moments for the sparse tables and step only the rows of the aggregate (lazy, like
``torch.optim.SparseAdam``): a row nobody touched keeps its moments. The server learning
rate follows ``fl.server_lr_decay_start`` (:func:`at_scale`, one 1/t rule with the phones').

FedProx (Li et al., MLSys 2020) is FedAvg on the server plus a proximal term in the
client objective (``ClientSettings.prox_mu``); it is registered here so that one name
selects both halves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import torch

from adfed.fl.types import SparseRows

Tensors = dict[str, torch.Tensor]


# -- server optimizers -----------------------------------------------------------------

class ServerOptimizer(Protocol):
    """Applies an aggregate: ``apply(params, delta, state) -> (params, state)`` for the
    dense part, ``apply_rows(name, table, rows, state) -> (table, state)`` for one sparse
    table's aggregated rows. Pure: inputs are never written to. ``lr`` is the server lr."""

    @property
    def lr(self) -> float: ...

    def init(self, params: Tensors) -> dict[str, Any]: ...

    def apply(
        self, params: Tensors, delta: Tensors, state: dict[str, Any]
    ) -> tuple[Tensors, dict[str, Any]]: ...

    def apply_rows(
        self, name: str, table: torch.Tensor, rows: SparseRows, state: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any]]: ...


def at_scale(opt: ServerOptimizer, factor: float) -> ServerOptimizer:
    """``opt`` with its learning rate times ``factor`` (the round's decay); ``opt`` itself
    when ``factor`` is 1."""
    return opt if factor == 1.0 else dataclasses.replace(opt, lr=opt.lr * factor)  # type: ignore[type-var]


@dataclasses.dataclass(frozen=True)
class ServerSGD:
    """FedAvg: ``x <- x + lr * mean_delta`` (lr=1 is plain FedAvg)."""

    lr: float = 1.0

    def init(self, params: Tensors) -> dict[str, Any]:
        return {}

    def apply(self, params: Tensors, delta: Tensors, state: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        return {k: params[k] + self.lr * delta[k] for k in params}, state

    def apply_rows(self, name: str, table: torch.Tensor, rows: SparseRows,
                   state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        new = table.clone()
        values = rows.values.to(new.dtype)
        new.index_add_(0, rows.ids, values if self.lr == 1.0 else self.lr * values)
        return new, state


@dataclasses.dataclass(frozen=True)
class ServerAdaptive:
    """FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021, Algorithm 2), with Adam's bias
    correction when ``bias_correction`` (Reddi et al. leave it out, so their first ~100
    steps are up to 2x (beta2 0.99) or 4.5x (beta2 0.999) ``lr``; correcting did not help
    in one pass on a 20k-user world: docs/results/2026-12-06-federated-quality.md). The
    step count ``t`` is the server's (every aggregate), also for the lazily stepped sparse
    rows, as in ``torch.optim.SparseAdam``."""

    kind: str
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    bias_correction: bool = False
    #: the dense tensors stepped adaptively (``fl.server_adaptive_scope = "towers"``); the
    #: other dense tensors and every sparse row then step as FedAvg (the mean delta added).
    #: None: every tensor and row adaptively
    only: frozenset[str] | None = None

    def _adaptive(self, name: str) -> bool:
        return self.only is None or name in self.only

    def init(self, params: Tensors) -> dict[str, Any]:
        kept = {k: v for k, v in params.items() if self._adaptive(k)}
        return {
            "m": {k: torch.zeros_like(v) for k, v in kept.items()},
            "v": {k: torch.full_like(v, self.tau**2) for k, v in kept.items()},
            "t": 0,
        }

    def _step(self, x: torch.Tensor, d: torch.Tensor, m_prev: torch.Tensor, v_prev: torch.Tensor,
              t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step ``t`` (from 1) of parameters ``x`` on delta ``d``: (new x, new m, new v)."""
        m = self.beta1 * m_prev + (1 - self.beta1) * d
        d2 = d * d
        if self.kind == "adagrad":
            v = v_prev + d2
        elif self.kind == "yogi":
            v = v_prev - (1 - self.beta2) * d2 * torch.sign(v_prev - d2)
        else:  # adam
            v = self.beta2 * v_prev + (1 - self.beta2) * d2
        if not self.bias_correction:
            return x + self.lr * m / (torch.sqrt(v) + self.tau), m, v
        m_hat = m / (1 - self.beta1**t)
        v_hat = v if self.kind == "adagrad" else v / (1 - self.beta2**t)
        return x + self.lr * m_hat / (torch.sqrt(v_hat) + self.tau), m, v

    def apply(self, params: Tensors, delta: Tensors, state: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        new_m, new_v, new_p = {}, {}, {}
        t = int(state.get("t", 0)) + 1
        for k, x in params.items():
            if self._adaptive(k):
                new_p[k], new_m[k], new_v[k] = self._step(x, delta[k], state["m"][k], state["v"][k], t)
            else:
                new_p[k] = x + delta[k]
        return new_p, {**state, "m": new_m, "v": new_v, "t": t}

    def apply_rows(self, name: str, table: torch.Tensor, rows: SparseRows,
                   state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Lazy per-row step: only ``rows.ids`` (sorted, unique) move, with their own
        moments (created at the first aggregate that names the table: m 0, v tau^2); the
        mean delta added when the scope is the towers only."""
        if self.only is not None:
            return ServerSGD(lr=1.0).apply_rows(name, table, rows, state)
        moments = state.get("rows", {}).get(name)
        if moments is None:
            moments = {"m": torch.zeros_like(table), "v": torch.full_like(table, self.tau**2)}
        ids = rows.ids
        t = max(int(state.get("t", 0)), 1)  # apply() counted this aggregate already
        x, m, v = self._step(table[ids], rows.values.to(table.dtype), moments["m"][ids], moments["v"][ids], t)
        new_table, new_m, new_v = table.clone(), moments["m"].clone(), moments["v"].clone()
        new_table[ids], new_m[ids], new_v[ids] = x, m, v
        return new_table, {**state, "rows": {**state.get("rows", {}), name: {"m": new_m, "v": new_v}}}


# -- registry --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ServerParams:
    """What a factory builds a server optimizer from (``fl.server_*``): the lr, and for the
    adaptive optimizers the adaptivity ``tau`` (epsilon), the moments' decays ``betas``,
    Adam's ``bias_correction`` and ``only``, the dense tensors stepped adaptively (None:
    all, sparse rows included). Optimizers ignore what they do not use."""

    lr: float
    tau: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    bias_correction: bool = False
    only: frozenset[str] | None = None


Factory = Callable[[ServerParams], ServerOptimizer]
_REGISTRY: dict[str, Factory] = {}
#: Strategies whose clients add a proximal term (the client half of FedProx).
PROXIMAL = {"fedprox"}


def register(name: str, factory: Factory, *, force: bool = False) -> None:
    """Register a server optimizer factory ``factory(ServerParams) -> ServerOptimizer``
    under ``name``."""
    if name in _REGISTRY and not force:
        raise ValueError(f"strategy {name!r} is already registered (pass force=True to replace)")
    _REGISTRY[name] = factory


def create(name: str, server_lr: float, tau: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
           bias_correction: bool = False, only: frozenset[str] | None = None) -> ServerOptimizer:
    """Build the named server optimizer (:class:`ServerParams` for the arguments); unknown
    names list the known ones."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(_REGISTRY)}") from None
    return factory(ServerParams(server_lr, tau, tuple(betas), bias_correction, only))  # type: ignore[arg-type]


def names() -> list[str]:
    return sorted(_REGISTRY)


def _adaptive(kind: str, p: ServerParams) -> ServerAdaptive:
    return ServerAdaptive(kind, p.lr, p.betas[0], p.betas[1], p.tau, p.bias_correction, p.only)


register("fedavg", lambda p: ServerSGD(lr=p.lr))
register("fedprox", lambda p: ServerSGD(lr=p.lr))
for _kind in ("adam", "yogi", "adagrad"):
    register(f"fed{_kind}", partial(_adaptive, _kind))
