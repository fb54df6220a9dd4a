"""Values that flow through a federated round.

An :class:`Update` is what one client sends back: per-group payloads, never the
``local`` group. Dense payloads are *deltas* (client params − global params), sparse
payloads are the touched row ids and their row deltas.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
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


#: Where each parameter of a :class:`FlatDense` lies: name -> (shape, C strides, start in
#: the flat tensor, in elements), in the parameters' order.
FlatIndex = dict[str, tuple[tuple[int, ...], tuple[int, ...], int]]


def c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """C-order strides (in elements) of ``shape``."""
    steps, step = [], 1
    for d in reversed(shape):
        steps.append(step)
        step *= d
    return tuple(reversed(steps))


def flat_index(shapes: Sequence[tuple[str, tuple[int, ...]]]) -> FlatIndex:
    """The :data:`FlatIndex` of parameters ``(name, shape)`` laid back to back in this order."""
    out: FlatIndex = {}
    start = 0
    for name, shape in shapes:
        out[name] = (tuple(shape), c_strides(tuple(shape)), start)
        start += math.prod(shape)
    return out


class FlatDense(Mapping[str, torch.Tensor]):
    """``dense_shared`` tensors by name that are all views of one 1-D tensor ``flat``: the
    parameters back to back in C order, in the order of ``index`` (shared by every update
    of one layout). What the wire decodes and the batched phones produce: a view is made
    when a name is looked up, and code that wants every value at once (the encoder, the
    mean, byte counts) reads ``flat``, one tensor instead of ~20 (each tensor object costs
    microseconds, a round has a thousand updates). Writing into a view writes ``flat``."""

    def __init__(self, flat: torch.Tensor, index: FlatIndex) -> None:
        last = next(reversed(index.values()), None)
        end = last[2] + math.prod(last[0]) if last is not None else 0
        if flat.dim() != 1 or flat.numel() != end or (flat.numel() and flat.stride(0) != 1):
            raise ValueError(f"FlatDense: flat must be a contiguous 1-D tensor of the index's {end} values; "
                             f"got shape {tuple(flat.shape)}")
        self.flat = flat
        self.index = index
        self._base = flat.storage_offset()

    def __getitem__(self, name: str) -> torch.Tensor:
        shape, strides, start = self.index[name]
        if not math.prod(shape):  # as_strided of an empty flat tensor would fail
            return self.flat.new_empty(shape)
        return self.flat.as_strided(shape, strides, self._base + start)

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"FlatDense({len(self.index)} tensors, {self.flat.numel()} {self.flat.dtype} values)"


def dense_nbytes(dense: Mapping[str, torch.Tensor]) -> int:
    """The bytes of the values of ``dense`` (one call for a :class:`FlatDense`)."""
    if isinstance(dense, FlatDense):
        return dense.flat.numel() * dense.flat.element_size()
    return sum(t.numel() * t.element_size() for t in dense.values())


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
    #: weight of the ESMM loss's CTCVR term (0 during fl.ctcvr_warmup_rounds)
    ctcvr_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Update:
    """One client's upload for one round.

    Attributes
    ----------
    client_id : the user id of the phone.
    dense : ``dense_shared`` deltas by parameter name (a dict, or a :class:`FlatDense`).
    sparse : ``sparse_shared`` row deltas by table parameter name.
    num_examples : self-reported training examples (the server caps its weight).
    base_version : model version the client trained from (async staleness).
    metrics : local training metrics (loss, ...).
    """

    client_id: int
    dense: Mapping[str, torch.Tensor]
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


@dataclasses.dataclass(frozen=True)
class Passes:
    """Where sync rounds stand in their passes over the population (``fl.sampling =
    "passes"``): pass ``number`` (its order of the phones comes from the seed and the
    number), the position ``cursor`` in that order, and the phones ``deferred`` because
    they were offline at their turn (int64 ids, offered first in the next round)."""

    number: int = 0
    cursor: int = 0
    deferred: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
