"""``adfed data verify`` and the one-line errors of issue 22 (in-process CLI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adfed.cli import app


def invoke(*args: str | Path) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def errors(result: object) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture
def data(tiny_world: Path, tmp_path: Path) -> Path:
    """A copy of the tiny world this test may damage."""
    return Path(shutil.copytree(tiny_world, tmp_path / "D"))


def test_verify_reports_each_changed_file_and_exits_1(data: Path) -> None:
    assert invoke("data", "verify", data).exit_code == 0
    for rel in ("impressions/part-00000.parquet", "users.parquet"):
        with open(data / rel, "r+b") as fh:
            fh.seek(300)
            fh.write(b"\x00" * 64)
    result = invoke("data", "verify", data)
    assert result.exit_code == 1
    lines = errors(result)
    assert len(lines) == 2 and all(line.startswith("mismatch: ") for line in lines)
    assert "impressions/part-00000.parquet: checksum does not match" in lines[0]
    assert "users.parquet: checksum does not match" in lines[1]


def test_describe_without_users_parquet_is_a_one_line_error(data: Path) -> None:
    (data / "users.parquet").unlink()
    result = invoke("data", "describe", data)
    assert result.exit_code == 2
    assert errors(result) == [f"error: {data / 'users.parquet'}: file listed in the manifest is missing; "
                              f"regenerate or re-import the dataset"]


@pytest.mark.parametrize("command", [["data", "describe"], ["data", "verify"], ["train", "--data"]])
def test_a_broken_manifest_names_the_file(data: Path, tmp_path: Path, command: list[str]) -> None:
    (data / "manifest.json").write_text('{"counts": ')
    extra = ["--out", str(tmp_path / "run")] if command[0] == "train" else []
    result = invoke(*command, data, *extra)
    assert result.exit_code == 2
    lines = errors(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: {data / 'manifest.json'}: not valid JSON")


@pytest.mark.parametrize(("args", "message"), [
    (["--users", "0"], "error: --users must be an int >= 1; got 0"),
    (["--ads", "5"], "error: --ads must be >= candidates_per_request (20,"),
])
def test_generate_messages_name_the_flags(tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke("data", "generate", "--out", tmp_path / "x", *args)
    assert result.exit_code == 2
    assert errors(result)[0].startswith(message) and "WorldParams" not in result.stderr


def test_generate_defaults_to_the_demos_10000_ads(tmp_path: Path) -> None:
    result = invoke("data", "generate", "--users", "20", "--out", tmp_path / "x", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "x" / "manifest.json").read_text())["counts"]["ads"] == 10_000


@pytest.mark.parametrize(("args", "message"), [
    (["--min-rows", "0"], "error: --min-rows must be an int >= 1; got 0"),
    (["--small-clients", "keep"], "error: --small-clients must be drop or group; got 'keep'"),
])
def test_import_messages_name_the_flags(tmp_path: Path, args: list[str], message: str) -> None:
    src = tmp_path / "UserBehavior.csv"
    src.write_text("1,1,1,pv,1511544070\n")
    result = invoke("data", "import", "--format", "taobao", src, tmp_path / "out", *args)
    assert result.exit_code == 2 and errors(result) == [message]


def test_import_too_few_rows_names_the_flags(tmp_path: Path) -> None:
    src = tmp_path / "UserBehavior.csv"
    src.write_text("1,1,1,pv,1511544070\n2,1,1,pv,1511544080\n")
    result = invoke("data", "import", "--format", "taobao", src, tmp_path / "out", "--min-rows", "5",
                    "--small-clients", "drop")
    assert result.exit_code == 2
    assert "--min-rows" in result.stderr and "--small-clients group" in result.stderr
    assert "min_rows or" not in result.stderr


def test_import_accepts_the_directory_its_help_promises(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "UserBehavior.csv").write_text(
        "".join(f"{u},{i},1,pv,{1511544070 + 60 * i}\n" for u in range(3) for i in range(4)))
    result = invoke("data", "import", "--format", "taobao", tmp_path / "src", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert invoke("data", "verify", tmp_path / "out").exit_code == 0  # imports carry checksums


def test_unknown_experiment_lists_all(tmp_path: Path) -> None:
    result = invoke("experiment", "run", "nope", "--out", tmp_path)
    assert result.exit_code == 2
    assert errors(result) == ["error: unknown experiment 'nope'; known: all, async, ceiling, fl_vs_central, "
                              "privacy, replay, replay_parts, scale, vocabulary, window"]


def test_ceiling_on_an_import_fails_before_training(tmp_path: Path) -> None:
    src = tmp_path / "UserBehavior.csv"
    src.write_text("".join(f"{u},{i},1,pv,{1511544070 + 60 * i}\n" for u in range(3) for i in range(4)))
    assert invoke("data", "import", "--format", "taobao", src, tmp_path / "ds").exit_code == 0
    result = invoke("experiment", "run", "ceiling", "--data", tmp_path / "ds", "--out", tmp_path / "exp")
    assert result.exit_code == 2
    assert "needs a synthetic dataset" in errors(result)[-1]
    assert not (tmp_path / "exp" / "ceiling" / "centralized").exists()  # nothing was trained


def test_describe_of_a_generated_manifest_without_params_is_a_one_line_error(data: Path) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["params"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("data", "describe", data)
    assert result.exit_code == 2
    (line,) = errors(result)
    assert line == (f"error: {data / 'manifest.json'}: written by adfed.data_gen but has no 'params'; "
                    f"regenerate the dataset with adfed data generate --overwrite")


def test_a_damaged_requests_file_is_a_one_line_error(data: Path) -> None:
    from adfed.data.store import Dataset
    from adfed.errors import DataError
    from adfed.rerank.requests import read_requests

    (data / "requests.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"requests\.parquet: cannot be read \(.*\); the file is truncated or damaged"):
        read_requests(Dataset.open(data))


def test_describe_refuses_a_users_table_training_would_refuse(data: Path) -> None:
    (data / "users.parquet").write_bytes(b"garbage")
    result = invoke("data", "describe", data)
    assert result.exit_code == 2
    (line,) = errors(result)
    assert line.startswith(f"error: {data / 'users.parquet'}: ")


def test_describe_names_the_damaged_truth_shard(data: Path) -> None:
    (data / "truth" / "part-00000.parquet").write_bytes(b"garbage")
    result = invoke("data", "describe", data)
    assert result.exit_code == 2
    (line,) = errors(result)
    assert line.startswith(f"error: {data / 'truth' / 'part-00000.parquet'}: not a readable parquet file")
    assert line.endswith("regenerate or re-import the dataset")


@pytest.mark.parametrize(("change", "needle"), [
    (lambda s: s.update(num_users="abc"), "schema is malformed (num_users is 'abc', not a count)"),
    (lambda s: s.update(fields=5), "schema is malformed ('fields' is a int, not a list of fields)"),
    (lambda s: s["fields"].append(dict(s["fields"][1])), "duplicate field names"),
    (lambda s: s["fields"][1].pop("kind"), "has no 'kind'"),
])
@pytest.mark.parametrize("command", [["train", "--data"], ["data", "verify"], ["data", "describe"]])
def test_a_malformed_manifest_schema_is_a_one_line_error_naming_the_file(data: Path, change, needle: str,  # noqa: ANN001
                                                                        command: list[str]) -> None:
    # verify and describe refuse what training refuses (verify said ok: the files' checksums match)
    manifest = json.loads((data / "manifest.json").read_text())
    change(manifest["schema"])
    (data / "manifest.json").write_text(json.dumps(manifest))
    extra = ["--out", data.parent / "run"] if command[0] == "train" else []
    result = invoke(*command, data, *extra)
    assert result.exit_code == 2
    (line,) = errors(result)
    assert line.startswith(f"error: {data / 'manifest.json'}: ") and needle in line
    assert line.endswith("regenerate or re-import the dataset")


def test_generate_names_the_workers_flag_before_any_progress(tmp_path: Path) -> None:
    result = invoke("data", "generate", "--users", "100", "--workers", "0", "--out", tmp_path / "W")
    assert result.exit_code == 2
    assert errors(result) == ["error: --workers must be an int >= 1; got 0"]
    assert "generating" not in result.stdout and not (tmp_path / "W").exists()
