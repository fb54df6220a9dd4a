"""Vectorised counter-based random numbers.

Every random number of the synthetic world is a pure function of
``(seed, user_id, stream, counter)``: a 64-bit key is derived per (seed, user, stream)
with two rounds of a strong 64-bit mixer, and each draw hashes ``key XOR mix(counter)``
once more. No state is carried from one user to the next, so any subset of a population
of any size can be materialised alone, in any order, on any number of processes, and
gives the same values.

The mixer is the SplitMix64 finaliser (Steele, Lea and Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014; constants from Stafford's "Mix13"), the
output function of SplitMix64, which passes BigCrush. Numpy's ``uint64`` arithmetic
wraps modulo 2**64, which is what the mixer needs.

Shapes: ``keys`` and ``counters`` broadcast against each other; every sampler returns
an array of the broadcast shape. Typical uses are ``keys[:, None]`` against
``np.arange(m)[None, :]`` (m draws per user) and per-row keys against per-row counters
(one draw per impression).
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_C_USER = np.uint64(0xD1B54A32D192ED03)
_C_STREAM = np.uint64(0xAEF17502108EF2D9)
_TWO_M53 = 2.0**-53
_TWO_M32 = 2.0**-32
_MASK32 = np.uint64(0xFFFFFFFF)
_MASK64 = 0xFFFFFFFFFFFFFFFF


def mix64_inplace(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser applied in place to a ``uint64`` array (returned)."""
    tmp = np.right_shift(x, np.uint64(30))
    x ^= tmp
    x *= _M1
    np.right_shift(x, np.uint64(27), out=tmp)
    x ^= tmp
    x *= _M2
    np.right_shift(x, np.uint64(31), out=tmp)
    x ^= tmp
    return x


def seed_key(seed: int) -> np.uint64:
    """A 64-bit key for a world seed (any Python int >= 0)."""
    if seed < 0:
        raise ValueError(f"seed must be an int >= 0; got {seed}")
    x = np.array([(seed + int(_GAMMA)) & _MASK64], dtype=np.uint64)
    return np.uint64(mix64_inplace(mix64_inplace(x))[0])


def keys(seed: int, ids: np.ndarray, stream: int) -> np.ndarray:
    """Per-entity keys for one stream.

    Parameters
    ----------
    seed : the world seed.
    ids : int array [n] of entity ids (user ids, request ids, ...), any values >= 0.
    stream : small int naming the purpose of the draws (see the ``S_*`` constants of
        the modules that use them); different streams give independent numbers.

    Returns
    -------
    uint64 array [n].
    """
    x = np.array(ids, dtype=np.uint64, ndmin=1)  # a fresh array: mixed in place below
    x *= _C_USER
    x ^= seed_key(seed)
    mix64_inplace(x)
    x += np.uint64((stream * int(_C_STREAM) + int(_GAMMA)) & _MASK64)
    return mix64_inplace(x)


_COUNTER_TABLE_SIZE = 1 << 16


def _mix_counters(c: np.ndarray) -> np.ndarray:
    """``mix64(c * GAMMA + C)`` of uint64 counters (a fresh array)."""
    c = np.array(c, dtype=np.uint64, ndmin=1)  # a fresh array: mixed in place
    c *= _GAMMA
    c += _C_STREAM
    return mix64_inplace(c)


def _mixed_counters(counters: np.ndarray | int) -> np.ndarray:
    c = np.asarray(counters)
    if c.size > 4096 and c.dtype.kind in "iu" and 0 <= c.min() and c.max() < _COUNTER_TABLE_SIZE:
        # Long arrays of small counters (per-impression draws): one gather from a
        # precomputed table instead of a mix per element.
        return _COUNTER_TABLE[c]
    return _mix_counters(c)


_COUNTER_TABLE = _mix_counters(np.arange(_COUNTER_TABLE_SIZE))


def bits(keys: np.ndarray, counters: np.ndarray | int) -> np.ndarray:
    """64 random bits per (key, counter) pair, ``uint64`` of the broadcast shape.

    ``mix64(key XOR mix64(counter * GAMMA + C))``: the counter is mixed before it
    meets the key, so the sequences of two keys never line up (as plain Weyl sequences
    ``key + counter * GAMMA`` would, for keys that differ by a multiple of GAMMA).
    """
    out = np.bitwise_xor(np.asarray(keys, dtype=np.uint64), _mixed_counters(counters))
    return mix64_inplace(np.array(out, ndmin=1, copy=None))


def to_uniform(b: np.ndarray) -> np.ndarray:
    """Map ``uint64`` bits to float64 uniforms on [0, 1) with 53 bits of precision."""
    return np.right_shift(b, np.uint64(11)).astype(np.float64) * _TWO_M53


def uniform(keys: np.ndarray, counters: np.ndarray | int) -> np.ndarray:
    """Uniform float64 on [0, 1)."""
    return to_uniform(bits(keys, counters))


def uniform_pair(keys: np.ndarray, counters: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Two independent float64 uniforms on [0, 1) with 32 bits each, from one hash."""
    b = bits(keys, counters)
    lo = np.bitwise_and(b, _MASK32).astype(np.float64) * _TWO_M32
    hi = np.right_shift(b, np.uint64(32)).astype(np.float64) * _TWO_M32
    return lo, hi


def uniforms32(keys: np.ndarray, m: int) -> np.ndarray:
    """``m`` float64 uniforms on [0, 1) with 32 bits each per key: [n, m] from [n] keys.

    Uses counters ``0 .. ceil(m / 2) - 1`` (two uniforms per hash); enough precision for
    Bernoulli and categorical draws with probabilities above ~1e-8.
    """
    half = (m + 1) // 2
    lo, hi = uniform_pair(np.asarray(keys)[:, None], np.arange(half)[None, :])
    return np.concatenate([lo, hi], axis=1)[:, :m]


def uniforms_small(keys: np.ndarray, m: int, bits_each: int = 21) -> np.ndarray:
    """``m`` float32 uniforms on [0, 1) with ``bits_each`` bits each per key: [n, m].

    ``64 // bits_each`` uniforms per hash (three of 21 bits by default): for Bernoulli
    draws with probabilities above ~1e-5, at a third of the hashing.
    """
    per = 64 // bits_each
    b = bits(np.asarray(keys)[:, None], np.arange(-(-m // per))[None, :])
    mask = np.uint64((1 << bits_each) - 1)
    parts = [np.bitwise_and(np.right_shift(b, np.uint64(i * bits_each)), mask)
             for i in range(per)]
    out = np.concatenate(parts, axis=1)[:, :m].astype(np.float32)
    out *= np.float32(2.0**-bits_each)
    return out


def normal(keys: np.ndarray, counters: np.ndarray | int) -> np.ndarray:
    """Standard normal float64 by Box-Muller on two 32-bit uniforms of one hash.

    The 32-bit radius uniform bounds the tail at about 6.7 standard deviations.
    """
    u1, u2 = uniform_pair(keys, counters)
    u1 = 1.0 - u1  # (0, 1]: log is finite
    r = np.sqrt(-2.0 * np.log(u1))
    return r * np.cos((2.0 * np.pi) * u2)


def bernoulli(keys: np.ndarray, counters: np.ndarray | int, p: np.ndarray | float) -> np.ndarray:
    """Bool array, True with probability ``p`` (broadcast against the draws)."""
    return uniform(keys, counters) < p


def lognormal(
    keys: np.ndarray, counters: np.ndarray | int, mean: np.ndarray | float, sigma: float
) -> np.ndarray:
    """``exp(mean + sigma * N(0, 1))``: heavy-tailed positive values."""
    return np.exp(mean + sigma * normal(keys, counters))


def make_cdf(probs: np.ndarray) -> np.ndarray:
    """Row-wise cumulative distribution with the last column exactly 1.0.

    ``probs`` is [V] or [R, V], non-negative, rows need not be normalised.
    """
    p = np.asarray(probs, dtype=np.float64)
    if np.any(p < 0) or np.any(p.sum(axis=-1) <= 0):
        raise ValueError("probabilities must be >= 0 with a positive total per row")
    cdf = np.cumsum(p, axis=-1)
    cdf /= cdf[..., -1:]
    cdf[..., -1] = 1.0
    return cdf


class GuideTable:
    """Inverse-CDF lookup in a large non-decreasing array in O(1) expected time.

    The guide-table method (Chen and Asau 1974; Devroye, *Non-Uniform Random Variate
    Generation*, section III.2.4): ``cdf`` is non-decreasing with ``cdf[-1] == total``;
    :meth:`search` returns, for each ``q`` in ``[0, total)``, the first index ``i`` with
    ``cdf[i] > q`` (what ``np.searchsorted(cdf, q, side="right")`` returns), by starting
    at a precomputed guide for ``q``'s bucket and stepping forward. With two buckets per
    entry a search takes about one step, whatever the size of ``cdf``.
    """

    def __init__(self, cdf: np.ndarray) -> None:
        self.cdf = np.ascontiguousarray(cdf, dtype=np.float64)
        if self.cdf.ndim != 1 or len(self.cdf) == 0:
            raise ValueError(f"GuideTable wants a non-empty 1-D array; got {self.cdf.shape}")
        self.total = float(self.cdf[-1])
        self.buckets = 2 * len(self.cdf)
        self.scale = self.buckets / self.total
        self.edges = np.arange(self.buckets, dtype=np.float64) / self.scale
        self.guide = np.searchsorted(self.cdf, self.edges, side="right")

    def search(self, q: np.ndarray) -> np.ndarray:
        """First index with ``cdf > q``, int64 of ``q``'s shape, clipped to ``len - 1``."""
        q = np.asarray(q, dtype=np.float64)
        flat_q = q.ravel()
        b = np.minimum((flat_q * self.scale).astype(np.int64), self.buckets - 1)
        b -= self.edges[b] > flat_q  # rounding: make sure edges[b] <= q
        idx = self.guide[b]
        last = len(self.cdf) - 1
        np.minimum(idx, last, out=idx)
        active = np.flatnonzero(self.cdf[idx] <= flat_q)
        active = active[idx[active] < last]
        while active.size:
            idx[active] += 1
            a_idx = idx[active]
            active = active[(self.cdf[a_idx] <= flat_q[active]) & (a_idx < last)]
        return idx.reshape(q.shape)


class Categorical:
    """Inverse-CDF draws from one distribution (``cdf`` [V] from :func:`make_cdf`)."""

    def __init__(self, cdf: np.ndarray) -> None:
        self._table = GuideTable(cdf)
        self.num_values = len(self._table.cdf)

    def sample(self, u: np.ndarray) -> np.ndarray:
        """Indices int64 in ``[0, V)`` for uniforms ``u`` on [0, 1) (any shape)."""
        return self._table.search(u)


class RowCategorical:
    """Inverse-CDF draws where each draw picks its own distribution (row) of a table.

    The rows of ``cdf`` [R, V] are offset by their row index and flattened into one
    non-decreasing array, so one guide-table search serves draws from all rows at once.
    """

    def __init__(self, cdf: np.ndarray) -> None:
        cdf = np.asarray(cdf, dtype=np.float64)
        if cdf.ndim != 2:
            raise ValueError(f"RowCategorical wants a [R, V] cdf; got shape {cdf.shape}")
        self.num_rows, self.num_values = cdf.shape
        flat = (cdf + np.arange(self.num_rows, dtype=np.float64)[:, None]).ravel()
        self._table = GuideTable(flat)

    def sample(self, u: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Indices in ``[0, V)`` drawn from ``cdf[rows]`` with uniforms ``u``."""
        rows = np.asarray(rows, dtype=np.int64)
        idx = self._table.search(rows + u) - rows * self.num_values
        return np.clip(idx, 0, self.num_values - 1)


class LookupTable:
    """Inverse-CDF draws from small distributions with ``bits``-bit uniforms, by lookup.

    ``table[r, k]`` is the inverse CDF of row ``r`` at ``u = k / 2**bits``, so a draw
    from row ``r`` with the random integer ``k`` is one gather, and equals the
    searchsorted draw with the uniform ``k / 2**bits``: probabilities are resolved to
    ``2**-bits`` (2.4e-4 with the default 12 bits), ample for contexts and fields with
    a few dozen values.
    """

    def __init__(self, cdf: np.ndarray, bits: int = 12) -> None:
        cdf = np.atleast_2d(np.asarray(cdf, dtype=np.float64))
        self.bits = bits
        self.num_rows, self.num_values = cdf.shape
        if self.num_values >= 1 << 15:
            raise ValueError(f"LookupTable holds at most 32767 values; got {self.num_values}")
        u = np.arange(1 << bits, dtype=np.float64) * 2.0**-bits
        table = np.stack([np.searchsorted(row, u, side="right") for row in cdf])
        self.table = np.minimum(table, self.num_values - 1).astype(np.int16).ravel()

    def sample(self, k: np.ndarray, rows: np.ndarray | int = 0) -> np.ndarray:
        """Values int64 for random integers ``k`` in ``[0, 2**bits)`` and row indices."""
        idx = np.asarray(k, dtype=np.int64) + (np.asarray(rows, dtype=np.int64) << self.bits)
        return self.table[idx].astype(np.int64)


def categorical(u: np.ndarray, cdf: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws from a small distribution ``cdf`` [V]: int64 in ``[0, V)``.

    Use :class:`Categorical` for large or often-used distributions.
    """
    idx = np.searchsorted(cdf, u, side="right")
    return np.minimum(idx, len(cdf) - 1)
