"""The client population: lazily backed by the store, plus the phones' own storage.

Only sampled clients are loaded (:meth:`Population.train_data` reads one user's rows);
memory grows with clients per round, not with the population. Each phone's ``local``
group lives in :class:`LocalStore`, a bounded LRU standing in for on-device storage.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Collection

import numpy as np
import torch

from adfed.data.examples import Examples
from adfed.data.store import Dataset, release_arrow_memory
from adfed.fl.devices import DeviceProfiles
from adfed.fl.types import Passes
from adfed.model.pcvr import LabelCounts

#: salt of a pass's order (with seed and pass number)
PASS_SALT = 0x9A55


def _first_each(ids: np.ndarray) -> np.ndarray:
    """``ids`` with each value kept at its first position only."""
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


class Population:
    """All clients of a dataset, with device profiles and a per-user time split."""

    def __init__(self, dataset: Dataset, *, test_fraction: float, seed: int) -> None:
        self.dataset = dataset
        self.test_fraction = test_fraction
        counts = dataset.rows_per_user()
        n_test = np.floor(counts * test_fraction + 0.5).astype(np.int64)
        has_train = counts - n_test > 0
        #: user ids with at least one training row (sorted)
        self.clients = dataset.user_ids[has_train].astype(np.int64)
        self._num_train = np.zeros(dataset.schema.num_users, dtype=np.int64)
        self._num_train[dataset.user_ids] = counts - n_test
        table = dataset.devices()
        if table is not None:
            self.profiles = DeviceProfiles.from_table(table, dataset.schema.num_users)
            del table
            release_arrow_memory()
        else:
            rng = np.random.default_rng([seed, 0xDE71CE])
            self.profiles = DeviceProfiles.simulate(dataset.schema.num_users, rng)
        self._orders: dict[tuple[int, int, int], np.ndarray] = {}  # (seed, pass, salt) -> order

    def __len__(self) -> int:
        return len(self.clients)

    def num_train(self, user_ids: np.ndarray) -> np.ndarray:
        """Training rows per user (known to the server only as a capped weight)."""
        return self._num_train[user_ids]

    def train_data(self, user_id: int) -> Examples:
        """One client's training rows (all but its last ``test_fraction``)."""
        return self.train_data_many(np.array([user_id]))[0]

    def train_data_many(self, user_ids: np.ndarray) -> list[Examples]:
        """:meth:`train_data` of several clients, read and joined in one pass (views into
        :meth:`train_data_joined`)."""
        joined, offsets = self.train_data_joined(user_ids)
        return [joined.slice(int(a), int(b)) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]

    def train_data_joined(self, user_ids: np.ndarray) -> tuple[Examples, np.ndarray]:
        """The training rows of several clients back to back (in the given order) and
        where each client's rows start (int64 [n + 1]).

        A user's rows are sorted by time, so its training rows are its first
        ``num_train`` rows (the split of :func:`adfed.data.store.split_by_time`); only
        those are read and joined (:meth:`Dataset.clients_joined`: each row group of the
        store decoded at most once for the whole call).
        """
        user_ids = np.asarray(user_ids, dtype=np.int64)
        return self.dataset.clients_joined(user_ids, limit=self._num_train[user_ids], with_truth=False,
                                           with_time=False)

    def label_counts(self, user_ids: np.ndarray) -> LabelCounts:
        """Summed label counts of these clients' training rows (their label columns only:
        :meth:`Dataset.labels`)."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        labels = self.dataset.labels(user_ids, with_time=False)
        count = self.dataset.rows_of_users(user_ids)
        # a user's rows are sorted by time: its training rows are its first num_train
        position = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
        train = position < np.repeat(self._num_train[user_ids], count)
        return LabelCounts.of(labels["click"][train], labels["conversion"][train], labels["label_observed"][train])

    def sample(self, k: int, rng: np.random.Generator, *, exclude: np.ndarray | None = None) -> np.ndarray:
        """Uniformly sample up to ``k`` distinct clients that are online now.

        A client is online with its profile's ``online_prob``; draws continue until ``k``
        online clients are found or the population is exhausted.

        Without ``exclude`` (a sync round) every client is visited once in a random
        order. With ``exclude`` (the clients busy now: async mode, which starts one
        client per arrival) candidates are drawn at random and skipped when busy, taken
        or offline at that draw: O(k + len(exclude)) per call instead of O(population)
        (a full pass per arrival cost 4.5 ms at 20k clients, 20 ms at 80k and 231 ms at
        320k; this draw 0.05-0.15 ms). When
        fewer than ``k`` are found within about two draws per client, the rest come
        from a full pass over the remaining clients.
        """
        if exclude is None or not len(exclude):
            return self._sample_pass(self.clients, k, rng)
        n = len(self.clients)
        busy = set(np.asarray(exclude, dtype=np.int64).tolist())
        chosen: list[int] = []
        taken: set[int] = set()
        drawn = 0
        while len(chosen) < k and drawn < 2 * n + 64:
            m = max(16, 2 * (k - len(chosen)))
            cand = self.clients[rng.integers(0, n, size=m)]
            online = rng.random(m) < self.profiles.online_prob[cand]
            drawn += m
            for c in cand[online].tolist():
                if c not in busy and c not in taken:
                    chosen.append(c)
                    taken.add(c)
                    if len(chosen) == k:
                        break
        if len(chosen) < k:  # most clients busy or offline: a full pass over the rest
            rest = np.setdiff1d(self.clients, np.array([*busy, *taken], dtype=np.int64))
            chosen.extend(self._sample_pass(rest, k - len(chosen), rng).tolist())
        return np.array(chosen, dtype=np.int64)

    def pass_order(self, seed: int, number: int, salt: int = PASS_SALT) -> np.ndarray:
        """The clients in the random order of pass ``number`` (from ``seed`` and ``salt``:
        ``fl.sampling = "passes"``, DP-FTRL's passes; remembered, the last two passes)."""
        key = (seed, number, salt)
        order = self._orders.get(key)
        if order is None:
            order = self.clients[np.random.default_rng([seed, number, salt]).permutation(len(self.clients))]
            self._orders = {k: v for k, v in self._orders.items() if k[1] == number - 1} | {key: order}
        return order

    def sample_passes(self, k: int, rng: np.random.Generator, passes: Passes,
                      seed: int) -> tuple[np.ndarray, Passes]:
        """Up to ``k`` online clients, taken in passes over the population, and where the
        passes stand after them (``fl.sampling = "passes"``).

        A pass is a random order of every client (:meth:`pass_order`). A round takes, in
        order, first the clients deferred earlier, then the next ones of the pass; each is
        online at this draw with its profile's ``online_prob``, and one that is not is
        deferred to the next round (a phone checks in when it can). When the order is
        exhausted the next pass begins; clients still deferred stay first in line. So a
        pass offers nearly every client once, while uniform draws (:meth:`sample`) leave
        ~37 % of the clients out of a pass's worth of rounds and offer others twice. The
        scan gives up after two passes' worth of clients (nobody online).
        """
        prob, n = self.profiles.online_prob, len(self.clients)
        d = passes.deferred
        on = rng.random(len(d)) < prob[d]
        first = np.flatnonzero(on)[:k]
        left = np.ones(len(d), dtype=bool)
        left[first] = False
        taken, deferred = [d[first]], [d[left]]
        need, number, cursor, scanned = k - len(first), passes.number, passes.cursor, 0
        while need > 0 and scanned < 2 * n:
            if cursor >= n:
                number, cursor = number + 1, 0
            m = min(n - cursor, 2 * need + 16)  # about twice the draws needed (online_prob ~0.67)
            block = self.pass_order(seed, number)[cursor:cursor + m]
            on = rng.random(m) < prob[block]
            idx = np.flatnonzero(on)[:need]
            end = int(idx[-1]) + 1 if len(idx) == need else m  # the scan stops at the k-th online
            taken.append(block[idx])
            deferred.append(block[:end][~on[:end]])
            need, cursor, scanned = need - len(idx), cursor + end, scanned + end
        # a client deferred in one pass also has its turn in the next: once per round
        chosen = _first_each(np.concatenate(taken))
        later = np.concatenate(deferred)
        later = _first_each(later[~np.isin(later, chosen)])
        return chosen, Passes(number=number, cursor=cursor, deferred=later)

    def _sample_pass(self, pool: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``k`` online clients of ``pool``, each visited once in a random order."""
        order = rng.permutation(len(pool))
        online = rng.random(len(pool)) < self.profiles.online_prob[pool[order]]
        return pool[order[online][:k]]


#: per-phone values up to which :meth:`LocalStore.packed` keeps a key's stack between calls
PACKED_NUMEL = 1024


@dataclasses.dataclass
class LocalStore:
    """The phones' own storage of their ``local`` group, bounded in entries (LRU).

    Evicting a phone's entry models a phone that lost its local state (app data
    cleared): it restarts its local group at zero. ``evicted`` counts such events.
    """

    capacity: int
    entries: collections.OrderedDict[int, dict[str, torch.Tensor]] = dataclasses.field(
        default_factory=collections.OrderedDict)
    evicted: int = 0
    #: :meth:`packed`'s last result and the phones put or evicted since (None: pack all)
    _packed: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False)
    _changed: set[int] = dataclasses.field(default_factory=set, init=False, repr=False, compare=False)
    #: the keys seen with more than PACKED_NUMEL values a phone (stacked afresh when asked for)
    _large: set[str] = dataclasses.field(default_factory=set, init=False, repr=False, compare=False)

    def get(self, user_id: int) -> dict[str, torch.Tensor] | None:
        state = self.entries.get(user_id)
        if state is not None:
            self.entries.move_to_end(user_id)
        return state

    def put_inplace(self, user_id: int, state: dict[str, torch.Tensor]) -> None:
        """Store ``state`` as the phone's entry (its tensors are not written to afterwards)."""
        if self.capacity == 0:
            return
        self.entries[user_id] = state
        self.entries.move_to_end(user_id)
        self._changed.add(user_id)
        while len(self.entries) > self.capacity:
            gone, _ = self.entries.popitem(last=False)
            self._changed.add(gone)
            self.evicted += 1

    def packed(self, keys: Collection[str] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per key of the entries (``keys``, or all): (the ids of the phones holding it,
        sorted; their values stacked in that order). Incremental for the small keys (at
        most :data:`PACKED_NUMEL` values a phone: the phones' own rows): their stacks are
        kept, and only the phones put or evicted since the last call are read again, so a
        checkpoint every round stays cheap when the store holds 100k phones (one read of
        every entry was ~0.5-0.8 s there). Larger per-phone state (an error-feedback
        residual) is stacked afresh when asked for, never held twice."""
        changed = set(self.entries) if self._packed is None else self._changed
        cached = self._small(self._packed or {}, changed)
        self._packed, self._changed = cached, set()
        wanted = set(keys) if keys is not None else set(cached) | self._large
        out = {k: cached[k] for k in sorted(wanted) if k in cached}
        for k in sorted(wanted - set(cached)):
            holders = [u for u in sorted(self.entries) if k in self.entries[u]]
            if holders and self.entries[holders[0]][k].numel() > PACKED_NUMEL:
                out[k] = (torch.tensor(holders, dtype=torch.int64),
                          torch.stack([self.entries[u][k] for u in holders]))
        return out

    def _small(self, base: dict[str, tuple[torch.Tensor, torch.Tensor]],
               changed: set[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The small keys' stacks ``base`` brought up to date with the ``changed`` phones."""
        gone = torch.tensor(sorted(changed), dtype=torch.int64)
        fresh: dict[str, list[int]] = collections.defaultdict(list)
        for u in sorted(changed):
            for k, v in self.entries.get(u, {}).items():
                if v.numel() <= PACKED_NUMEL:
                    fresh[k].append(u)
                else:
                    self._large.add(k)
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for k in sorted(set(base) | set(fresh)):
            ids, values = base.get(k, (torch.zeros(0, dtype=torch.int64), None))
            if len(ids) and len(gone):  # sorted ids: the changed phones by binary search
                at = torch.searchsorted(ids, gone).clamp_(max=len(ids) - 1)
                keep = torch.ones(len(ids), dtype=torch.bool)
                keep[at[ids[at] == gone]] = False
                kept = keep.nonzero().squeeze(1)
                ids, values = ids.index_select(0, kept), values.index_select(0, kept)  # type: ignore[union-attr]
            if fresh.get(k):  # merge two sorted lists: the new ones' places, the rest kept
                new_ids = torch.tensor(fresh[k], dtype=torch.int64)
                new_values = torch.stack([self.entries[u][k] for u in fresh[k]])
                place = torch.searchsorted(ids, new_ids) + torch.arange(len(new_ids))
                old = torch.ones(len(ids) + len(new_ids), dtype=torch.bool)
                old[place] = False
                merged_ids = torch.empty(len(old), dtype=torch.int64).index_copy_(0, place, new_ids)
                merged = new_values.new_empty((len(old), *new_values.shape[1:])).index_copy_(0, place, new_values)
                if len(ids):
                    rest = old.nonzero().squeeze(1)
                    merged_ids.index_copy_(0, rest, ids)
                    merged.index_copy_(0, rest, values)  # type: ignore[arg-type]
                ids, values = merged_ids, merged
            if len(ids):
                out[k] = (ids, values)  # type: ignore[assignment]
        return out
