"""Aggregation: the pure means, the server's weights, and a contract suite over every
registered aggregator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from adfed.config import Config, with_overrides
from adfed.errors import ConfigError
from adfed.fl import aggregators, strategies
from adfed.fl.aggregators import (
    Aggregate,
    BuildContext,
    RoundInfo,
    WeightedMean,
    aggregate_sparse,
    weighted_mean,
)
from adfed.fl.server import server_weights
from adfed.fl.types import FlatDense, SparseRows, Update, dense_nbytes, flat_index, flat_span
from adfed.fl.wire import WireSpec


def _update(n: int, dense: dict[str, torch.Tensor] | None = None, client_id: int = 0,
            sparse: dict[str, SparseRows] | None = None) -> Update:
    return Update(client_id=client_id, dense=dense or {}, sparse=sparse or {}, num_examples=n, base_version=0)


CTX = BuildContext(spec=WireSpec.of({}, {}), population=10)


def client_weights(updates: list[Update], max_weight: float) -> np.ndarray:
    return server_weights([u.num_examples for u in updates], max_weight)


@settings(max_examples=50, deadline=None)
@given(
    delta=hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 3)),
                     elements=st.floats(-100, 100, width=32)),
    counts=st.lists(st.integers(1, 500), min_size=1, max_size=6),
    max_weight=st.floats(1.0, 1000.0),
)
def test_fedavg_of_identical_updates_is_that_update(delta: np.ndarray, counts: list[int], max_weight: float) -> None:
    # Prepare
    t = torch.from_numpy(delta)
    updates = [_update(n, {"w": t.clone()}, client_id=i) for i, n in enumerate(counts)]
    params = {"w": torch.zeros_like(t)}
    opt = strategies.create("fedavg", 1.0)

    # Execute
    mean = weighted_mean([u.dense for u in updates], client_weights(updates, max_weight))
    new_params, _ = opt.apply(params, mean, opt.init(params))

    # Assert
    torch.testing.assert_close(mean["w"], t, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(new_params["w"], t, rtol=1e-6, atol=1e-5)


# -- weights and dense mean ------------------------------------------------------------------

def test_client_weights_cap_and_clip() -> None:
    # Prepare
    updates = [_update(n) for n in (10, 0, -5, 200, 10_000)]

    # Execute
    w = client_weights(updates, max_weight=200.0)

    # Assert
    assert w.dtype == np.float64
    assert w.tolist() == [10.0, 0.0, 0.0, 200.0, 200.0]


def test_client_weights_of_nobody() -> None:
    assert client_weights([], 10.0).shape == (0,)
    assert client_weights([_update(0), _update(-1)], 10.0).tolist() == [0.0, 0.0]


def test_weighted_mean_matches_numpy(rng: np.random.Generator) -> None:
    # Prepare
    k = 5
    arrays = [{"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4)} for _ in range(k)]
    tensors = [{n: torch.from_numpy(v.astype(np.float32)) for n, v in d.items()} for d in arrays]
    weights = np.array([1.0, 0.0, 3.0, 2.5, 7.0])

    # Execute
    mean = weighted_mean(tensors, weights)

    # Assert
    for name in ("a", "b"):
        stacked = np.stack([d[name].astype(np.float32).astype(np.float64) for d in arrays])
        want = np.tensordot(weights / weights.sum(), stacked, axes=1)
        np.testing.assert_allclose(mean[name].numpy(), want, rtol=1e-6, atol=1e-6)
        assert mean[name].dtype == torch.float32


def test_weighted_mean_of_decoded_updates_equals_it_tensor_by_tensor(rng: np.random.Generator) -> None:
    # Prepare: the same updates as separate tensors and as views of one buffer each, in
    # the wire's name order (what the server decodes), and one update with its two
    # tensors in the other order (no span: tensor by tensor)
    names = {"z.weight": (3, 2), "a.bias": (4,), "m.weight": (2, 2)}
    arrays = [{n: torch.from_numpy(rng.normal(size=s).astype(np.float32)) for n, s in names.items()} for _ in range(4)]
    def packed(d: dict[str, torch.Tensor], order: list[str]) -> dict[str, torch.Tensor]:
        flat = torch.cat([d[n].reshape(-1) for n in order])
        views = dict(zip(order, flat.split([d[n].numel() for n in order]), strict=True))
        return {n: views[n].view(d[n].shape) for n in d}
    decoded = [packed(d, sorted(names)) for d in arrays[:3]] + [packed(arrays[3], list(names))]
    weights = np.array([1.0, 2.0, 0.0, 0.5])

    # Execute
    plain, fast = weighted_mean(arrays, weights), weighted_mean(decoded, weights)

    # Assert: bit for bit, the names in the first update's order
    assert list(fast) == list(names)
    for n in names:
        assert torch.equal(plain[n], fast[n])


def test_weighted_mean_of_flat_dense_updates_equals_it_tensor_by_tensor(rng: np.random.Generator) -> None:
    # Prepare: FlatDense updates of one index (what the wire decodes, what batched phones
    # make), one of another order, and one plain dict among them
    shapes = [("z.weight", (3, 2)), ("a.bias", (4,)), ("s", ())]
    arrays = [{n: torch.from_numpy(rng.normal(size=s).astype(np.float32)) for n, s in shapes} for _ in range(5)]
    index, other = flat_index(shapes), flat_index(shapes[::-1])

    def flat(d: dict[str, torch.Tensor], idx: dict) -> FlatDense:
        return FlatDense(torch.cat([d[n].reshape(-1) for n in idx]), idx)

    mixed = [flat(arrays[0], index), flat(arrays[1], index), flat(arrays[2], other), arrays[3], flat(arrays[4], index)]
    weights = np.array([1.0, 2.0, 0.5, 0.25, 0.0])

    # Execute
    plain, fast = weighted_mean(arrays, weights), weighted_mean(mixed, weights)

    # Assert: bit for bit, names, shapes and dtypes as the first update's
    assert list(fast) == [n for n, _ in shapes]
    for n, shape in shapes:
        assert torch.equal(plain[n], fast[n]) and fast[n].shape == shape and fast[n].dtype == torch.float32


def test_flat_dense_is_a_mapping_of_views_of_its_flat_tensor() -> None:
    # Prepare
    index = flat_index([("w", (2, 3)), ("empty", (0, 4)), ("b", (2,)), ("s", ())])
    block = torch.arange(18, dtype=torch.float32).view(2, 9)  # two phones' rows, as the batched path lays them

    # Execute
    second = FlatDense(block[1], index)

    # Assert: the names in order, each a view at its place, writes reaching the flat tensor
    assert list(second) == ["w", "empty", "b", "s"] and len(second) == 4
    assert torch.equal(second["w"], torch.arange(9, 15, dtype=torch.float32).view(2, 3))
    assert second["empty"].shape == (0, 4) and torch.equal(second["b"], torch.tensor([15.0, 16.0]))
    assert second["s"].shape == () and float(second["s"]) == 17.0
    second["b"].add_(1.0)
    assert block[1, 6] == 16.0 and dense_nbytes(second) == 36 == dense_nbytes(dict(second.items()))
    with pytest.raises(ValueError, match="contiguous 1-D tensor of the index's 9 values"):
        FlatDense(block[1, :8], index)
    with pytest.raises(ValueError, match="contiguous 1-D tensor"):
        FlatDense(block[:, 0].contiguous().view(2, 1).expand(2, 9)[0], index)


def test_flat_span_only_of_tensors_back_to_back_in_one_storage() -> None:
    flat = torch.arange(10, dtype=torch.float32)
    a, b, c = flat[:2], flat[2:6].view(2, 2), flat[6:]
    span = flat_span([a, b, c])
    assert span is not None and span.data_ptr() == flat.data_ptr() and torch.equal(span, flat)
    assert flat_span([a, c]) is None  # a gap
    assert flat_span([b, a]) is None  # out of order
    assert flat_span([a, flat[2:6].view(2, 2).t()]) is None  # not contiguous
    assert flat_span([a, torch.zeros(3)]) is None  # another allocation
    assert flat_span([]) is None


def test_weighted_mean_zero_total_weight_raises() -> None:
    tensors = [{"w": torch.ones(2)}, {"w": torch.zeros(2)}]
    with pytest.raises(ValueError, match="total weight is zero"):
        weighted_mean(tensors, np.zeros(2))


def test_weighted_mean_of_nothing_raises() -> None:
    with pytest.raises(ValueError, match="at least one update"):
        weighted_mean([], np.zeros(0))


def test_weighted_mean_rejects_mismatched_lengths() -> None:
    tensors = [{"w": torch.ones(2)}, {"w": torch.zeros(2)}]
    with pytest.raises(ValueError, match=r"2 updates but 3 weights"):
        weighted_mean(tensors, np.ones(3))


# -- sparse rows -----------------------------------------------------------------------------

def test_aggregate_sparse_means_over_contributing_clients_only() -> None:
    # Prepare: rows 1 and 3 shared, 5 only client b, 7 only client a (weight 0: ignored),
    # 9 only client c (weight 0)
    a = SparseRows(torch.tensor([1, 3, 7]), torch.tensor([[1.0, 0.0], [2.0, 2.0], [5.0, 5.0]]))
    b = SparseRows(torch.tensor([1, 5]), torch.tensor([[4.0, 3.0], [-1.0, 1.0]]))
    c = SparseRows(torch.tensor([3, 9]), torch.tensor([[8.0, 8.0], [9.0, 9.0]]))
    weights = np.array([1.0, 2.0, 0.0])
    a_only_3 = SparseRows(torch.tensor([3]), torch.tensor([[2.0, 2.0]]))

    # Execute
    out = aggregate_sparse([a, b, c], weights)
    out2 = aggregate_sparse([a_only_3, b], np.array([1.0, 3.0]))

    # Assert
    assert out.ids.tolist() == [1, 3, 5, 7]
    expected = [
        [(1 * 1.0 + 2 * 4.0) / 3, (1 * 0.0 + 2 * 3.0) / 3],  # a and b
        [2.0, 2.0],  # only a (c has weight 0): not diluted by b's weight
        [-1.0, 1.0],  # only b
        [5.0, 5.0],  # only a
    ]
    torch.testing.assert_close(out.values, torch.tensor(expected))
    assert out.values.dtype == torch.float32
    assert out2.ids.tolist() == [1, 3, 5]
    torch.testing.assert_close(out2.values, torch.tensor([[4.0, 3.0], [2.0, 2.0], [-1.0, 1.0]]))


def test_aggregate_sparse_over_all_equals_dense_fedavg_of_the_full_table() -> None:
    # Prepare: the same rows as full [10, 2] tables with zeros where a client touched nothing
    a = SparseRows(torch.tensor([1, 3]), torch.tensor([[1.0, 0.0], [2.0, 2.0]]))
    b = SparseRows(torch.tensor([1, 5]), torch.tensor([[4.0, 3.0], [-1.0, 1.0]]))
    c = SparseRows(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2))
    weights = np.array([1.0, 2.0, 1.0])
    dense = []
    for part in (a, b, c):
        full = torch.zeros(10, 2)
        full[part.ids] = part.values
        dense.append({"t": full})

    # Execute
    out = aggregate_sparse([a, b, c], weights, over="all")
    ref = weighted_mean(dense, weights)["t"]

    # Assert: same values on the touched rows, and untouched rows are absent (zero delta)
    assert out.ids.tolist() == [1, 3, 5]
    torch.testing.assert_close(out.values, ref[out.ids])
    assert float(ref[[0, 2, 4, 6, 7, 8, 9]].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="sparse_aggregation"):
        aggregate_sparse([a], np.array([1.0]), over="some")


def test_aggregate_sparse_empty_inputs() -> None:
    # Prepare
    empty = SparseRows(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3))
    some = SparseRows(torch.tensor([2]), torch.ones(1, 3))

    # Execute
    none = aggregate_sparse([], np.zeros(0))
    all_empty = aggregate_sparse([empty, empty], np.ones(2))
    all_zero_weight = aggregate_sparse([some], np.zeros(1))

    # Assert
    assert none.ids.numel() == 0 and none.values.shape[0] == 0
    assert all_empty.ids.numel() == 0 and all_empty.values.shape == (0, 3)
    assert all_zero_weight.ids.numel() == 0 and all_zero_weight.values.shape == (0, 3)
    assert all_empty.ids.dtype == torch.int64


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_aggregate_sparse_of_identical_rows_is_those_rows(data: st.DataObject) -> None:
    # Prepare
    ids = sorted(data.draw(st.sets(st.integers(0, 50), min_size=1, max_size=8)))
    values = data.draw(hnp.arrays(np.float32, (len(ids), 2), elements=st.floats(-10, 10, width=32)))
    weights = np.array(data.draw(st.lists(st.floats(0.5, 100.0), min_size=1, max_size=5)))
    part = SparseRows(torch.tensor(ids), torch.from_numpy(values))

    # Execute
    out = aggregate_sparse([part] * len(weights), weights)

    # Assert
    assert out.ids.tolist() == ids
    torch.testing.assert_close(out.values, torch.from_numpy(values), rtol=1e-5, atol=1e-5)


def test_aggregate_sparse_rejects_mismatched_lengths() -> None:
    part = SparseRows(torch.tensor([1]), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"1 parts but 2 weights"):
        aggregate_sparse([part], np.ones(2))




# -- server weights: caps and staleness in one place ----------------------------------------

def test_server_weights_divide_by_sqrt_of_one_plus_staleness() -> None:
    # Prepare: FedBuff's staleness weight 1 / sqrt(1 + s) on capped example counts
    counts, staleness = [100, 400, 50, 9], [0, 3, 8, 0]

    # Execute
    w = server_weights(counts, 200.0, staleness)

    # Assert
    np.testing.assert_allclose(w, [100.0, 200.0 / 2.0, 50.0 / 3.0, 9.0])


def test_server_weights_without_staleness_are_the_caps() -> None:
    np.testing.assert_array_equal(server_weights([5, 500], 100.0), [5.0, 100.0])
    np.testing.assert_array_equal(server_weights([5, 500], 100.0, [0, 0]), [5.0, 100.0])


# -- contract suite over every registered aggregator ----------------------------------------

AGGREGATORS = aggregators.names()


def _round(rng: np.random.Generator, n: int = 5) -> list[Update]:
    out = []
    for i in range(n):
        dense = {"w": torch.from_numpy(rng.normal(size=(3, 2)).astype(np.float32)),
                 "b": torch.from_numpy(rng.normal(size=3).astype(np.float32))}
        ids = torch.from_numpy(np.sort(rng.choice(10, size=3, replace=False)).astype(np.int64))
        rows = SparseRows(ids, torch.from_numpy(rng.normal(size=(3, 4)).astype(np.float32)))
        out.append(_update(int(rng.integers(1, 50)), dense, client_id=i, sparse={"ad": rows}))
    return out


def test_registry_holds_mean() -> None:
    assert "mean" in AGGREGATORS


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregate_keeps_names_shapes_dtypes_and_inputs(name: str, rng: np.random.Generator) -> None:
    # Prepare
    agg = aggregators.create(name, Config())
    updates = _round(rng)
    before = [{k: v.clone() for k, v in u.dense.items()} for u in updates]
    weights = client_weights(updates, 200.0)

    # Execute
    out = agg(updates, weights, np.random.default_rng(0), RoundInfo(1))

    # Assert
    assert isinstance(out, Aggregate)
    assert out.dense.keys() == updates[0].dense.keys()
    for k, v in updates[0].dense.items():
        assert out.dense[k].shape == v.shape and out.dense[k].dtype == v.dtype
    rows = out.sparse["ad"]
    assert rows.ids.dtype == torch.int64 and torch.equal(rows.ids, torch.unique(rows.ids))
    assert rows.values.shape == (len(rows.ids), 4)
    for u, b in zip(updates, before, strict=True):
        for k in b:
            assert torch.equal(u.dense[k], b[k])


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregate_of_identical_updates_is_that_update(name: str, rng: np.random.Generator) -> None:
    # Prepare
    one = _round(rng, 1)[0]
    updates = [Update(client_id=i, dense=one.dense, sparse=one.sparse, num_examples=3 + i, base_version=0)
               for i in range(4)]

    # Execute
    out = aggregators.create(name, Config())(updates, client_weights(updates, 200.0), np.random.default_rng(0), RoundInfo(1))

    # Assert
    for k, v in one.dense.items():
        torch.testing.assert_close(out.dense[k], v)
    torch.testing.assert_close(out.sparse["ad"].values, one.sparse["ad"].values)


@pytest.mark.parametrize("over", ["all", "touched"])
def test_mean_entry_follows_fl_sparse_aggregation(over: str, rng: np.random.Generator) -> None:
    # Prepare
    cfg = with_overrides(Config(), [f"fl.sparse_aggregation={over}"])
    updates = _round(rng)
    weights = client_weights(updates, 200.0)

    # Execute
    out = aggregators.create("mean", cfg)(updates, weights, np.random.default_rng(0), RoundInfo(1))

    # Assert
    want = aggregate_sparse([u.sparse["ad"] for u in updates], weights, over)
    assert torch.equal(out.sparse["ad"].ids, want.ids) and torch.equal(out.sparse["ad"].values, want.values)
    assert WeightedMean(sparse_over=over) == aggregators.create("mean", cfg)


def test_unknown_aggregator_is_a_config_error_listing_the_known() -> None:
    cfg = with_overrides(Config(), ["robust.aggregator=median_of_nothing"])
    with pytest.raises(ConfigError, match=r"robust.aggregator must be one of \['mean'.*median_of_nothing"):
        aggregators.build(cfg, CTX)


def test_duplicate_register_is_refused_and_force_replaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregators, "_REGISTRY", dict(aggregators._REGISTRY))
    with pytest.raises(ValueError, match="already registered"):
        aggregators.register("mean", lambda cfg: WeightedMean())
    aggregators.register("mean", lambda cfg: WeightedMean(sparse_over="touched"), force=True)
    assert aggregators.create("mean", Config()) == WeightedMean(sparse_over="touched")


def test_a_wrapper_is_applied_by_build_without_touching_the_round(monkeypatch: pytest.MonkeyPatch,
                                                                   rng: np.random.Generator) -> None:
    # Prepare: a wrapper that adds seeded noise to the dense mean (the shape of DP noise)
    monkeypatch.setattr(aggregators, "_WRAPPERS", {})

    def noisy(inner: aggregators.Aggregator, cfg: Config, ctx: BuildContext) -> aggregators.Aggregator:
        def agg(updates, weights, g, info):  # noqa: ANN001, ANN202
            out = inner(updates, weights, g, info)
            return Aggregate({k: v + torch.from_numpy(g.normal(size=v.shape).astype(np.float32))
                              for k, v in out.dense.items()}, out.sparse)
        return agg

    aggregators.register_wrapper("noise", noisy)
    updates = _round(rng)
    weights = client_weights(updates, 200.0)

    # Execute
    a = aggregators.build(Config(), CTX)(updates, weights, np.random.default_rng(5), RoundInfo(1))
    b = aggregators.build(Config(), CTX)(updates, weights, np.random.default_rng(5), RoundInfo(1))
    plain = aggregators.create("mean", Config())(updates, weights, np.random.default_rng(5), RoundInfo(1))

    # Assert: the seeded RNG reaches the wrapper (same seed, same noise), and it changed the mean
    assert all(torch.equal(a.dense[k], b.dense[k]) for k in a.dense)
    assert not torch.equal(a.dense["w"], plain.dense["w"])
