"""Importer edges a user hits: a directory as source, a cut-off last row, bad dates, and
the checksums an import's manifest carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adfed.data.importers import import_dataset, talkingdata, taobao
from adfed.data.store import verify_files
from adfed.errors import DataError

TD_HEADER = "ip,app,device,os,channel,click_time,attributed_time,is_attributed\n"


def _taobao_rows(users: int = 4) -> str:
    rows = []
    for u in range(users):
        for item in range(3):
            rows.append(f"{u},{item},{item % 2},pv,{1511544070 + 60 * (u * 3 + item)}")
        rows.append(f"{u},0,0,buy,{1511544070 + 60 * (u * 3 + 5)}")
    return "\n".join(rows) + "\n"


def _talkingdata_rows(users: int = 4) -> str:
    rows = [f"{u},{a},1,13,{100 + a},2017-11-06 14:{u:02d}:{a:02d},,{int(a == 0)}"
            for u in range(users) for a in range(3)]
    return TD_HEADER + "\n".join(rows) + "\n"


def test_taobao_accepts_the_directory_holding_userbehavior_csv(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "UserBehavior.csv").write_text(_taobao_rows())
    raw = taobao.load(tmp_path / "src")
    assert raw.sources == (tmp_path / "src" / "UserBehavior.csv",)
    assert len(raw.frame) == 12


def test_a_directory_without_the_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"directory holds no UserBehavior\.csv"):
        taobao.load(tmp_path)
    (tmp_path / "train.csv").write_text(_talkingdata_rows())
    (tmp_path / "train_sample.csv").write_text(_talkingdata_rows())
    with pytest.raises(DataError, match=r"holds train\.csv and train_sample\.csv; give one file"):
        talkingdata.load(tmp_path)


@pytest.mark.parametrize(("fmt", "text"), [
    ("taobao", _taobao_rows() + "7,1,0,p"),
    ("taobao", _taobao_rows() + "7,1,"),
    ("talkingdata", _talkingdata_rows() + "9,1,1,13,100,2017-11-06 1"),
])
def test_a_cut_off_last_row_says_so(tmp_path: Path, fmt: str, text: str) -> None:
    src = tmp_path / "cut.csv"
    src.write_text(text)
    loader = {"taobao": taobao.load, "talkingdata": talkingdata.load}[fmt]
    with pytest.raises(DataError, match=r"the last row \(data row \d+\) is cut off.*without a line break"):
        loader(src)


def test_a_complete_file_without_a_final_line_break_still_loads(tmp_path: Path) -> None:
    src = tmp_path / "ok.csv"
    src.write_text(_taobao_rows().rstrip("\n"))
    assert len(taobao.load(src).frame) == 12


def test_a_bad_click_time_is_quoted_whole(tmp_path: Path) -> None:
    src = tmp_path / "t.csv"
    bad = "2017-11-06 25:61:00 and some trailing words"
    src.write_text(_talkingdata_rows() + f"9,1,1,13,100,{bad},,0\n")
    with pytest.raises(DataError) as info:
        talkingdata.load(src)
    message = str(info.value)
    assert f"data row 13 holds {bad!r}" in message
    assert message.endswith(talkingdata.FIX)


def test_an_import_manifest_carries_every_files_checksum(tmp_path: Path) -> None:
    src = tmp_path / "UserBehavior.csv"
    src.write_text(_taobao_rows())
    out = import_dataset("taobao", src, tmp_path / "ds")
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert {"users.parquet", "ads.parquet", "index.parquet", "impressions/part-00000.parquet"} <= set(files)
    assert verify_files(out) == []
