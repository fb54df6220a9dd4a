"""Dataset integrity: every file against the manifest's sha256, and manifest errors that
name the manifest file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adfed.data.store import Dataset, read_manifest, verify_files
from adfed.errors import DataError


@pytest.fixture
def data(tiny_world: Path, tmp_path: Path) -> Path:
    """A copy of the tiny world this test may damage."""
    return Path(shutil.copytree(tiny_world, tmp_path / "D"))


def flip(path: Path, offset: int, count: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        chunk = fh.read(count)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in chunk))


def test_a_fresh_dataset_verifies(data: Path) -> None:
    assert verify_files(data) == []


def test_flipped_bytes_inside_a_shard_are_found_though_the_footer_is_intact(data: Path) -> None:
    shard = data / "impressions" / "part-00000.parquet"
    flip(shard, 200, 400)  # inside the first data page; the footer at the end is intact
    Dataset.open(data)  # opening checks footers only: this still succeeds
    problems = verify_files(data)
    assert len(problems) == 1
    assert problems[0].startswith(f"{shard}: checksum does not match the manifest")
    with pytest.raises(DataError, match="checksum does not match"):
        Dataset.open(data, verify_checksums=True)


def test_missing_and_unlisted_files_are_each_one_line(data: Path) -> None:
    (data / "ads.parquet").unlink()
    shutil.copy(data / "users.parquet", data / "impressions" / "part-00009.parquet")
    problems = verify_files(data)
    assert problems == [f"{data / 'ads.parquet'}: missing (listed in manifest.json)",
                        f"{data / 'impressions' / 'part-00009.parquet'}: not listed in manifest.json "
                        f"(a file from elsewhere?)"]


@pytest.mark.parametrize("text", ['{"format_version": 1,', "[1, 2]", "\xff\xfe"])
def test_a_broken_manifest_names_the_file(data: Path, text: str) -> None:
    (data / "manifest.json").write_bytes(text.encode("latin-1"))
    for call in (read_manifest, verify_files, Dataset.open):
        with pytest.raises(DataError, match=rf"^{data / 'manifest.json'}: not (valid JSON|a manifest)"):
            call(data)


def test_a_manifest_without_checksums_cannot_be_verified(data: Path) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["files"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="lists no file checksums"):
        verify_files(data)
