"""DatasetWriter + Dataset: a tiny hand-built dataset, per-client joins, validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adfed.data.store as store_module
from adfed.data import layout
from adfed.data.examples import Examples
from adfed.data.layout import DEVICE_COLUMNS, DatasetWriter
from adfed.data.schema import (
    LABEL_COLUMNS,
    Entity,
    FieldKind,
    FieldSpec,
    ParamGroup,
    Schema,
    Visibility,
)
from adfed.data.store import TRUTH_PREFIX, Dataset, split_by_time
from adfed.errors import DataError

ROWS_PER_USER = [3, 5, 0, 1, 4, 2]  # user 2 has no impressions
CHUNKS = [[0, 1], [2, 3], [4, 5]]  # users per write_impressions call
NUM_ADS = 7


def _field(name: str, kind: FieldKind, vocab: int, entity: Entity, group: ParamGroup, **kw: object) -> FieldSpec:
    return FieldSpec(name=name, kind=kind, vocab_size=vocab, visibility=Visibility.CLOUD,
                     entity=entity, group=group, **kw)  # type: ignore[arg-type]


SCHEMA = Schema(
    fields=(
        dataclasses.replace(
            _field("user_id", FieldKind.CATEGORICAL, len(ROWS_PER_USER), Entity.USER, ParamGroup.LOCAL),
            visibility=Visibility.PRIVATE,
        ),
        _field("age", FieldKind.CATEGORICAL, 5, Entity.USER, ParamGroup.DENSE_SHARED),
        _field("apps", FieldKind.MULTI_HOT, 30, Entity.USER, ParamGroup.SPARSE_SHARED, max_len=4),
        _field("ad_id", FieldKind.CATEGORICAL, NUM_ADS, Entity.AD, ParamGroup.SPARSE_SHARED),
        _field("advertiser", FieldKind.CATEGORICAL, 3, Entity.AD, ParamGroup.DENSE_SHARED),
        _field("hour", FieldKind.CATEGORICAL, 24, Entity.CONTEXT, ParamGroup.DENSE_SHARED),
    ),
    num_users=len(ROWS_PER_USER),
    num_ads=NUM_ADS,
)


@dataclasses.dataclass
class World:
    """The raw tables written to disk, for computing expected joins in plain Python."""

    path: Path
    users: pa.Table
    ads: pa.Table
    imp: pa.Table  # all impressions, in file order
    truth: pa.Table


def _tables(rng: np.random.Generator) -> tuple[pa.Table, pa.Table, pa.Table, pa.Table]:
    n_users = len(ROWS_PER_USER)
    apps = [rng.integers(0, 30, size=rng.integers(0, 5)).tolist() for _ in range(n_users)]
    users = pa.table({
        "user_id": pa.array(np.arange(n_users), pa.int64()),
        "age": pa.array(rng.integers(0, 5, n_users), pa.int32()),
        "apps": pa.array(apps, pa.list_(pa.int32())),
    })
    ads = pa.table({
        "ad_id": pa.array(np.arange(NUM_ADS), pa.int32()),
        "advertiser": pa.array(rng.integers(0, 3, NUM_ADS), pa.int32()),
        "bid": pa.array(rng.random(NUM_ADS), pa.float32()),
    })
    user_col = np.repeat(np.arange(n_users), ROWS_PER_USER)
    n = len(user_col)
    click = (rng.random(n) < 0.5).astype(np.int8)
    imp = pa.table({
        "user_id": pa.array(user_col, pa.int64()),
        "ad_id": pa.array(rng.integers(0, NUM_ADS, n), pa.int32()),
        "hour": pa.array(rng.integers(0, 24, n), pa.int32()),
        "timestamp": pa.array(np.arange(n) * 10 + user_col * 1000, pa.int64()),
        "click": pa.array(click, pa.int8()),
        "conversion": pa.array(click & (rng.random(n) < 0.5), pa.int8()),
        "label_observed": pa.array(rng.random(n) < 0.8, pa.bool_()),
    })
    truth = pa.table({
        "p_click": pa.array(rng.random(n), pa.float32()),
        "p_cvr": pa.array(rng.random(n), pa.float32()),
    })
    return users, ads, imp, truth


def _devices(n_users: int) -> pa.Table:
    cols = {name: pa.array(np.full(n_users, 0.5), pa.float32()) for name in DEVICE_COLUMNS}
    return pa.table({"user_id": pa.array(np.arange(n_users), pa.int64()), **cols})


def _rows(table: pa.Table, users: list[int]) -> pa.Table:
    mask = np.isin(table.column("user_id").to_numpy(), users)
    return table.filter(pa.array(mask))


@pytest.fixture
def small_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny shards and row groups, so shard boundaries and row-group reads are exercised."""
    monkeypatch.setattr(layout, "SHARD_ROWS", 4)
    monkeypatch.setattr(layout, "ROW_GROUP_ROWS", 2)


@pytest.fixture
def world(tmp_path: Path, rng: np.random.Generator, small_layout: None) -> World:
    users, ads, imp, truth = _tables(rng)
    writer = DatasetWriter(tmp_path / "ds", schema=SCHEMA, generator="test", params={"k": 1})
    writer.write_ads(ads)
    writer.write_users(users.slice(0, 3))
    writer.write_users(users.slice(3))
    writer.write_devices(_devices(len(ROWS_PER_USER)))
    user_col = imp.column("user_id").to_numpy()
    for chunk in CHUNKS:
        mask = pa.array(np.isin(user_col, chunk))
        writer.write_impressions(imp.filter(mask), truth.filter(mask))
    path = writer.close(extra={"note": "hand-built"})
    return World(path=path, users=users, ads=ads, imp=imp, truth=truth)


def _expected(world: World, user: int) -> dict[str, list]:
    """One user's joined rows, computed row by row in Python."""
    imp = _rows(world.imp, [user]).to_pylist()
    mask = pa.array(world.imp.column("user_id").to_numpy() == user)
    truth = world.truth.filter(mask).to_pylist()
    u = world.users.to_pylist()[user]
    ads = world.ads.to_pylist()
    return {
        "user_id": [r["user_id"] for r in imp],
        "ad_id": [r["ad_id"] for r in imp],
        "hour": [r["hour"] for r in imp],
        "age": [u["age"]] * len(imp),
        "apps": [u["apps"]] * len(imp),
        "advertiser": [ads[r["ad_id"]]["advertiser"] for r in imp],
        "timestamp": [r["timestamp"] for r in imp],
        "click": [r["click"] for r in imp],
        "conversion": [r["conversion"] for r in imp],
        "label_observed": [r["label_observed"] for r in imp],
        "truth_p_click": [r["p_click"] for r in truth],
    }


def _as_lists(ex: Examples) -> dict[str, list]:
    values, offsets = ex.bags["apps"]
    return {
        **{k: v.tolist() for k, v in ex.ids.items()},
        **{k: v.tolist() for k, v in ex.labels.items() if k != TRUTH_PREFIX + "p_cvr"},
        "apps": [values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)],
    }


def _assert_examples_equal(a: Examples, b: Examples) -> None:
    assert len(a) == len(b)
    for group in ("ids", "dense", "labels"):
        ga, gb = getattr(a, group), getattr(b, group)
        assert ga.keys() == gb.keys()
        for k in ga:
            np.testing.assert_array_equal(ga[k], gb[k], err_msg=f"{group}[{k}]")
    assert a.bags.keys() == b.bags.keys()
    for k in a.bags:
        np.testing.assert_array_equal(a.bags[k][0], b.bags[k][0])
        np.testing.assert_array_equal(a.bags[k][1], b.bags[k][1])


# -- reading ---------------------------------------------------------------------------------

def test_open_reads_manifest_and_index(world: World) -> None:
    # Execute
    ds = Dataset.open(world.path, verify_checksums=True)

    # Assert
    assert ds.schema == SCHEMA
    assert ds.has_truth
    assert ds.manifest["counts"]["shards"] == 2  # SHARD_ROWS=4: users 0,1 | users 3,4,5
    assert ds.manifest["note"] == "hand-built"
    assert sorted(p.name for p in (world.path / "impressions").iterdir()) == [
        "part-00000.parquet", "part-00001.parquet"]
    assert ds.user_ids.tolist() == [0, 1, 3, 4, 5]
    assert ds.rows_per_user().tolist() == [3, 5, 1, 4, 2]
    assert ds.num_impressions == sum(ROWS_PER_USER)
    assert [ds.rows_of(u) for u in (0, 2, 4, -1, 99)] == [3, 0, 4, 0, 0]
    assert ds.rows_of_users(np.array([0, 2, 4, -1, 99])).tolist() == [3, 0, 4, 0, 0]
    assert ds.devices() is not None and ds.devices().num_rows == len(ROWS_PER_USER)
    assert ds.requests() is None
    assert not world.path.with_name("ds.partial").exists()


@pytest.mark.parametrize("user", [u for u, n in enumerate(ROWS_PER_USER) if n > 0])
def test_client_returns_exactly_that_users_rows_joined(world: World, user: int) -> None:
    # Prepare
    ds = Dataset.open(world.path)

    # Execute
    ex = ds.client(user)

    # Assert
    got = _as_lists(ex)
    want = _expected(world, user)
    assert len(ex) == ROWS_PER_USER[user]
    for key, values in want.items():
        assert got[key] == values, key
    assert ex.dense == {}


def test_loaded_ids_and_bag_values_are_int32_and_batches_int64(world: World) -> None:
    from adfed.data.examples import id_dtype

    assert id_dtype(1) is np.int32 and id_dtype(2**31 - 1) is np.int32 and id_dtype(2**31) is np.int64
    ex = Dataset.open(world.path).load()
    assert ex.ids and all(v.dtype == np.int32 for v in ex.ids.values())
    assert ex.bags and all(v.dtype == np.int32 and o.dtype == np.int64 for v, o in ex.bags.values())
    batch = ex.to_batch()
    for name, v in ex.ids.items():
        assert batch.ids[name].dtype == torch.int64 and batch.ids[name].tolist() == v.tolist()
    assert all(v.dtype == torch.int64 for v, _ in batch.bags.values())


def test_decoded_row_groups_keep_each_id_column_in_the_narrowest_type_of_its_vocabulary(world: World) -> None:
    # Prepare: users in both shards; user 3 gets no rows (limit 0), so its shard's read is empty
    ds = Dataset.open(world.path)
    users, limit = np.array([0, 1, 3]), np.array([3, 5, 0])

    # Execute
    joined, offsets = ds.clients_joined(users, limit=limit)

    # Assert: the same values as a plain read, while every cached group holds narrowed ids
    _assert_examples_equal(joined.slice(0, 8), Examples.concat([ds.client(0), ds.client(1)]))
    assert offsets.tolist() == [0, 3, 8, 8]
    tables = list(ds._imp[0]._cache._tables.values())
    assert tables
    for table in tables:
        for name in table.column_names:
            spec = next((f for f in ds.schema.fields if f.name == name), None)
            if spec is not None and spec.kind is not FieldKind.DENSE and not spec.is_bag:
                assert table.schema.field(name).type == pa.int8()  # every vocabulary here < 128


@pytest.mark.parametrize("user", [2, -1, len(ROWS_PER_USER)])
def test_client_without_rows_raises(world: World, user: int) -> None:
    ds = Dataset.open(world.path)
    with pytest.raises(DataError, match=rf"user_id {user} has no impressions"):
        ds.client(user)


def test_labels_are_the_label_columns_of_clients_in_order(world: World) -> None:
    ds = Dataset.open(world.path)
    users = np.array([4, 0, 5])
    got = ds.labels(users)
    joined = ds.clients(users)
    assert set(got) == set(LABEL_COLUMNS)
    for key in LABEL_COLUMNS:
        assert np.array_equal(got[key], np.concatenate([ex.labels[key] for ex in joined])), key
    assert all(len(v) == 0 for v in ds.labels(np.array([], dtype=np.int64)).values())
    with pytest.raises(DataError, match="user_id 2 has no impressions"):
        ds.labels(np.array([0, 2]))
    # training's read: the same columns without the bookkeeping timestamp
    untimed = ds.labels(users, with_time=False)
    assert set(untimed) == set(LABEL_COLUMNS) - {"timestamp"}
    assert all(np.array_equal(untimed[k], got[k]) for k in untimed)
    assert set(ds.labels(np.array([], dtype=np.int64), with_time=False)) == set(untimed)


def test_load_equals_concat_of_all_clients(world: World) -> None:
    # Prepare
    ds = Dataset.open(world.path)
    clients = [ds.client(int(u)) for u in ds.user_ids]

    # Execute
    everything = ds.load()

    # Assert
    _assert_examples_equal(everything, Examples.concat(clients))
    assert everything.labels["timestamp"].tolist() == world.imp.column("timestamp").to_pylist()


def test_load_of_some_users_is_sorted_by_user(world: World) -> None:
    ds = Dataset.open(world.path)
    some = ds.load(np.array([4, 0]))
    _assert_examples_equal(some, Examples.concat([ds.client(0), ds.client(4)]))


@pytest.mark.parametrize("share", [0.0, 1.0])  # always scan / never scan
def test_load_of_users_reads_the_same_rows_either_way(world: World, share: float,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: repeats, an unordered list and an id with no impressions
    ds = Dataset.open(world.path)
    wanted = np.array([3, 1, 3, 10_000, 0])
    monkeypatch.setattr(store_module, "_SCAN_SHARE", share)

    # Execute
    some = ds.load(wanted)

    # Assert
    _assert_examples_equal(some, Examples.concat([ds.client(0), ds.client(1), ds.client(3)]))


def test_load_of_few_users_does_not_scan_the_shards(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = Dataset.open(world.path)
    monkeypatch.setattr(store_module, "_SCAN_SHARE", 0.5)  # user 1 holds 5 of the rows
    scans = []
    for f in ds._imp:
        monkeypatch.setattr(f.file, "read", lambda *a, **k: scans.append(1))

    assert len(ds.load(np.array([1]))) == 5

    assert scans == []


def test_load_of_some_users_keeps_nothing_cached_and_reads_few_groups_at_a_time(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: at most one row group decoded at a time (the world's groups hold 2 rows)
    ds = Dataset.open(world.path)
    monkeypatch.setattr(store_module, "_ONE_OFF_GROUPS", 1)
    files = [*ds._imp, *ds._truth, ds._users]
    cached = {id(f._cache): f._cache for f in files if f._cache is not None}

    # Execute
    some = ds.load(np.array([4, 0, 3]))

    # Assert: the same rows as the cached reads, and no cache holds a group of them
    assert all(not c._tables for c in cached.values())
    _assert_examples_equal(some, Examples.concat([ds.client(0), ds.client(3), ds.client(4)]))
    assert any(c._tables for c in cached.values())  # client() does cache


@pytest.mark.parametrize(("first", "last", "limit", "cuts"), [
    ([0, 0, 1, 2, 2, 5], [0, 1, 1, 2, 4, 5], 2, [0, 3, 4, 5, 6]),
    ([0, 3], [2, 3], 2, [0, 1, 2]),  # a range wider than the limit is a run of its own
    ([], [], 4, [0, 0]),
])
def test_batches_of_ranges_touch_at_most_limit_groups(first: list[int], last: list[int], limit: int,
                                                      cuts: list[int]) -> None:
    assert store_module._batches(np.array(first, dtype=np.int64), np.array(last, dtype=np.int64), limit) == cuts


def test_every_array_of_some_users_is_writable(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # a column arrow hands over without a copy is read-only; torch warns on those
    ds = Dataset.open(world.path)
    monkeypatch.setattr(store_module, "_SCAN_SHARE", 1.0)  # load() reads the users' rows, not a scan
    for ex in (ds.client(1), ds.load(np.array([1])), *ds.clients(np.array([0, 3]))):
        arrays = [*ex.ids.values(), *ex.dense.values(), *ex.labels.values(), *(a for bag in ex.bags.values() for a in bag)]
        assert all(a.flags.writeable for a in arrays)


def test_to_batch_of_a_client(world: World) -> None:
    batch = Dataset.open(world.path).client(1).to_batch()
    assert len(batch) == 5
    assert batch.bags["apps"][1].shape == (5,)


# -- split_by_time ---------------------------------------------------------------------------

def test_split_by_time_takes_each_users_last_rows(world: World) -> None:
    # Prepare
    data = Dataset.open(world.path).load()
    users = data.ids["user_id"]

    # Execute
    train, test = split_by_time(users, 0.25)

    # Assert
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(users)))
    assert len(np.intersect1d(train, test)) == 0
    ts = data.labels["timestamp"]
    for u, n in enumerate(ROWS_PER_USER):
        rows = np.flatnonzero(users == u)
        n_test = int(np.floor(n * 0.25 + 0.5))
        assert np.array_equal(np.intersect1d(rows, test), rows[n - n_test :])
        if n_test and n - n_test:
            assert ts[np.intersect1d(rows, train)].max() < ts[np.intersect1d(rows, test)].min()
    # 3 -> 1, 5 -> 1, 1 -> 0, 4 -> 1, 2 -> 1 (floor(x + 0.5))
    assert len(test) == 4


@settings(max_examples=100, deadline=None)
@given(
    counts=st.lists(st.integers(1, 12), max_size=10),
    fraction=st.floats(0.0, 0.99),
)
def test_split_by_time_is_a_partition_with_a_suffix_per_user(counts: list[int], fraction: float) -> None:
    # Prepare
    users = np.repeat(np.arange(len(counts)) * 3, counts)

    # Execute
    train, test = split_by_time(users, fraction)

    # Assert
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(users)))
    is_test = np.zeros(len(users), bool)
    is_test[test] = True
    start = 0
    for n in counts:
        flags = is_test[start : start + n]
        n_test = int(np.floor(n * fraction + 0.5))
        assert flags.tolist() == [False] * (n - n_test) + [True] * n_test
        start += n


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_split_by_time_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction must be in"):
        split_by_time(np.array([0, 0, 1]), fraction)


def test_split_by_time_of_nothing() -> None:
    train, test = split_by_time(np.zeros(0, np.int64), 0.2)
    assert len(train) == 0 and len(test) == 0


# -- validation ------------------------------------------------------------------------------

def _rewrite(path: Path, edit) -> None:  # noqa: ANN001 - edit: pa.Table -> pa.Table
    pq.write_table(edit(pq.read_table(path)), path)


def _edit_manifest(path: Path, edit) -> None:  # noqa: ANN001 - edit: dict -> None
    mpath = path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    edit(manifest)
    mpath.write_text(json.dumps(manifest))


def test_missing_manifest(world: World) -> None:
    (world.path / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"ds/manifest\.json: not found"):
        Dataset.open(world.path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere/manifest\.json: not found"):
        Dataset.open(tmp_path / "nowhere")


def test_manifest_not_json(world: World) -> None:
    (world.path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json: not valid JSON"):
        Dataset.open(world.path)


def test_foreign_format_version(world: World) -> None:
    _edit_manifest(world.path, lambda m: m.update(format_version=99))
    with pytest.raises(DataError, match=r"manifest\.json: format_version 99 is not 1"):
        Dataset.open(world.path)


@pytest.mark.parametrize("key", ["schema", "counts"])
def test_manifest_missing_a_section(world: World, key: str) -> None:
    _edit_manifest(world.path, lambda m: m.pop(key))
    with pytest.raises(DataError, match=rf"manifest\.json: .*{key!r}"):
        Dataset.open(world.path)


@pytest.mark.parametrize("rel", ["ads.parquet", "index.parquet", "impressions/part-00001.parquet",
                                 "truth/part-00000.parquet"])
def test_listed_file_missing(world: World, rel: str) -> None:
    (world.path / rel).unlink()
    with pytest.raises(DataError, match=rf"{rel}: file listed in the manifest is missing"):
        Dataset.open(world.path)


@pytest.mark.parametrize("rel", ["users.parquet", "impressions/part-00000.parquet", "truth/part-00001.parquet",
                                 "index.parquet"])
def test_truncated_file(world: World, rel: str) -> None:
    # Prepare
    fpath = world.path / rel
    data = fpath.read_bytes()
    fpath.write_bytes(data[: len(data) // 2])

    # Execute / Assert
    with pytest.raises(DataError, match=rf"{rel}: not a readable parquet file \(truncated\?\)"):
        Dataset.open(world.path)


@pytest.mark.parametrize(
    ("rel", "column"),
    [
        ("users.parquet", "apps"),
        ("ads.parquet", "advertiser"),
        ("impressions/part-00001.parquet", "hour"),
        ("impressions/part-00000.parquet", "click"),
        ("impressions/part-00000.parquet", "ad_id"),
        ("truth/part-00001.parquet", "p_cvr"),
        ("devices.parquet", "latency_ms"),
    ],
)
def test_missing_column(world: World, rel: str, column: str) -> None:
    _rewrite(world.path / rel, lambda t: t.drop_columns([column]))
    with pytest.raises(DataError, match=rf"{rel}: missing column {column!r}"):
        Dataset.open(world.path)


@pytest.mark.parametrize(
    ("rel", "column", "arrow_type", "shown"),
    [
        ("users.parquet", "age", pa.float64(), "double"),
        ("users.parquet", "apps", pa.list_(pa.float32()), r"list<element: float>"),
        ("ads.parquet", "advertiser", pa.string(), "string"),
        ("impressions/part-00000.parquet", "click", pa.int64(), "int64"),
        ("impressions/part-00001.parquet", "label_observed", pa.int8(), "int8"),
        ("devices.parquet", "online_prob", pa.float64(), "double"),
    ],
)
def test_wrong_dtype(world: World, rel: str, column: str, arrow_type: pa.DataType, shown: str) -> None:
    def cast(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index(column)
        return t.set_column(i, column, t.column(column).cast(arrow_type))

    _rewrite(world.path / rel, cast)
    with pytest.raises(DataError, match=rf"{rel}: column {column!r} has type {shown}; expected"):
        Dataset.open(world.path)


def _set(column: str, index: int, value: object):  # noqa: ANN202 - an edit for _rewrite
    def edit(t: pa.Table) -> pa.Table:
        values = t.column(column).to_pylist()
        values[index] = value
        i = t.schema.get_field_index(column)
        return t.set_column(i, column, pa.array(values, t.schema.field(i).type))
    return edit


@pytest.mark.parametrize(
    ("rel", "column", "value", "match"),
    [
        ("users.parquet", "age", None, r"users\.parquet: column 'age' has 1 null values"),
        ("users.parquet", "age", 5, r"users\.parquet: column 'age' holds ids in \[\d, 5\], outside its vocabulary \[0, 5\)"),
        ("users.parquet", "apps", [1, 30], r"column 'apps' holds ids in \[\d+, 30\], outside its vocabulary \[0, 30\)"),
        ("ads.parquet", "advertiser", -1, r"ads\.parquet: column 'advertiser' holds ids in \[-1, \d\]"),
        ("impressions/part-00000.parquet", "ad_id", 7, r"part-00000\.parquet: column 'ad_id' holds ids in \[\d, 7\]"),
        ("impressions/part-00001.parquet", "hour", None, r"part-00001\.parquet: column 'hour' has 1 null"),
        ("impressions/part-00000.parquet", "user_id", 6, r"column 'user_id' holds ids in \[\d, 6\], outside its vocabulary \[0, 6\)"),
    ],
)
def test_null_or_out_of_vocabulary_ids_are_refused_at_open(world: World, rel: str, column: str, value: object,
                                                          match: str) -> None:
    # a null would have come back as -2**31 and an id past the vocabulary as itself
    _rewrite(world.path / rel, _set(column, 0, value))
    with pytest.raises(DataError, match=match):
        Dataset.open(world.path)


def test_an_index_or_a_table_that_does_not_fit_the_shards_is_refused(world: World) -> None:
    _edit_manifest(world.path, lambda m: m["counts"].pop("shards"))
    with pytest.raises(DataError, match=r"manifest\.json: counts\.shards must be an int >= 0; got None"):
        Dataset.open(world.path)


@pytest.mark.parametrize(
    ("rel", "edit", "match"),
    [
        ("index.parquet", lambda t: t.drop_columns(["shard"]), r"index\.parquet: missing column 'shard'"),
        ("index.parquet", lambda t: t.drop_columns(["count"]), r"index\.parquet: missing column 'count'"),
        ("index.parquet", _set("count", 0, 99), r"index\.parquet: user 0 has rows \[0, 99\) but shard 0 holds"),
        ("index.parquet", _set("shard", 0, 9), r"index\.parquet: shard numbers must lie in \[0, \d\)"),
        ("users.parquet", lambda t: t.slice(0, 3), r"users\.parquet: 3 rows, fewer than the manifest's schema\.num_users = 6"),
        ("ads.parquet", lambda t: t.slice(0, 5), r"ads\.parquet: 5 rows, fewer than the manifest's schema\.num_ads = 7"),
        ("truth/part-00000.parquet", lambda t: t.slice(0, 1), r"truth/part-00000\.parquet: 1 rows for the \d+ of part-00000"),
    ],
)
def test_malformed_index_and_short_tables_are_one_line_errors(world: World, rel: str, edit, match: str) -> None:  # noqa: ANN001
    _rewrite(world.path / rel, edit)
    with pytest.raises(DataError, match=match):
        Dataset.open(world.path)


def test_a_damaged_data_page_is_a_data_error_naming_the_file(world: World) -> None:
    # the footer still opens; the pages do not decode
    fpath = world.path / "impressions" / "part-00000.parquet"
    data = bytearray(fpath.read_bytes())
    data[4:200] = b"\x5a" * 196
    fpath.write_bytes(bytes(data))
    ds = Dataset.open(world.path)
    with pytest.raises(DataError, match=r"part-00000\.parquet: cannot read its data .*the file is damaged"):
        ds.load()
    with pytest.raises(DataError, match=r"part-00000\.parquet: cannot read its data"):
        ds.client(0)


def test_checksum_mismatch_only_with_verify(world: World) -> None:
    # Prepare: a valid parquet file with other content
    _rewrite(world.path / "ads.parquet",
             lambda t: t.set_column(1, "advertiser", pa.array(np.zeros(t.num_rows), pa.int32())))

    # Execute / Assert
    assert Dataset.open(world.path).ads.ids["advertiser"].tolist() == [0] * NUM_ADS
    with pytest.raises(DataError, match=r"ads\.parquet: checksum does not match the manifest"):
        Dataset.open(world.path, verify_checksums=True)


# -- writer ----------------------------------------------------------------------------------

def test_writer_refuses_existing_dir_and_leaves_it_untouched(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    # Execute / Assert
    with pytest.raises(DataError, match=r"ds already exists; pass --overwrite"):
        DatasetWriter(out, schema=SCHEMA, generator="test", params={})
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "ds.partial").exists()


def test_writer_overwrite_replaces(world: World, rng: np.random.Generator) -> None:
    # Prepare
    users, ads, imp, _ = _tables(rng)
    (world.path / "extra.txt").write_text("old")

    # Execute
    writer = DatasetWriter(world.path, schema=SCHEMA, generator="again", params={}, overwrite=True)
    writer.write_users(users)
    writer.write_ads(ads)
    writer.write_impressions(imp)
    writer.close()

    # Assert
    ds = Dataset.open(world.path, verify_checksums=True)
    assert ds.manifest["generator"] == "again"
    assert not ds.has_truth and not (world.path / "extra.txt").exists()
    assert ds.load().ids["ad_id"].tolist() == imp.column("ad_id").to_pylist()


def test_writer_overwrite_replaces_datasets_only(tmp_path: Path) -> None:
    # --out data instead of data/demo must not wipe data/
    out = tmp_path / "data"
    (out / "demo").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"data is not an adfed dataset \(no manifest.json\); --overwrite replaces"):
        DatasetWriter(out, schema=SCHEMA, generator="test", params={}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["demo", "notes.txt"]
    assert not (tmp_path / "data.partial").exists()
    # an empty directory may be replaced
    (tmp_path / "empty").mkdir()
    DatasetWriter(tmp_path / "empty", schema=SCHEMA, generator="test", params={}, overwrite=True).abort()


def test_writer_removes_its_own_leftover_partial_but_no_other(tmp_path: Path) -> None:
    crashed = DatasetWriter(tmp_path / "ds", schema=SCHEMA, generator="test", params={})
    assert (tmp_path / "ds.partial").is_dir()  # a crash leaves it behind
    del crashed
    DatasetWriter(tmp_path / "ds", schema=SCHEMA, generator="test", params={}).abort()
    foreign = tmp_path / "x.partial"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"x.partial exists and was not left by an adfed writer"):
        DatasetWriter(tmp_path / "x", schema=SCHEMA, generator="test", params={})
    assert (foreign / "keep.txt").read_text() == "mine"


def test_abort_leaves_no_trace(tmp_path: Path, rng: np.random.Generator) -> None:
    users, _, imp, _ = _tables(rng)
    writer = DatasetWriter(tmp_path / "ds", schema=SCHEMA, generator="test", params={})
    writer.write_users(users)
    writer.write_impressions(imp)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "chunks",
    [
        [[1, 0]],  # users out of order within a chunk
        [[3], [1]],  # a later chunk goes back
        [[0, 1], [1, 3]],  # a user split across chunks
    ],
)
def test_writer_rejects_unsorted_users(tmp_path: Path, rng: np.random.Generator, chunks: list[list[int]]) -> None:
    # Prepare
    _, _, imp, _ = _tables(rng)
    writer = DatasetWriter(tmp_path / "ds", schema=SCHEMA, generator="test", params={})
    by_user = {u: _rows(imp, [u]) for u in range(len(ROWS_PER_USER))}
    parts = [pa.concat_tables([by_user[u] for u in c]) for c in chunks]

    # Execute / Assert
    with pytest.raises(DataError, match="sorted by user_id"):
        for part in parts:
            writer.write_impressions(part)
    writer.abort()


def test_writer_rejects_unsorted_timestamps(tmp_path: Path, rng: np.random.Generator) -> None:
    # Prepare
    _, _, imp, _ = _tables(rng)
    rows = _rows(imp, [1])
    shuffled = rows.take(pa.array([0, 2, 1, 3, 4]))
    writer = DatasetWriter(tmp_path / "ds", schema=SCHEMA, generator="test", params={})

    # Execute / Assert
    with pytest.raises(DataError, match="timestamp"):
        writer.write_impressions(shuffled)
    writer.abort()


def test_writer_rejects_misaligned_truth(tmp_path: Path, rng: np.random.Generator) -> None:
    _, _, imp, truth = _tables(rng)
    writer = DatasetWriter(tmp_path / "ds", schema=SCHEMA, generator="test", params={})
    with pytest.raises(DataError, match="truth chunk must align"):
        writer.write_impressions(imp, truth.slice(1))
    writer.abort()


@pytest.mark.parametrize("with_truth_first", [True, False])
def test_writer_rejects_truth_in_only_some_chunks(
    tmp_path: Path, rng: np.random.Generator, small_layout: None, with_truth_first: bool
) -> None:
    # Prepare
    _, _, imp, truth = _tables(rng)
    user_col = imp.column("user_id").to_numpy()
    first, second = (pa.array(np.isin(user_col, c)) for c in ([0], [1]))
    writer = DatasetWriter(tmp_path / "ds", schema=SCHEMA, generator="test", params={})
    truths = (truth.filter(first), None) if with_truth_first else (None, truth.filter(second))

    # Execute / Assert
    writer.write_impressions(imp.filter(first), truths[0])
    with pytest.raises(DataError, match="truth must be given for every impressions chunk or none"):
        writer.write_impressions(imp.filter(second), truths[1])
    writer.abort()


def test_writer_output_is_deterministic(tmp_path: Path, small_layout: None) -> None:
    # Prepare
    def build(name: str) -> dict[str, str]:
        users, ads, imp, truth = _tables(np.random.default_rng(5))
        writer = DatasetWriter(tmp_path / name, schema=SCHEMA, generator="test", params={})
        writer.write_users(users)
        writer.write_ads(ads)
        writer.write_impressions(imp, truth)
        return json.loads((writer.close() / "manifest.json").read_text())["files"]

    # Execute / Assert
    assert build("a") == build("b")


def test_clients_equals_client_by_client_in_the_given_order(world: World) -> None:
    ds = Dataset.open(world.path)
    users = np.array([4, 0, 5, 1, 3])
    for with_truth in (True, False):
        got = ds.clients(users, with_truth=with_truth)
        assert len(got) == len(users)
        for u, ex in zip(users, got, strict=True):
            _assert_examples_equal(ex, ds.client(int(u), with_truth=with_truth))
    assert ds.clients(np.array([], dtype=np.int64)) == []


def test_clients_with_an_unknown_user_raises(world: World) -> None:
    ds = Dataset.open(world.path)
    with pytest.raises(DataError, match="user_id 2 has no impressions"):
        ds.clients(np.array([0, 2]))


def test_row_group_cache_is_bounded_in_bytes() -> None:
    from adfed.data import store

    cache = store._TableCache(max_bytes=1)  # noqa: SLF001 - the bound itself is under test
    small = pa.table({"x": [1, 2, 3]})
    cache.put("a", small)
    cache.put("b", small)
    assert cache.get("a") is None and cache.get("b") is small  # the older one went
    assert cache.nbytes == small.nbytes


# -- reading many users at once (issue 25) -----------------------------------------------------


@pytest.mark.parametrize("users", [[0, 1, 3, 4, 5], [4, 0, 5, 1, 3], [5, 5, 0], [3]])
@pytest.mark.parametrize("with_truth", [True, False])
def test_clients_joined_is_each_users_rows_in_the_given_order(world: World, users: list[int],
                                                              with_truth: bool) -> None:
    # Prepare: 2-row groups and 4-row shards, so users span groups and shards
    ds = Dataset.open(world.path)

    # Execute
    joined, offsets = ds.clients_joined(np.array(users), with_truth=with_truth)

    # Assert: every user's slice equals its rows computed row by row
    assert offsets.tolist() == np.concatenate([[0], np.cumsum([ROWS_PER_USER[u] for u in users])]).tolist()
    for i, u in enumerate(users):
        got = _as_lists(joined.slice(int(offsets[i]), int(offsets[i + 1])))
        want = _expected(world, u)
        if not with_truth:
            want.pop("truth_p_click")
        assert {k: got[k] for k in want} == want
        assert set(got) == set(want)


def test_clients_joined_with_a_limit_reads_each_users_first_rows(world: World) -> None:
    ds = Dataset.open(world.path)
    users, limit = np.array([4, 1, 0, 5]), np.array([2, 5, 0, 9])

    joined, offsets = ds.clients_joined(users, limit=limit, with_truth=False)

    assert np.diff(offsets).tolist() == [2, 5, 0, 2]  # capped at the user's rows
    for i, u in enumerate(users.tolist()):
        full = ds.client(u, with_truth=False)
        _assert_examples_equal(joined.slice(int(offsets[i]), int(offsets[i + 1])),
                               full.slice(0, int(offsets[i + 1] - offsets[i])))


def test_clients_joined_of_no_users_is_empty(world: World) -> None:
    joined, offsets = Dataset.open(world.path).clients_joined(np.array([], dtype=np.int64))
    assert len(joined) == 0 and offsets.tolist() == [0]


def test_each_row_group_is_decoded_once_per_call(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: no cache, so every group a call needs is read by that call
    monkeypatch.setattr(store_module, "_CACHE_BYTES", 0)
    monkeypatch.setattr(store_module, "_USER_CACHE_BYTES", 0)
    ds = Dataset.open(world.path)
    reads: list[tuple[str, int]] = []
    real = pq.ParquetFile.read_row_group

    def counting(self: pq.ParquetFile, i: int, *args: object, **kwargs: object) -> pa.Table:
        reads.append((str(self.reader), i))  # one entry per decode
        return real(self, i, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)

    # Execute: users out of order, user 1's 5 rows spanning three 2-row groups
    ds.clients_joined(np.array([5, 1, 0, 4, 3]), with_truth=True)

    # Assert
    assert len(reads) == len(set(reads))
    assert reads  # the read went through read_row_group


def test_row_groups_come_from_the_cache_on_a_second_read(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = Dataset.open(world.path)
    ds.clients_joined(np.array([0, 1, 3]), with_truth=False)
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: reads.append(i) or real(self, i, *a, **k))

    ds.clients_joined(np.array([3, 1, 0]), with_truth=False)

    assert reads == []
