"""Real-dataset importers: the shared real copies in, the dataset layout out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from adfed.data.importers import IMPORTERS, import_dataset, register
from adfed.data.importers.clients import plan_clients
from adfed.data.schema import LABEL_COLUMNS, Entity, FieldKind, ParamGroup, Visibility
from adfed.errors import DataError

REPO = Path(__file__).resolve().parents[3]
REAL = Path(os.environ.get("ADFED_REAL_DATA", REPO / ".." / "shared" / "data" / "real"))
TD = REAL / "talkingdata_adtracking" / "train_sample.csv"
TB = REAL / "taobao_user_behavior" / "UserBehavior.csv"
ALI = REAL / "ali_ccp"
SOURCES = {"talkingdata": TD, "taobao": TB, "aliccp": ALI}


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data {path} absent (set ADFED_REAL_DATA to the shared data/real)")
    return path


def _load(path: Path) -> dict:
    return {
        "manifest": json.loads((path / "manifest.json").read_text()),
        "users": pq.read_table(path / "users.parquet").to_pandas(),
        "ads": pq.read_table(path / "ads.parquet").to_pandas(),
        "imp": pq.read_table(path / "impressions").to_pandas(),
    }


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each format imported once with defaults (lazily, so a missing source only skips)."""
    cache: dict[str, dict] = {}

    def get(fmt: str) -> dict:
        if fmt not in cache:
            out = tmp_path_factory.mktemp(fmt) / "ds"
            cache[fmt] = {"path": import_dataset(fmt, _need(SOURCES[fmt]), out),
                          **_load(out)}
        return cache[fmt]

    return {"get": get}


# -- the layout contract, for every format ----------------------------------------------
@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_layout_contract(imported: dict, fmt: str) -> None:
    ds = imported["get"](fmt)
    users, ads, imp, man = ds["users"], ds["ads"], ds["imp"], ds["manifest"]
    n_users, n_ads = len(users), len(ads)
    assert users["user_id"].tolist() == list(range(n_users))
    assert ads["ad_id"].tolist() == list(range(n_ads))
    assert set(imp["user_id"]) == set(range(n_users))  # dense: every client has rows
    assert set(imp["ad_id"]) == set(range(n_ads))
    keys = list(zip(imp["user_id"], imp["timestamp"], strict=True))
    assert keys == sorted(keys)
    for col, dtype in LABEL_COLUMNS.items():
        assert str(imp[col].dtype) == dtype
    assert (imp["conversion"] <= imp["click"]).all() and imp["label_observed"].all()
    assert ads["bid"].dtype == np.float32 and (ads["bid"] == 1.0).all()
    assert "raw_user" in users and users["raw_user"].is_unique
    assert man["generator"] == f"adfed.import.{fmt}"
    assert {"users.parquet", "ads.parquet", "index.parquet"} <= set(man["files"])
    for absent in ("truth", "requests.parquet", "devices.parquet"):
        assert not (ds["path"] / absent).exists()


@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_schema_matches_data(imported: dict, fmt: str) -> None:
    from adfed.data.schema import Schema

    ds = imported["get"](fmt)
    schema = Schema.from_dict(ds["manifest"]["schema"])
    tables = {Entity.USER: ds["users"], Entity.AD: ds["ads"], Entity.CONTEXT: ds["imp"]}
    assert schema.num_users == len(ds["users"]) and schema.num_ads == len(ds["ads"])
    uid = schema.field("user_id")
    assert (uid.visibility, uid.group) == (Visibility.PRIVATE, ParamGroup.LOCAL)
    for spec in schema.fields:
        col = tables[spec.entity][spec.name]
        assert spec.description
        if spec.kind is FieldKind.DENSE:
            assert col.dtype == np.float32
            continue
        assert spec.vocab_size == col.max() + 1 == col.nunique(), spec.name
        if spec.name != "user_id":
            assert spec.visibility is Visibility.CLOUD


# -- per-format content -------------------------------------------------------------------
def test_talkingdata_rows_and_labels_match_source(imported: dict) -> None:
    ds = imported["get"]("talkingdata")
    raw = pd.read_csv(TD)
    raw.columns = [c.lstrip(".") for c in raw.columns]
    imp, users = ds["imp"], ds["users"]
    assert len(imp) == 100_000 and int(imp["conversion"].sum()) == 227
    assert (imp["click"] == 1).all()
    assert len(users) == raw["ip"].nunique() == 34_857 and len(ds["ads"]) == 161
    per_ip = raw.groupby("ip")["is_attributed"].sum()
    got = imp.groupby("user_id")["conversion"].sum()
    np.testing.assert_array_equal(got.to_numpy(), per_ip.loc[users["raw_user"]].to_numpy())
    assert users["raw_user"].is_monotonic_increasing


def test_taobao_labels_are_buys_after_first_view(imported: dict) -> None:
    ds = imported["get"]("taobao")
    ev = pd.read_csv(TB, header=None, names=["u", "i", "c", "b", "t"])
    first_pv: dict[tuple[int, int], int] = {}
    for u, i, t in ev[ev.b == "pv"][["u", "i", "t"]].itertuples(index=False):
        first_pv[(u, i)] = min(t, first_pv.get((u, i), t))
    converted = {(u, i) for u, i, t in ev[ev.b == "buy"][["u", "i", "t"]].itertuples(index=False)
                 if (u, i) in first_pv and t >= first_pv[(u, i)]}
    imp, users, ads = ds["imp"], ds["users"], ds["ads"]
    pairs = list(zip(users["raw_user"].to_numpy()[imp["user_id"]],
                     ads["raw_ad"].to_numpy()[imp["ad_id"]], strict=True))
    assert len(imp) == len(first_pv) == 7_383
    assert {p for p, y in zip(pairs, imp["conversion"], strict=True) if y} == converted
    assert int(imp["conversion"].sum()) == len(converted)
    stats = ds["manifest"]["import_stats"]
    assert stats["buys_without_pv"] == 78 and stats["events"] == 10_000


def test_aliccp_concatenates_splits_in_order(imported: dict, tmp_path: Path) -> None:
    ds = imported["get"]("aliccp")
    imp = ds["imp"]
    assert len(imp) == 200 and len(ds["users"]) == 1
    assert int(imp["click"].sum()) == 12 and int(imp["conversion"].sum()) == 3
    assert imp["timestamp"].tolist() == list(range(200))
    train = pd.read_csv(ALI / "ali_ccp_train_sample.csv")
    assert imp["click"].iloc[:100].tolist() == train["click"].tolist()
    names = [s["file"] for s in ds["manifest"]["params"]["sources"]]
    assert names == [f"ali_ccp_{s}_sample.csv" for s in ("train", "val", "test")]
    # ads are (item, fields) combinations: every ad has one category
    assert len(ds["ads"]) >= ds["ads"]["f205"].nunique()
    one = import_dataset("aliccp", ALI / "ali_ccp_val_sample.csv", tmp_path / "one")
    assert _load(one)["manifest"]["counts"]["impressions"] == 50


# -- small clients ------------------------------------------------------------------------
def test_plan_clients_drop_and_group() -> None:
    counts = np.array([1, 10, 2, 3, 1, 7])
    drop, drop_from = plan_clients(counts, min_rows=5, small="drop", group_size=4)
    assert drop.tolist() == [-1, 0, -1, -1, -1, 1] and drop_from.tolist() == [1, 1]
    group, group_from = plan_clients(counts, min_rows=5, small="group", group_size=4)
    # users 0,2,3 reach 6 >= max(4, 5) rows; the lone tail user 4 (1 row) folds into them
    assert group.tolist() == [0, 1, 0, 0, 0, 2] and group_from.tolist() == [4, 1, 1]
    same, _ = plan_clients(counts, min_rows=1, small="group", group_size=4)
    assert same.tolist() == list(range(6))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"min_rows": 0}, "min_rows must be an int >= 1; got 0"),
    ({"small": "keep"}, "small_clients must be 'drop' or 'group'; got 'keep'"),
    ({"group_size": 0}, "group_size must be an int >= 1"),
])
def test_plan_clients_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"min_rows": 2, "small": "group", "group_size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        plan_clients(np.array([1, 3]), **args)


def test_talkingdata_drop_vs_group(tmp_path: Path) -> None:
    raw_counts = pd.read_csv(_need(TD), usecols=[0]).iloc[:, 0].value_counts()
    dropped = _load(import_dataset("talkingdata", TD, tmp_path / "d", min_rows=5,
                                   small_clients="drop"))
    assert len(dropped["users"]) == int((raw_counts >= 5).sum()) == 4_752
    assert len(dropped["imp"]) == int(raw_counts[raw_counts >= 5].sum())
    assert dropped["imp"].groupby("user_id").size().min() >= 5
    assert (dropped["users"]["grouped_from"] == 1).all()

    grouped = _load(import_dataset("talkingdata", TD, tmp_path / "g", min_rows=5,
                                   small_clients="group", group_size=20))
    users, sizes = grouped["users"], grouped["imp"].groupby("user_id").size()
    assert len(grouped["imp"]) == 100_000 and users["grouped_from"].sum() == 34_857
    assert sizes.min() >= 5
    pseudo = users["grouped_from"] > 1
    assert pseudo.any() and sizes[pseudo.to_numpy()].max() < 20 + 2 * 5
    single = users[~pseudo]
    np.testing.assert_array_equal(sizes[~pseudo.to_numpy()].to_numpy(),
                                  raw_counts.loc[single["raw_user"]].to_numpy())
    assert users["raw_user"].is_monotonic_increasing
    stats = grouped["manifest"]["import_stats"]
    assert stats["pseudo_clients"] == int(pseudo.sum()) and stats["dropped_rows"] == 0


def test_import_is_deterministic(tmp_path: Path) -> None:
    a = import_dataset("talkingdata", _need(TD), tmp_path / "a", min_rows=3)
    b = import_dataset("talkingdata", TD, tmp_path / "b", min_rows=3)
    man_a = json.loads((a / "manifest.json").read_text())
    assert man_a["files"] == json.loads((b / "manifest.json").read_text())["files"]
    assert man_a["params"]["sources"] == [
        {"file": "train_sample.csv",
         "sha256": "991a536e7884486a8a29840f1adb1852e69a5f7375f24eba0f5a4375e0272c2c"}]


# -- bad input ------------------------------------------------------------------------------
TD_HEADER = "..ip,app,device,os,channel,click_time,attributed_time,is_attributed"
TD_ROW = "87540,12,1,13,497,2017-11-07 09:30:38,,0"
ALI_COLS = ("click,purchase,101,121,122,124,125,126,127,128,129,205,206,207,210,216,508,509,"
            "702,853,301,109_14,110_14,127_14,150_14,D109_14,D110_14,D127_14,D150_14,D508,"
            "D509,D702,D853")
ALI_ROW = "0,0,1,1,1,1,1,0,1,1,1,0,1,1,1,0,1,0,0,0,1,1,1,1,1,0.47,0.56,0.08,0.19,0.07,0,0,0"


def _write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("fmt", "lines", "match"), [
    ("talkingdata", [TD_HEADER.replace(",is_attributed", ""), TD_ROW[:-2]],
     r"bad\.csv: missing column 'is_attributed' .*train_sample\.csv"),
    ("talkingdata", [TD_HEADER, TD_ROW.replace("2017-11-07", "07/11/2017")],
     r"bad\.csv: column 'click_time' must hold 'YYYY-MM-DD HH:MM:SS'"),
    ("talkingdata", [TD_HEADER, TD_ROW[:-1] + "2"], r"column 'is_attributed' must be 0 or 1"),
    ("talkingdata", [TD_HEADER, TD_ROW, TD_ROW.replace("2017-11-07 09:30:38", "")],
     r"bad\.csv: column 'click_time' is blank in data row 2"),
    ("talkingdata", [TD_HEADER, TD_ROW.replace("87540", "x1")], r"column 'ip' must hold integer"),
    ("taobao", [TD_HEADER, TD_ROW], r"bad\.csv: expected 5 columns .* found 8"),
    ("taobao", ["user_id,item_id,category_id,behavior_type,timestamp", "1,2,3,pv,4"],
     r"column 'user_id' must hold integer ids.*header row"),
    ("taobao", ["1,2,3,click,4"], r"column 'behavior_type' must be one of .*'click'"),
    ("taobao", ["1,2,3,buy,4"], r"no 'pv' events"),
    ("aliccp", [ALI_COLS.replace("205,", "x,"), ALI_ROW], r"missing column '205'"),
    ("aliccp", [ALI_COLS, "0,1" + ALI_ROW[3:]], r"'purchase' is 1 where 'click' is 0"),
    ("aliccp", [ALI_COLS, ALI_ROW.replace("0.47", "abc")], r"column 'D109_14' must hold numbers"),
])
def test_bad_source_names_file_and_column(tmp_path: Path, fmt: str, lines: list[str],
                                          match: str) -> None:
    src = _write(tmp_path / "bad.csv", *lines)
    with pytest.raises(DataError, match=match):
        import_dataset(fmt, src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_unreadable_sources(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: source not found"):
        import_dataset(fmt, tmp_path / "nope.csv", tmp_path / "out")
    empty = _write(tmp_path / "empty.csv", "")
    with pytest.raises(DataError, match=r"empty\.csv: empty file"):
        import_dataset(fmt, empty, tmp_path / "out")
    junk = tmp_path / "junk.csv"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DataError, match=r"junk\.csv: "):
        import_dataset(fmt, junk, tmp_path / "out")


def test_bad_arguments_and_destinations(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown import format 'criteo'; known: aliccp, "
                                        "talkingdata, taobao"):
        import_dataset("criteo", tmp_path, tmp_path / "out")
    with pytest.raises(DataError, match=r"no \.csv files"):
        import_dataset("aliccp", tmp_path, tmp_path / "out")
    src = _write(tmp_path / "a.csv", ALI_COLS, ALI_ROW, ALI_ROW)
    with pytest.raises(DataError, match=r"no user has >= 3 rows .*--small-clients group"):
        import_dataset("aliccp", src, tmp_path / "out", min_rows=3, small_clients="drop")
    with pytest.raises(ValueError, match="small_clients must be 'drop' or 'group'"):
        import_dataset("aliccp", src, tmp_path / "out", small_clients="merge")  # type: ignore[arg-type]
    out = import_dataset("aliccp", src, tmp_path / "out", min_rows=3)
    before = (out / "manifest.json").read_text()
    with pytest.raises(DataError, match="already exists; pass overwrite=True"):
        import_dataset("aliccp", src, out)
    assert (out / "manifest.json").read_text() == before
    assert import_dataset("aliccp", src, out, overwrite=True) == out


def test_registry_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="'taobao' is already registered"):
        register("taobao", IMPORTERS["taobao"])
    register("taobao", IMPORTERS["taobao"], force=True)
