"""Streaming a world to disk: layout, dtypes, determinism, errors, describe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adfed.data.layout import DEVICE_COLUMNS, MANIFEST
from adfed.data.schema import LABEL_COLUMNS, TRUTH_COLUMNS, Schema
from adfed.errors import DataError
from data_gen.describe import describe
from data_gen.generate import GENERATOR, generate
from data_gen.params import WorldParams, build_schema

PARAMS = WorldParams(num_users=3000, num_ads=400)
SEED = 3
CHUNK = 700  # several chunks, the last one short


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "world"
    return generate(out, PARAMS, seed=SEED, workers=1, chunk_users=CHUNK)


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _table(path: Path, name: str) -> pa.Table:
    return pq.read_table(path / name)


def test_output_is_byte_identical_across_runs_and_worker_counts(
        dataset: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "two_workers", PARAMS, seed=SEED, workers=2, chunk_users=CHUNK)
    assert _manifest(again) == _manifest(dataset)  # includes the sha256 of every file
    other = generate(tmp_path / "other_seed", PARAMS, seed=SEED + 1, workers=1, chunk_users=CHUNK)
    assert _manifest(other)["files"] != _manifest(dataset)["files"]


def test_manifest_records_generator_params_schema_and_counts(dataset: Path) -> None:
    m = _manifest(dataset)
    assert m["generator"] == GENERATOR
    assert m["params"] == {**PARAMS.to_dict(), "seed": SEED}
    assert WorldParams.from_dict(m["params"]) == PARAMS
    assert Schema.from_dict(m["schema"]) == build_schema(PARAMS)
    assert m["counts"]["users"] == m["counts"]["devices"] == PARAMS.num_users
    assert m["counts"]["ads"] == PARAMS.num_ads
    assert m["generation"] == {"chunk_users": CHUNK}


def test_column_types_follow_the_schema(dataset: Path) -> None:
    schema = build_schema(PARAMS)
    imp = pq.read_schema(dataset / "impressions" / "part-00000.parquet")
    assert imp.field("user_id").type == pa.int64()
    assert imp.field("ad_id").type == pa.int32()
    for name in ("hour", "slot", "network"):
        assert imp.field(name).type == pa.int32()
    for name, dtype in LABEL_COLUMNS.items():
        assert imp.field(name).type.to_pandas_dtype() == np.dtype(dtype), name
    truth = pq.read_schema(dataset / "truth" / "part-00000.parquet")
    assert {f.name: f.type.to_pandas_dtype() for f in truth} == {
        k: np.dtype(v) for k, v in TRUTH_COLUMNS.items()}
    users = _table(dataset, "users.parquet")
    assert users.column_names == ["user_id"] + [f.name for f in schema.fields
                                                if f.entity.value == "user" and f.name != "user_id"]
    for spec in schema.fields:
        if spec.entity.value != "user" or spec.name == "user_id":
            continue
        expected = pa.list_(pa.int32()) if spec.is_bag else pa.int32()
        assert users.schema.field(spec.name).type == expected, spec.name
    devices = pq.read_schema(dataset / "devices.parquet")
    assert devices.names == ["user_id", *DEVICE_COLUMNS]
    ads = _table(dataset, "ads.parquet")
    assert ads.column_names == ["ad_id", "advertiser_id", "ad_category", "creative_type", "bid"]
    np.testing.assert_array_equal(ads.column("ad_id").to_numpy(), np.arange(PARAMS.num_ads))


def test_values_are_inside_their_vocabularies(dataset: Path) -> None:
    schema = build_schema(PARAMS)
    tables = {"user": _table(dataset, "users.parquet"), "ad": _table(dataset, "ads.parquet"),
              "context": _table(dataset, "impressions/part-00000.parquet")}
    for spec in schema.fields:
        col = tables[spec.entity.value].column(spec.name).combine_chunks()
        values = (col.values if spec.is_bag else col).to_numpy()
        assert values.min() >= 0 and values.max() < spec.vocab_size, spec.name
        if spec.is_bag:
            assert np.diff(col.offsets.to_numpy()).max() <= spec.max_len, spec.name


def test_impressions_are_sorted_and_users_in_order(dataset: Path) -> None:
    imp = _table(dataset, "impressions/part-00000.parquet")
    users = imp.column("user_id").to_numpy()
    ts = imp.column("timestamp").to_numpy()
    assert np.all(np.diff(users) >= 0)
    assert np.all((np.diff(ts) >= 0) | (np.diff(users) > 0))
    assert ts.min() >= 0 and ts.max() < PARAMS.days * 86_400
    np.testing.assert_array_equal(_table(dataset, "users.parquet").column("user_id").to_numpy(),
                                  np.arange(PARAMS.num_users))


def test_rerank_requests(dataset: Path) -> None:
    req = _table(dataset, "requests.parquet").to_pandas()
    n = PARAMS.candidates_per_request
    share = req.user_id.nunique() / PARAMS.num_users
    assert 0.05 <= share <= 0.15
    assert req.request_id.is_unique
    assert (req.timestamp // 86_400 == PARAMS.days).all(), "after the impression window"
    bids = _table(dataset, "ads.parquet").column("bid").to_numpy()
    for row in req.itertuples():
        assert len(set(row.candidates)) == n
        assert len(row.p_click) == len(row.p_cvr) == len(row.bid) == n
        assert 0 < min(row.p_cvr) and max(row.p_cvr) < 1
        np.testing.assert_array_equal(row.bid, bids[row.candidates])


def test_devices_are_heterogeneous_and_heavy_tailed(dataset: Path) -> None:
    dev = _table(dataset, "devices.parquet").to_pandas()
    speed = dev.compute_speed
    assert speed.max() > 8 * speed.median()
    assert dev.bandwidth_up_kbps.corr(dev.bandwidth_down_kbps) > 0.5
    for col in ("online_prob", "dropout_prob"):
        assert dev[col].between(0, 1).all()
    assert 0.04 <= dev.dropout_prob.mean() <= 0.12
    assert dev.dropout_prob.quantile(0.99) > 3 * dev.dropout_prob.median()


def test_describe_reports_the_worlds_statistics(dataset: Path) -> None:
    stats = describe(dataset)
    imp = pq.read_table(dataset / "impressions").to_pandas()
    assert stats["impressions"] == len(imp)
    assert stats["click_rate"] == pytest.approx(imp.click.mean())
    seen = imp[(imp.click == 1) & imp.label_observed]
    assert stats["cvr_among_clicks"] == pytest.approx(seen.conversion.mean())
    counts = imp.groupby("user_id").size()
    assert stats["rows_per_user_median"] == counts.median()
    assert stats["rows_per_user_max"] == counts.max()
    share = 1 - imp.groupby("user_id").label_observed.first().mean()
    assert stats["label_unobserved_user_share"] == pytest.approx(share)
    assert 0.6 <= stats["oracle_cvr_auc"] <= 0.95
    assert len(stats["personas"]) == PARAMS.num_personas
    assert sum(p["impressions"] for p in stats["personas"]) == len(imp)
    json.dumps(stats)  # JSON-ready


def test_progress_reports_every_user(tmp_path: Path) -> None:
    seen: list[int] = []
    generate(tmp_path / "w", WorldParams(num_users=250, num_ads=50), seed=0, workers=1,
             chunk_users=100, progress=seen.append)
    assert seen == [100, 100, 50]


def test_existing_output_needs_overwrite(dataset: Path) -> None:
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        generate(dataset, PARAMS, seed=SEED, workers=1)


def test_a_failed_run_leaves_nothing_behind(tmp_path: Path) -> None:
    def boom(_: int) -> None:
        raise RuntimeError("interrupted")

    out = tmp_path / "w"
    with pytest.raises(RuntimeError, match="interrupted"):
        generate(out, WorldParams(num_users=300, num_ads=50), seed=0, workers=1,
                 chunk_users=100, progress=boom)
    assert not out.exists() and not out.with_name("w.partial").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"workers": 0}, "workers must be an int >= 1; got 0"),
    ({"chunk_users": 0}, "chunk_users must be an int >= 1; got 0"),
    ({"seed": -1}, "seed must be an int >= 0; got -1"),
])
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(tmp_path / "w", WorldParams(num_users=10, num_ads=30), **args)
    assert not (tmp_path / "w").exists()


def test_describe_rejects_a_directory_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no manifest.json; not a dataset directory"):
        describe(tmp_path)
