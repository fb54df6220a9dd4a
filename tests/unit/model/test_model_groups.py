"""The parameter decomposition: groups, dense/row transfer, sparse optimizers."""

from __future__ import annotations

from collections.abc import Callable

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from adfed.data.examples import Batch, Examples
from adfed.data.schema import (
    Entity,
    FieldKind,
    FieldSpec,
    ParamGroup,
    Schema,
    Visibility,
)
from adfed.model import (
    build_model,
    esmm_loss,
    get_dense,
    get_rows,
    group_bytes,
    group_names,
    make_optimizers,
    model_bytes,
    partition,
    set_dense_inplace,
    set_rows_inplace,
    sparse_tables,
    touched_rows,
    touched_rows_many,
)
from adfed.model.pcvr import PCVRModel
from adfed.model.sparse_adam import RowSparseAdam


def _assert_partition(model: PCVRModel) -> None:
    parts = partition(model)
    names = [n for n, _ in model.named_parameters()]
    flat = [n for group in ParamGroup for n in parts[group]]
    assert set(parts) == set(ParamGroup)
    assert sorted(flat) == sorted(names)  # every parameter exactly once
    for group in ParamGroup:
        assert group_names(model, group) == parts[group]


@pytest.mark.parametrize("variant", ["full", "cloud_only"])
@pytest.mark.parametrize("user_rows", [None, 1])
def test_groups_partition_the_parameters(schema: Schema, variant: str, user_rows: int | None) -> None:
    model = build_model(schema, variant=variant, user_rows=user_rows)  # type: ignore[arg-type]

    _assert_partition(model)


_KINDS = [FieldKind.CATEGORICAL, FieldKind.MULTI_HOT, FieldKind.SEQUENCE, FieldKind.DENSE]


@st.composite
def schemas(draw: st.DrawFn) -> Schema:
    n_extra = draw(st.integers(0, 6))
    fields = [
        FieldSpec(
            name="ad_id", kind=FieldKind.CATEGORICAL, vocab_size=draw(st.integers(1, 30)),
            visibility=Visibility.CLOUD, entity=Entity.AD, group=draw(st.sampled_from(list(ParamGroup))),
        )
    ]
    if draw(st.booleans()):
        fields.append(FieldSpec(
            name="user_id", kind=FieldKind.CATEGORICAL, vocab_size=draw(st.integers(1, 30)),
            visibility=draw(st.sampled_from(list(Visibility))), entity=Entity.USER, group=ParamGroup.LOCAL,
        ))
    for i in range(n_extra):
        kind = draw(st.sampled_from(_KINDS))
        fields.append(FieldSpec(
            name=f"f{i}", kind=kind, vocab_size=0 if kind is FieldKind.DENSE else draw(st.integers(1, 30)),
            visibility=draw(st.sampled_from(list(Visibility))), entity=draw(st.sampled_from(list(Entity))),
            group=draw(st.sampled_from(list(ParamGroup))), max_len=draw(st.integers(1, 4)),
        ))
    return Schema(fields=tuple(fields), num_users=5, num_ads=5)


@settings(max_examples=30, deadline=None)
@given(schema=schemas(), variant=st.sampled_from(["full", "cloud_only"]))
def test_any_schema_gives_a_partition_that_follows_the_field_groups(schema: Schema, variant: str) -> None:
    model = build_model(schema, variant=variant, embedding_dim=4, tower=(8,))  # type: ignore[arg-type]

    _assert_partition(model)
    groups = model.parameter_groups()
    for f in model.schema.fields:
        if f.kind is not FieldKind.DENSE:
            assert groups[model.table_name(f.name)] is f.group
    for name, group in groups.items():
        if name.startswith("towers."):
            assert group is ParamGroup.DENSE_SHARED
        if name.startswith("user_bias."):
            assert group is ParamGroup.LOCAL


def test_local_parameters_are_never_in_an_upload(schema: Schema) -> None:
    model = build_model(schema)

    local = set(group_names(model, ParamGroup.LOCAL))
    upload = set(get_dense(model, ParamGroup.DENSE_SHARED)) | set(sparse_tables(model))

    assert local == {model.table_name("user_id"), "user_bias.weight"}
    assert not local & upload


def test_get_dense_copies_and_set_dense_round_trips(schema: Schema) -> None:
    model = build_model(schema, seed=0)
    other = build_model(schema, seed=1)

    dense = get_dense(model, ParamGroup.DENSE_SHARED)
    for t in dense.values():
        t.add_(1.0)  # a copy: the model must not change
    set_dense_inplace(other, get_dense(model, ParamGroup.DENSE_SHARED))

    params, others = dict(model.named_parameters()), dict(other.named_parameters())
    for name, t in dense.items():
        torch.testing.assert_close(t - 1.0, params[name].detach())
        assert torch.equal(others[name], params[name])
    local = model.table_name("user_id")
    assert not torch.equal(others[local], params[local])  # only what was given is written


def test_set_dense_rejects_bad_input(schema: Schema) -> None:
    model = build_model(schema)
    name = group_names(model, ParamGroup.DENSE_SHARED)[0]
    shape = dict(model.named_parameters())[name].shape
    before = get_dense(model, ParamGroup.DENSE_SHARED)

    with pytest.raises(KeyError, match="nope"):
        set_dense_inplace(model, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        set_dense_inplace(model, {name: torch.zeros(3, 3, 3)})
    with pytest.raises(ValueError, match="finite"):
        set_dense_inplace(model, {name: torch.full(shape, float("nan"))})
    after = get_dense(model, ParamGroup.DENSE_SHARED)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_set_dense_unchecked_copies_exactly_and_a_wrong_name_copies_nothing(schema: Schema) -> None:
    model = build_model(schema, seed=0)
    given = {n: t.add(0.5) for n, t in get_dense(model, ParamGroup.DENSE_SHARED).items()}
    before = get_dense(model, ParamGroup.DENSE_SHARED)

    with pytest.raises(KeyError, match="nope"):
        set_dense_inplace(model, {**given, "nope": torch.zeros(1)}, check=False)
    unchanged = get_dense(model, ParamGroup.DENSE_SHARED)
    set_dense_inplace(model, given, check=False)

    assert all(torch.equal(before[n], unchanged[n]) for n in before)
    after = get_dense(model, ParamGroup.DENSE_SHARED)
    assert all(torch.equal(after[n].view(torch.int32), given[n].view(torch.int32)) for n in given)


def test_touched_rows_are_the_ids_in_the_batch(schema: Schema, make_batch: Callable[..., Batch]) -> None:
    model = build_model(schema)
    batch = make_batch(40)

    touched = touched_rows(model, batch)

    assert set(touched) == set(sparse_tables(model))
    assert {model.table_field(t).name for t in touched} == {"ad_id", "advertiser_id", "installed_apps"}
    for table, rows in touched.items():
        field = model.table_field(table).name
        ids = batch.bags[field][0] if field in batch.bags else batch.ids[field]
        assert rows.dtype == torch.int64
        np.testing.assert_array_equal(rows.numpy(), np.unique(ids.numpy()))


def test_touched_rows_many_are_touched_rows_of_each_part(schema: Schema,
                                                        make_examples: Callable[..., Examples]) -> None:
    # Prepare: parts of uneven size, one of them empty, bags partly empty
    model = build_model(schema)
    data = make_examples(schema, 60, empty_bags=True)
    offsets = np.array([0, 1, 1, 17, 40, 60])

    # Execute
    many = touched_rows_many(model, data, offsets)

    # Assert
    assert len(many) == 5
    for i, got in enumerate(many):
        want = touched_rows(model, data.slice(int(offsets[i]), int(offsets[i + 1])))
        assert list(got) == list(want)
        for table in want:
            assert got[table].dtype == torch.int64
            assert torch.equal(got[table], want[table]), (i, table)


def test_get_and_set_rows_round_trip(schema: Schema) -> None:
    model = build_model(schema)
    table = model.table_name("ad_id")
    ids = torch.tensor([3, 0, 17])
    before = get_rows(model, table, torch.arange(100))

    values = torch.arange(3 * 16, dtype=torch.float32).reshape(3, 16)
    set_rows_inplace(model, table, ids, values)

    torch.testing.assert_close(get_rows(model, table, ids), values)
    rest = torch.tensor([i for i in range(100) if i not in (0, 3, 17)])
    torch.testing.assert_close(get_rows(model, table, rest), before[rest])
    got = get_rows(model, table, ids)
    got.zero_()  # a copy
    torch.testing.assert_close(get_rows(model, table, ids), values)


def test_row_access_rejects_bad_input(schema: Schema) -> None:
    model = build_model(schema)
    table = model.table_name("ad_id")
    rows = model.schema.field("ad_id").vocab_size

    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        get_rows(model, table, torch.tensor([rows]))
    with pytest.raises(ValueError, match="unique"):
        set_rows_inplace(model, table, torch.tensor([1, 1]), torch.zeros(2, 16))
    with pytest.raises(ValueError, match="shape"):
        set_rows_inplace(model, table, torch.tensor([1, 2]), torch.zeros(2, 15))
    with pytest.raises(ValueError, match="finite"):
        set_rows_inplace(model, table, torch.tensor([1]), torch.full((1, 16), float("inf")))
    with pytest.raises(KeyError, match="nope"):
        get_rows(model, "nope", torch.tensor([0]))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("sparse_opt", ["sparse_adam", "torch_sparse_adam", "adagrad", "sgd"])
def test_optimizers_update_only_touched_rows(
    schema: Schema, make_batch: Callable[..., Batch], sparse_opt: str
) -> None:
    model = build_model(schema)
    optimizers = make_optimizers(model, lr=0.05, sparse_opt=sparse_opt)  # type: ignore[arg-type]
    sparse = {n for n, _ in model.named_parameters() if model.has_sparse_grad(n)}
    batch = make_batch(16)
    touched = touched_rows(model, batch)
    touched[model.table_name("user_id")] = torch.unique(batch.ids["user_id"])
    touched["user_bias.weight"] = touched[model.table_name("user_id")]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    for _ in range(2):
        for opt in optimizers:
            opt.zero_grad()
        esmm_loss(model(batch), batch).backward()
        for opt in optimizers:
            opt.step()

    assert len(optimizers) == 2
    opt_params = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in optimizers]
    params = dict(model.named_parameters())
    assert opt_params[1] == {id(params[n]) for n in sparse}
    assert sparse == set(touched)
    for name in sparse:
        changed = (params[name].detach() != before[name]).any(dim=1).nonzero().flatten()
        assert set(changed.tolist()) <= set(touched[name].tolist()), name
        assert changed.numel() > 0, name
    assert not torch.equal(params["towers.bottom.0.weight"], before["towers.bottom.0.weight"])


def test_make_optimizers_rejects_bad_options(schema: Schema) -> None:
    model = build_model(schema)

    with pytest.raises(ValueError, match="train.lr"):
        make_optimizers(model, lr=0.0)
    with pytest.raises(ValueError, match="sparse_lr"):
        make_optimizers(model, lr=0.1, sparse_lr=-1.0)
    with pytest.raises(ValueError, match="dense_opt"):
        make_optimizers(model, lr=0.1, dense_opt="lion")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sparse_opt"):
        make_optimizers(model, lr=0.1, sparse_opt="adam")  # type: ignore[arg-type]


def test_sparse_lr_reaches_the_sparse_optimizer(schema: Schema) -> None:
    model = build_model(schema)

    dense_opt, sparse_opt = make_optimizers(model, lr=0.1, sparse_lr=0.01)

    assert isinstance(sparse_opt, RowSparseAdam) and sparse_opt.param_groups[0]["lr"] == 0.01
    assert isinstance(dense_opt, torch.optim.Adam) and dense_opt.param_groups[0]["lr"] == 0.1
    assert dense_opt.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("dense_opt", ["sgd", "adam"])
def test_table_lr_puts_the_small_dense_tables_in_their_own_group(schema: Schema, dense_opt: str) -> None:
    model = build_model(schema)
    names = {id(p): n for n, p in model.named_parameters()}

    dense, _ = make_optimizers(model, lr=0.1, table_lr=5.0, dense_opt=dense_opt)  # type: ignore[arg-type]

    rest, tables = dense.param_groups
    assert (rest["lr"], tables["lr"]) == (0.1, 5.0)
    in_tables = {names[id(p)] for p in tables["params"]}
    assert in_tables == {n for n in names.values() if model.is_dense_table(n)} and in_tables
    assert all(n.startswith("embeddings.") and not model.has_sparse_grad(n) for n in in_tables)
    dense_names = {n for n in names.values() if not model.has_sparse_grad(n)}
    assert sorted(in_tables | {names[id(p)] for p in rest["params"]}) == sorted(dense_names)
    assert not in_tables & {names[id(p)] for p in rest["params"]}
    (single, _) = make_optimizers(model, lr=0.1)
    assert len(single.param_groups) == 1
    with pytest.raises(ValueError, match="table_lr"):
        make_optimizers(model, lr=0.1, table_lr=0.0)


@pytest.mark.parametrize("table_lr", [None, 5.0])
def test_dense_optimizer_is_torchs_fused_adam(schema: Schema, table_lr: float | None) -> None:
    model = build_model(schema)

    dense, _ = make_optimizers(model, lr=0.1, table_lr=table_lr)

    assert type(dense) is torch.optim.Adam
    assert all(g["fused"] and not g["amsgrad"] for g in dense.param_groups)
    (sgd, _) = make_optimizers(model, lr=0.1, dense_opt="sgd")
    assert type(sgd) is torch.optim.SGD and all(g["fused"] for g in sgd.param_groups)


def test_weight_decay_reaches_the_dense_optimizer_only(schema: Schema) -> None:
    model = build_model(schema)

    dense_opt, sparse_opt = make_optimizers(model, lr=0.1, weight_decay=1e-4)

    assert dense_opt.param_groups[0]["weight_decay"] == 1e-4
    assert "weight_decay" not in sparse_opt.param_groups[0]  # SparseAdam has none


def test_model_bytes_counts_every_parameter_as_fp32(schema: Schema) -> None:
    model = build_model(schema, embedding_dim=8)

    total = sum(p.numel() for p in model.parameters()) * 4

    assert model_bytes(model) == total
    assert sum(group_bytes(model, g) for g in ParamGroup) == total
    assert group_bytes(model, ParamGroup.LOCAL) == (50 * 8 + 50 * 2) * 4


def test_all_finite_flags_nan_and_inf_but_not_huge_values() -> None:
    from adfed.model.groups import all_finite

    big = torch.tensor([3e38, -3e38])  # a norm would overflow these; max-abs does not
    assert all_finite([big, torch.zeros(2, 3), torch.zeros(0)])
    assert all_finite([])
    assert not all_finite([torch.zeros(4), torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([[float("-inf")]])])


def test_local_lr_puts_the_users_rows_in_their_own_sparse_group(schema: Schema) -> None:
    model = build_model(schema)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = model.parameter_groups()

    _, sparse = make_optimizers(model, lr=0.1, sparse_lr=0.01, local_lr=0.003)

    shared, local = sparse.param_groups
    assert (shared["lr"], local["lr"]) == (0.01, 0.003)
    assert {names[id(p)] for p in local["params"]} == {n for n, g in groups.items() if g is ParamGroup.LOCAL}
    assert all(groups[names[id(p)]] is ParamGroup.SPARSE_SHARED for p in shared["params"])
    (_, one) = make_optimizers(model, lr=0.1)
    assert len(one.param_groups) == 1
    with pytest.raises(ValueError, match="local_lr"):
        make_optimizers(model, lr=0.1, local_lr=0.0)
