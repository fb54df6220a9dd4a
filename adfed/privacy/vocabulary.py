"""The round vocabulary: which rows of each ``sparse_shared`` table a DP round covers.

With privacy on, a phone's upload for a sparse table is a dense block over the round's
vocabulary (zeros where it touched nothing), never the list of rows it touched, and its
download is that same block. The vocabulary is the popular rows, from one DP count
before round 1 (:func:`dp_row_counts`), plus rows drawn uniformly at random each round
from the rest (:meth:`Vocabulary.for_round`: a pure function of the seed and the round,
so the server and every phone compute the same one). Rows outside it are neither sent
nor updated that round; a phone reads them as zero rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Per table: its rows, the popular rows (sorted, fixed for the run) and how many
    random rows each round adds."""

    rows: dict[str, int]
    popular: dict[str, np.ndarray]
    random: dict[str, int]
    seed: int

    def for_round(self, step: int) -> dict[str, torch.Tensor]:
        """Sorted int64 row ids per table for round ``step``."""
        out = {}
        for i, (table, n) in enumerate(sorted(self.rows.items())):
            popular = self.popular[table]
            k = min(self.random[table], n - len(popular))
            if k > 0:
                rng = np.random.default_rng([self.seed, step, i, 0x70CA])
                rest = np.setdiff1d(np.arange(n, dtype=np.int64), popular, assume_unique=True)
                extra = rng.choice(rest, size=k, replace=False)
                ids = np.union1d(popular, extra)
            else:
                ids = popular
            out[table] = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        return out

    def size(self, table: str) -> int:
        return min(self.rows[table], len(self.popular[table]) + self.random[table])


def plan_vocabulary(rows: Mapping[str, int], counts: Mapping[str, np.ndarray], size: int, random_fraction: float,
                    seed: int) -> Vocabulary:
    """The vocabulary of ``size`` rows per table (0: every row): the ``(1 - random_fraction)``
    share of it goes to the rows with the highest (noised) counts, the rest is drawn
    every round."""
    popular, random = {}, {}
    for table, n in rows.items():
        if size == 0 or size >= n:
            popular[table], random[table] = np.arange(n, dtype=np.int64), 0
            continue
        k_random = int(round(size * random_fraction))
        top = np.argsort(-counts[table], kind="stable")[: size - k_random]
        popular[table], random[table] = np.sort(top).astype(np.int64), k_random
    return Vocabulary(rows=dict(rows), popular=popular, random=random, seed=seed)


def dp_row_counts(touched: Sequence[Mapping[str, torch.Tensor]], rows: Mapping[str, int], *, max_rows: int,
                  noise_multiplier: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A Gaussian-noised count, per table row, of the phones that read it.

    Each phone contributes a 0/1 vector over all tables' rows with at most ``max_rows``
    ones (a random subset when it read more), so one phone changes the counts by at most
    ``sqrt(max_rows)`` in L2; the noise std is ``noise_multiplier * sqrt(max_rows)``
    (a Gaussian mechanism with that multiplier, accounted once by
    :mod:`adfed.privacy.accountant`).
    """
    counts = {t: np.zeros(n, dtype=np.float64) for t, n in rows.items()}
    for phone in touched:
        pairs = [(t, int(i)) for t in sorted(phone) if t in counts for i in phone[t].tolist()]
        if len(pairs) > max_rows:
            pairs = [pairs[j] for j in rng.choice(len(pairs), size=max_rows, replace=False)]
        for t, i in pairs:
            counts[t][i] += 1
    std = noise_multiplier * np.sqrt(max_rows)
    return {t: c + rng.normal(0.0, std, size=len(c)) for t, c in counts.items()}
