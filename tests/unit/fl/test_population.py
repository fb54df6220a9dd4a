"""LocalStore: the phones' bounded LRU storage of their ``local`` group."""

from __future__ import annotations

import torch

from adfed.fl.population import LocalStore


def _state(v: float) -> dict[str, torch.Tensor]:
    return {"emb.user_id.weight": torch.full((1, 2), v)}


def test_put_and_get() -> None:
    store = LocalStore(capacity=3)
    store.put_inplace(7, _state(1.0))
    assert torch.equal(store.get(7)["emb.user_id.weight"], torch.full((1, 2), 1.0))
    assert store.get(8) is None
    assert store.evicted == 0


def test_evicts_least_recently_used() -> None:
    # Prepare
    store = LocalStore(capacity=2)
    store.put_inplace(1, _state(1.0))
    store.put_inplace(2, _state(2.0))

    # Execute
    store.get(1)  # 1 is now the most recent
    store.put_inplace(3, _state(3.0))

    # Assert
    assert store.get(2) is None
    assert store.get(1) is not None and store.get(3) is not None
    assert list(store.entries) == [1, 3]
    assert store.evicted == 1


def test_re_put_refreshes_without_evicting() -> None:
    # Prepare
    store = LocalStore(capacity=2)
    store.put_inplace(1, _state(1.0))
    store.put_inplace(2, _state(2.0))

    # Execute
    store.put_inplace(1, _state(10.0))
    store.put_inplace(3, _state(3.0))

    # Assert
    assert store.evicted == 1
    assert list(store.entries) == [1, 3]
    assert store.get(1)["emb.user_id.weight"][0, 0].item() == 10.0


def test_counts_every_eviction() -> None:
    store = LocalStore(capacity=3)
    for u in range(10):
        store.put_inplace(u, _state(float(u)))
    assert store.evicted == 7
    assert list(store.entries) == [7, 8, 9]


def test_zero_capacity_stores_nothing() -> None:
    store = LocalStore(capacity=0)
    store.put_inplace(1, _state(1.0))
    assert store.get(1) is None
    assert len(store.entries) == 0 and store.evicted == 0


def test_stores_are_independent() -> None:
    a, b = LocalStore(capacity=2), LocalStore(capacity=2)
    a.put_inplace(1, _state(1.0))
    assert b.get(1) is None


def test_train_data_many_is_each_clients_time_split_train_rows(small_world) -> None:
    import numpy as np

    from adfed.data.schema import USER_KEY
    from adfed.data.store import Dataset, split_by_time
    from adfed.fl.population import Population

    ds = Dataset.open(small_world)
    pop = Population(ds, test_fraction=0.25, seed=0)
    users = pop.clients[[5, 0, 3]]
    for u, got in zip(users, pop.train_data_many(users), strict=True):
        full = ds.client(int(u), with_truth=False)
        train_rows, _ = split_by_time(full.ids[USER_KEY], 0.25)
        want = full.take(train_rows)
        assert len(got) == len(want) == pop.num_train(np.array([u]))[0]
        for k, v in want.ids.items():
            assert np.array_equal(got.ids[k], v), k
        for k, (v, o) in want.bags.items():
            assert np.array_equal(got.bags[k][0], v) and np.array_equal(got.bags[k][1], o), k
        assert np.array_equal(got.labels["click"], want.labels["click"])


def test_label_counts_sum_the_clients_training_rows_and_the_prior_sample_is_seeded(small_world) -> None:
    import numpy as np

    from adfed.data.store import Dataset
    from adfed.fl.population import Population
    from adfed.fl.simulation import PRIOR_CLIENTS, prior_sample
    from adfed.model.pcvr import LabelCounts

    pop = Population(Dataset.open(small_world), test_fraction=0.2, seed=0)
    users = pop.clients[:7]
    want = LabelCounts()
    for u in users:
        d = pop.train_data(int(u))
        want = want + LabelCounts.of(d.labels["click"], d.labels["conversion"], d.labels["label_observed"])
    assert pop.label_counts(users) == want
    assert pop.label_counts(users[:0]) == LabelCounts()
    a, b = prior_sample(pop, 0), prior_sample(pop, 0)
    assert np.array_equal(a, b) and len(a) == min(PRIOR_CLIENTS, len(pop))
    assert np.all(np.diff(a) > 0) and np.isin(a, pop.clients).all()


def test_sample_with_exclude_skips_busy_clients_and_is_seeded(small_world) -> None:
    import numpy as np

    from adfed.data.store import Dataset
    from adfed.fl.population import Population

    pop = Population(Dataset.open(small_world), test_fraction=0.2, seed=0)
    pop.profiles.online_prob[:] = 1.0
    busy = pop.clients[::2]
    got = pop.sample(5, np.random.default_rng(3), exclude=busy)
    assert len(got) == 5 and len(set(got.tolist())) == 5
    assert not np.isin(got, busy).any() and np.isin(got, pop.clients).all()
    assert np.array_equal(got, pop.sample(5, np.random.default_rng(3), exclude=busy))
    # every client but three busy: the three free ones, found by the full pass
    free = pop.clients[[1, 4, 6]]
    rest = pop.sample(10, np.random.default_rng(0), exclude=np.setdiff1d(pop.clients, free))
    assert sorted(rest.tolist()) == sorted(free.tolist())
    # nobody online: nobody
    pop.profiles.online_prob[:] = 0.0
    assert len(pop.sample(3, np.random.default_rng(0), exclude=busy)) == 0


def test_sample_with_exclude_is_uniform_over_free_online_clients(small_world) -> None:
    import numpy as np

    from adfed.data.store import Dataset
    from adfed.fl.population import Population

    pop = Population(Dataset.open(small_world), test_fraction=0.2, seed=0)
    pop.profiles.online_prob[:] = 1.0
    pop.profiles.online_prob[pop.clients[0]] = 0.0  # never online
    busy = pop.clients[1:2]
    hits = np.concatenate([pop.sample(1, np.random.default_rng(s), exclude=busy) for s in range(4000)])
    counts = np.bincount(np.searchsorted(pop.clients, hits), minlength=len(pop))
    assert counts[0] == 0 and counts[1] == 0
    expected = 4000 / (len(pop) - 2)
    assert np.all(np.abs(counts[2:] - expected) < 6 * np.sqrt(expected))


def test_train_data_joined_is_each_clients_first_num_train_rows(small_world) -> None:  # noqa: ANN001
    # Prepare
    import numpy as np

    from adfed.data.store import Dataset, num_train_rows
    from adfed.fl.population import Population

    dataset = Dataset.open(small_world)
    population = Population(dataset, test_fraction=0.2, seed=0)
    users = population.clients[np.random.default_rng(3).permutation(len(population.clients))[:40]]

    # Execute
    joined, offsets = population.train_data_joined(users)
    many = population.train_data_many(users)

    # Assert: bit for bit the training slice of each user's full rows, without the
    # bookkeeping timestamp (training never reads it)
    assert "timestamp" not in joined.labels and joined.labels.keys() == {"click", "conversion", "label_observed"}
    for i, u in enumerate(users.tolist()):
        full = dataset.client(u, with_truth=False)
        n = int(num_train_rows(np.array([len(full)]), 0.2)[0])
        want = full.slice(0, n)
        for got in (joined.slice(int(offsets[i]), int(offsets[i + 1])), many[i]):
            assert len(got) == n
            for group in ("ids", "dense", "labels"):
                for k, v in getattr(want, group).items():
                    if k != "timestamp":
                        np.testing.assert_array_equal(getattr(got, group)[k], v, err_msg=f"user {u} {group}[{k}]")
            for k, (values, offs) in want.bags.items():
                np.testing.assert_array_equal(got.bags[k][0], values)
                np.testing.assert_array_equal(got.bags[k][1], offs)


def test_passes_offer_nearly_every_client_once_a_pass_and_uniform_draws_do_not(small_world) -> None:  # noqa: ANN001
    # Prepare
    import numpy as np

    from adfed.data.store import Dataset
    from adfed.fl.population import Population
    from adfed.fl.types import Passes

    pop = Population(Dataset.open(small_world), test_fraction=0.2, seed=0)
    k = 50
    rounds = len(pop) // k - 2  # nearly a pass's worth of rounds

    def run(seed: int) -> tuple[list[np.ndarray], Passes]:
        passes, out = Passes(), []
        for r in range(rounds):
            chosen, passes = pop.sample_passes(k, np.random.default_rng([seed, r]), passes, seed=4)
            out.append(chosen)
        return out, passes

    # Execute
    got, passes = run(1)
    again, _ = run(1)
    uniform = np.concatenate([pop.sample(k, np.random.default_rng([1, r])) for r in range(rounds)])

    # Assert: full rounds of distinct online clients; each client at most once in the pass,
    # every client offered, deferred or still ahead; as many uniform draws miss about 1/e
    offered = np.concatenate(got)
    assert all(len(c) == k and len(set(c.tolist())) == k for c in got)
    assert len(set(offered.tolist())) == len(offered) and np.isin(offered, pop.clients).all()
    assert passes.number == 0 and len(offered) + len(passes.deferred) + (len(pop) - passes.cursor) == len(pop)
    assert len(offered) == rounds * k >= 0.95 * len(pop)
    assert len(np.unique(uniform)) < 0.7 * len(pop)
    assert all(np.array_equal(a, b) for a, b in zip(got, again, strict=True))  # seeded


def test_passes_defer_offline_clients_and_start_the_next_pass(small_world) -> None:  # noqa: ANN001
    # Prepare: client 0 is never online, the others always
    import numpy as np

    from adfed.data.store import Dataset
    from adfed.fl.population import Population
    from adfed.fl.types import Passes

    pop = Population(Dataset.open(small_world), test_fraction=0.2, seed=0)
    pop.profiles.online_prob[:] = 1.0
    never = pop.clients[0]
    pop.profiles.online_prob[never] = 0.0
    k, n = 40, len(pop)

    # Execute: past the end of the first pass
    passes, seen = Passes(), []
    for r in range(n // k + 3):
        chosen, passes = pop.sample_passes(k, np.random.default_rng(r), passes, seed=2)
        seen.append(chosen)

    # Assert: the offline client waits, deferred (once) and never offered; the first pass
    # offers every other client exactly once, in the pass's order
    first = np.concatenate(seen)[: n - 1]
    assert passes.number == 1 and passes.deferred.tolist() == [never]
    assert never not in np.concatenate(seen)
    assert sorted(first.tolist()) == sorted(c for c in pop.clients.tolist() if c != never)
    order = pop.pass_order(2, 0)
    assert first.tolist() == [c for c in order.tolist() if c != never]
    # nobody online: nobody, and the scan ends
    pop.profiles.online_prob[:] = 0.0
    chosen, _ = pop.sample_passes(k, np.random.default_rng(0), Passes(), seed=2)
    assert len(chosen) == 0


def _full_pack(store: LocalStore) -> dict[str, tuple[list[int], list[list[float]]]]:
    """What packed() must equal: every entry read again, per key, sorted by phone id."""
    out: dict[str, tuple[list[int], list[list[float]]]] = {}
    for u in sorted(store.entries):
        for k, v in store.entries[u].items():
            ids, vals = out.setdefault(k, ([], []))
            ids.append(u)
            vals.append(v.reshape(-1).tolist())
    return out


def _as_lists(packed: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[list[int], list[list[float]]]]:
    return {k: (ids.tolist(), vals.reshape(len(ids), -1).tolist()) for k, (ids, vals) in packed.items()}


def test_packed_stays_equal_to_a_full_read_across_puts_evictions_and_keys() -> None:
    # Prepare: entries with a second, optional key (a pipeline's per-phone state)
    store = LocalStore(capacity=5)
    rng = torch.Generator().manual_seed(0)

    def state(u: int, extra: bool) -> dict[str, torch.Tensor]:
        s = {"emb.user_id.weight": torch.rand((1, 2), generator=rng)}
        if extra:
            s["pipeline/ef/residual"] = torch.full((3,), float(u))
        return s

    # Execute / Assert: after every change, the incremental pack equals a fresh full read
    for step, u in enumerate([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9]):
        store.put_inplace(u, state(u, extra=step % 3 == 0))
        if step % 2:
            assert _as_lists(store.packed()) == _full_pack(store), step
    assert store.evicted > 0
    assert _as_lists(store.packed()) == _full_pack(store)
    assert _as_lists(store.packed()) == _full_pack(store)  # nothing changed: the same


def test_packed_of_an_empty_store_is_empty() -> None:
    assert LocalStore(capacity=3).packed() == {}


def test_packed_keeps_no_second_copy_of_large_per_phone_state_and_can_be_asked_for_keys() -> None:
    # Prepare: the phone's own row (small) and an error-feedback residual (large)
    from adfed.fl.population import PACKED_NUMEL

    store = LocalStore(capacity=10)
    for u in (4, 2, 7):
        store.put_inplace(u, {"emb.user_id.weight": torch.full((1, 2), float(u)),
                              "pipeline/ef/residual": torch.full((PACKED_NUMEL + 1,), float(u))})

    # Execute
    both = store.packed()
    small = store.packed(["emb.user_id.weight"])

    # Assert: the large key is stacked when asked for, but only the small one is kept
    assert both["pipeline/ef/residual"][0].tolist() == [2, 4, 7]
    assert both["pipeline/ef/residual"][1][:, 0].tolist() == [2.0, 4.0, 7.0]
    assert set(small) == {"emb.user_id.weight"} and small["emb.user_id.weight"][0].tolist() == [2, 4, 7]
    assert set(store._packed or {}) == {"emb.user_id.weight"}
    assert _as_lists(store.packed()) == _full_pack(store)
