"""Columnar training examples and torch batches.

:class:`Examples` holds impressions already joined with their user's and ad's fields, as
numpy arrays; :class:`Batch` is the same as torch tensors, ready for the model.

Shapes (n = number of impressions, nnz = total list length of a bag field)::

    ids[name]    int32  [n]          CATEGORICAL fields (and user_id, ad_id)
    dense[name]  float32[n]          DENSE fields
    bags[name]   (values int32 [nnz], offsets int64 [n + 1])   MULTI_HOT / SEQUENCE
    labels[name] click int8 [n], conversion int8 [n], label_observed bool [n],
                 timestamp int64 [n]

Ids and bag values are int32 (:func:`id_dtype`; int64 for a vocabulary of 2**31 ids or
more): less memory for a pooled dataset (the 80k-user world: 1.18 -> 0.88 GB resident
after ``Dataset.load``). ``Batch`` holds int64 tensors, as the model's kernels expect;
the widening copies only the batch.

Bag offsets carry a trailing total (``offsets[-1] == nnz``); ``Batch`` drops it, as
``nn.EmbeddingBag`` wants ``offsets`` of length n.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import torch

Bag = tuple[np.ndarray, np.ndarray]


def id_dtype(vocab_size: int) -> type[np.signedinteger]:
    """The integer type that stores the ids ``0 .. vocab_size - 1`` of one field."""
    return np.int32 if vocab_size <= np.iinfo(np.int32).max else np.int64


def gather_bags(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> Bag:
    """Select ``rows`` of a ragged array (values, offsets with trailing total).

    Vectorised: no Python loop over rows.
    """
    rows = np.asarray(rows, dtype=np.int64)
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    total = int(new_offsets[-1])
    if total == 0:
        return np.zeros(0, dtype=values.dtype), new_offsets
    # output element j of row i reads values[starts[i] + j - new_offsets[i]]: one repeat of
    # the per-row shift and one arange (20-25 % faster than repeating the row index and
    # gathering starts and offsets through it)
    src = np.repeat(starts - new_offsets[:-1], lengths)
    src += np.arange(total, dtype=np.int64)
    return values[src], new_offsets


@dataclasses.dataclass(frozen=True)
class Examples:
    """A set of impressions with all their input fields (see module docstring)."""

    ids: dict[str, np.ndarray]
    dense: dict[str, np.ndarray]
    bags: dict[str, Bag]
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        for group in (self.labels, self.ids, self.dense):
            for arr in group.values():
                return len(arr)
        for _, offsets in self.bags.values():
            return len(offsets) - 1
        return 0

    def take(self, rows: np.ndarray) -> Examples:
        """The examples at ``rows`` (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        return Examples(
            ids={k: v[rows] for k, v in self.ids.items()},
            dense={k: v[rows] for k, v in self.dense.items()},
            bags={k: gather_bags(v, o, rows) for k, (v, o) in self.bags.items()},
            labels={k: v[rows] for k, v in self.labels.items()},
        )

    def slice(self, start: int, stop: int) -> Examples:
        """Rows ``start:stop`` as views (no copy; bag offsets rebased to 0)."""
        bags = {}
        for k, (v, o) in self.bags.items():
            offsets = o[start : stop + 1]
            bags[k] = (v[offsets[0] : offsets[-1]], offsets - offsets[0])
        return Examples(
            ids={k: v[start:stop] for k, v in self.ids.items()},
            dense={k: v[start:stop] for k, v in self.dense.items()},
            bags=bags,
            labels={k: v[start:stop] for k, v in self.labels.items()},
        )

    @staticmethod
    def concat(parts: Sequence[Examples]) -> Examples:
        """Stack several Examples (same fields) row-wise."""
        if not parts:
            raise ValueError("Examples.concat needs at least one part")
        first = parts[0]
        bags: dict[str, Bag] = {}
        for name in first.bags:
            vals = [p.bags[name][0] for p in parts]
            offs = [p.bags[name][1] for p in parts]
            shift = np.cumsum([0] + [int(o[-1]) for o in offs[:-1]])
            offsets = np.concatenate([offs[0][:1]] + [o[1:] + s for o, s in zip(offs, shift, strict=True)])
            bags[name] = (np.concatenate(vals), offsets)
        return Examples(
            ids={k: np.concatenate([p.ids[k] for p in parts]) for k in first.ids},
            dense={k: np.concatenate([p.dense[k] for p in parts]) for k in first.dense},
            bags=bags,
            labels={k: np.concatenate([p.labels[k] for p in parts]) for k in first.labels},
        )

    def to_batch(self) -> Batch:
        """Convert to torch tensors (zero-copy where numpy allows)."""
        return Batch(
            ids={k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in self.ids.items()},
            dense={k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in self.dense.items()},
            bags={
                k: (
                    torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)),
                    torch.from_numpy(np.ascontiguousarray(o[:-1], dtype=np.int64)),
                )
                for k, (v, o) in self.bags.items()
            },
            click=torch.from_numpy(self.labels["click"].astype(np.float32)),
            conversion=torch.from_numpy(self.labels["conversion"].astype(np.float32)),
            label_observed=torch.from_numpy(self.labels["label_observed"].astype(bool)),
        )

    def batches(self, batch_size: int, rng: np.random.Generator | None) -> Iterator[Batch]:
        """Yield batches; shuffled with ``rng`` when given, in order otherwise.

        Rows that fit in one batch come as they are, unshuffled and uncopied (with
        ``rng`` untouched): one batch holds the same rows in any order, and its loss is a
        mean over them.
        """
        n = len(self)
        if n <= batch_size:
            if n:
                yield self.to_batch()
            return
        order = rng.permutation(n) if rng is not None else np.arange(n)
        for i in range(0, n, batch_size):
            yield self.take(order[i : i + batch_size]).to_batch()


@dataclasses.dataclass(frozen=True)
class Batch:
    """Torch view of :class:`Examples`; bag offsets have length B (no trailing total)."""

    ids: dict[str, torch.Tensor]
    dense: dict[str, torch.Tensor]
    bags: dict[str, tuple[torch.Tensor, torch.Tensor]]
    click: torch.Tensor  # float32 [B]
    conversion: torch.Tensor  # float32 [B]; 0 where not clicked
    label_observed: torch.Tensor  # bool [B]; False: the conversion label is unknown

    #: bag field -> its bags' lengths, filled by :meth:`bag_lengths` (a batch's model
    #: reads each bag field's lengths up to three times per step).
    _lengths: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, init=False, repr=False,
                                                          compare=False)

    def __len__(self) -> int:
        return int(self.click.shape[0])

    def bag_lengths(self, name: str) -> torch.Tensor:
        """Number of ids in each bag of field ``name``, int64 [B], computed once per batch.

        Raises
        ------
        KeyError : the batch has no bag field ``name``.
        """
        lengths = self._lengths.get(name)
        if lengths is None:
            lengths = self._lengths[name] = bag_lengths(*self.bags[name])
        return lengths


def bag_lengths(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Number of ids in each bag, int64 [B], from ``offsets`` (no trailing total)."""
    return torch.diff(offsets, append=offsets.new_tensor([values.shape[0]]))
