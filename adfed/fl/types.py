"""Values that flow through a federated round.

An :class:`Update` is what one client sends back: per-group payloads, never the
``local`` group. Dense payloads are *deltas* (client params − global params), sparse
payloads are the touched row ids and their row deltas.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


def flat_span(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One 1-D view of ``tensors`` when they lie back to back in one storage, in this
    order, contiguous and of one dtype (a decoded payload's tensors of one dtype do, in
    the wire's name order); None otherwise. Lets a loop over many small tensors make
    one call instead."""
    if not tensors:
        return None
    first = tensors[0]
    if not first.is_contiguous():
        return None
    end, total = first.data_ptr() + first.numel() * first.element_size(), first.numel()
    for t in tensors[1:]:
        if t.dtype != first.dtype or not t.is_contiguous() or t.data_ptr() != end:
            return None
        end += t.numel() * t.element_size()
        total += t.numel()
    if tensors[-1].untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
        return None  # adjacent by chance, in two allocations
    return first.as_strided((total,), (1,))


@dataclasses.dataclass(frozen=True)
class SparseRows:
    """Rows of one sparse table: ``ids`` int64 [R] (sorted, unique), ``values`` [R, D]."""

    ids: torch.Tensor
    values: torch.Tensor


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    """Server-pushed settings for one round's local training.

    ``optimizer`` is ``"sgd"`` or ``"adam"`` (Adam on the dense parameters, lazy Adam —
    ``RowSparseAdam`` — on the sparse rows, both starting from fresh state every round: phones keep no
    optimizer state between rounds).
    """

    epochs: int
    batch_size: int
    lr: float
    sparse_lr: float
    prox_mu: float = 0.0
    optimizer: str = "sgd"
    embedding_l2: float = 0.0  # train.embedding_l2: the same objective as centralized
    table_lr: float | None = None  # SGD lr of the dense_shared embedding tables; None: lr
    user_lr: float | None = None  # lr of the phone's own (LOCAL) rows; None: sparse_lr
    clip: float = 0.0  # L2 clip norm of the whole shared update (privacy); 0: no clipping
    #: per-tensor clip norms (privacy.clip_mode = "per_tensor"): (name, clip) pairs; () : flat
    clips: tuple[tuple[str, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Update:
    """One client's upload for one round.

    Attributes
    ----------
    client_id : the user id of the phone.
    dense : ``dense_shared`` deltas by parameter name.
    sparse : ``sparse_shared`` row deltas by table parameter name.
    num_examples : self-reported training examples (the server caps its weight).
    base_version : model version the client trained from (async staleness).
    metrics : local training metrics (loss, ...).
    """

    client_id: int
    dense: dict[str, torch.Tensor]
    sparse: dict[str, SparseRows]
    num_examples: int
    base_version: int
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class GlobalState:
    """The server's model: dense_shared tensors, sparse tables (full), version."""

    dense: dict[str, torch.Tensor]
    sparse: dict[str, torch.Tensor]
    version: int = 0
