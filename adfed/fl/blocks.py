"""Sparse tables as vocabulary blocks: what a phone downloads and uploads for a
``sparse_shared`` table when the round names a vocabulary (privacy on).

The server serves the table's vocabulary rows (:func:`serve_block`); the phone trains on
the rows its data reads, taken from the block where the vocabulary has them and zero
where it does not (:func:`phone_rows`); it uploads a dense block over the vocabulary,
its deltas where it touched a vocabulary row and zeros elsewhere (:func:`upload_block`).
Neither direction names the rows the phone read.
"""

from __future__ import annotations

import torch

from adfed.fl.types import SparseRows


def serve_block(table: torch.Tensor, vocab: torch.Tensor) -> SparseRows:
    """The server's download for a table: its vocabulary rows."""
    return SparseRows(vocab, table[vocab])


def phone_rows(block: SparseRows, touched: torch.Tensor) -> SparseRows:
    """What the phone trains on: the rows it reads, from the block where the vocabulary
    has them, zero rows where it does not."""
    pos = torch.searchsorted(block.ids, touched)
    pos_c = pos.clamp(max=max(len(block.ids) - 1, 0))
    inside = (pos < len(block.ids)) & (block.ids[pos_c] == touched) if len(block.ids) else \
        torch.zeros(len(touched), dtype=torch.bool)
    values = torch.zeros(len(touched), block.values.shape[1], dtype=block.values.dtype)
    values[inside] = block.values[pos_c[inside]]
    return SparseRows(touched, values)


def upload_block(delta: SparseRows | None, vocab: torch.Tensor, dim: int) -> SparseRows:
    """The phone's upload for a table: a dense block over ``vocab``, its row deltas where
    it touched a vocabulary row, zeros elsewhere (deltas of other rows are dropped)."""
    values = torch.zeros(len(vocab), dim)
    if delta is not None and len(delta.ids) and len(vocab):
        pos = torch.searchsorted(vocab, delta.ids)
        pos_c = pos.clamp(max=len(vocab) - 1)
        inside = (pos < len(vocab)) & (vocab[pos_c] == delta.ids)
        values[pos_c[inside]] = delta.values[inside].to(values.dtype)
    return SparseRows(vocab, values)
