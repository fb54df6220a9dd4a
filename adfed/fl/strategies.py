"""Server optimizers: one registry, chosen by name (``fl.strategy``).

Server optimizers turn the aggregated dense delta (:mod:`adfed.fl.aggregators`) into new
global parameters (Reddi et al., "Adaptive Federated Optimization",
ICLR 2021: FedAdam, FedYogi, FedAdagrad; FedAvg = server SGD on the mean delta).

FedProx (Li et al., MLSys 2020) is FedAvg on the server plus a proximal term in the
client objective (``ClientSettings.prox_mu``); it is registered here so that one name
selects both halves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch

Tensors = dict[str, torch.Tensor]


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
