"""The ``adfed`` command end to end.

Most tests run it in-process with typer's ``CliRunner`` (fast: no interpreter start, no
re-import of torch); ``test_console_script_*`` run the installed console script as real
subprocesses, so that its exit codes and stderr as a user sees them stay covered.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from adfed import config as config_mod
from adfed.cli import app

REPO = Path(__file__).resolve().parents[2]
REAL_DATA = Path(os.environ.get("ADFED_REAL_DATA") or REPO.parent / "shared" / "data" / "real")
TALKINGDATA_CSV = REAL_DATA / "talkingdata_adtracking" / "train_sample.csv"
SMALL_TRAIN = ["--set", "data.max_test_users=300", "--set", "model.tower=[32,16]"]
TINY_GENERATE = ["data", "generate", "--users", "300", "--ads", "100", "--seed", "3"]


def adfed(*args: str | Path) -> Result:
    """Run ``adfed ARGS`` in this process; stdout and stderr are captured apart."""
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    # an exception that escaped the command (a traceback for a user) is never a clean exit
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result


def adfed_process(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``adfed ARGS`` as a user does: the installed console script, a new process."""
    script = Path(sys.executable).with_name("adfed")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "adfed.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def error_lines(run: Result | subprocess.CompletedProcess) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("error:")]


def tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


# -- the console script, as real processes ----------------------------------------------

def test_console_script_help_and_a_one_line_error(tmp_path: Path) -> None:
    proc = adfed_process("--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
    proc = adfed_process("train", "--data", "/nonexistent", "--out", tmp_path / "run")
    assert proc.returncode == 2
    (err,) = error_lines(proc)
    assert "manifest.json" in err and "/nonexistent" in err
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_console_script_generates_and_trains(tiny_dataset: Path, tmp_path: Path) -> None:
    # generate with the default worker processes: the same files as the in-process, one-worker run
    data = tmp_path / "D"
    proc = adfed_process(*TINY_GENERATE, "--out", data)
    assert proc.returncode == 0, proc.stderr
    files = json.loads((data / "manifest.json").read_text())["files"]
    assert files and files == json.loads((tiny_dataset / "manifest.json").read_text())["files"]
    run = tmp_path / "RUN"
    proc = adfed_process("train", "--mode", "centralized", "--data", data, "--out", run, *SMALL_TRAIN)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["mode"] == "centralized"
    assert json.loads((run / "summary.json").read_text())["mode"] == "centralized"


# -- data ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli_gen") / "D"
    result = adfed(*TINY_GENERATE, "--out", out, "--workers", "1")
    assert result.exit_code == 0, result.stderr
    assert (out / "manifest.json").exists()
    return out


def test_generate_is_deterministic(tiny_dataset: Path, tmp_path: Path) -> None:
    # Prepare: a stale dataset that --overwrite must replace
    other = tmp_path / "D2"
    shutil.copytree(tiny_dataset / "impressions", other / "impressions")
    (other / "manifest.json").write_text("{}")
    (other / "stale.txt").write_text("old")
    # Execute
    result = adfed(*TINY_GENERATE, "--out", other, "--overwrite", "--workers", "1")
    # Assert
    assert result.exit_code == 0, result.stderr
    a = json.loads((tiny_dataset / "manifest.json").read_text())["files"]
    b = json.loads((other / "manifest.json").read_text())["files"]
    assert a and a == b
    assert not (other / "stale.txt").exists()


def test_generate_refuses_existing_dir(tiny_dataset: Path) -> None:
    before = tree(tiny_dataset)
    result = adfed("data", "generate", "--users", "300", "--ads", "100", "--seed", "4",
                 "--out", tiny_dataset)
    assert result.exit_code == 2
    errors = error_lines(result)
    assert len(errors) == 1 and str(tiny_dataset) in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert tree(tiny_dataset) == before


def test_describe_json(tiny_dataset: Path) -> None:
    result = adfed("data", "describe", tiny_dataset, "--json")
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)
    assert 0.0 < stats["click_rate"] < 1.0
    assert 0.0 <= stats["cvr_among_clicks"] <= 1.0
    assert stats["impressions"] > 0 and stats["ads"] == 100
    assert 0.5 < stats["oracle_ctr_auc"] <= 1.0


@pytest.mark.skipif(not TALKINGDATA_CSV.exists(), reason=f"no real data at {TALKINGDATA_CSV}")
def test_import_talkingdata(tmp_path: Path) -> None:
    out = tmp_path / "td"
    result = adfed("data", "import", "--format", "talkingdata", TALKINGDATA_CSV, out, "--min-rows", "5")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] and manifest["counts"]["shards"] >= 1
    assert not (out / "truth").exists()


def test_import_unknown_format(tmp_path: Path) -> None:
    result = adfed("data", "import", "--format", "nope", tmp_path / "src.csv", tmp_path / "out")
    assert result.exit_code == 2
    (err,) = error_lines(result)
    assert "'nope'" in err
    for known in ("talkingdata", "taobao", "aliccp"):
        assert known in err
    assert not (tmp_path / "out").exists()


# -- train -----------------------------------------------------------------------------

def test_train_centralized_writes_run_dir(small_world: Path, tmp_path: Path) -> None:
    run = tmp_path / "RUN"
    result = adfed("train", "--mode", "centralized", "--data", small_world, "--out", run, *SMALL_TRAIN)
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["mode"] == "centralized"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("mode", "auc", "logloss", "ctcvr_auc", "oracle_auc", "model_bytes", "wall_time_s", "seed"):
        assert key in summary, key
    assert summary["mode"] == "centralized" and 0.0 <= summary["auc"] <= 1.0
    with open(run / "epochs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == summary["epochs"] and "auc" in rows[0]
    assert (run / "plots" / "learning_curve.png").stat().st_size > 0
    with open(run / "steps.csv", newline="") as fh:
        steps = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in steps] == list(range(1, len(steps) + 1))
    assert steps[-1]["auc"] != "" and float(steps[-1]["auc"]) == pytest.approx(summary["auc"])
    # train.eval_points: every quarter of all steps plus each epoch's end
    points = {round(len(steps) * k / 4) for k in (1, 2, 3)} | {len(steps) * e // summary["epochs"]
                                                              for e in range(1, summary["epochs"] + 1)}
    assert sum(r["auc"] != "" for r in steps) == len(points)
    cfg = config_mod.load(run / "config.toml")
    assert cfg.train.mode == "centralized"
    assert list(cfg.model.tower) == [32, 16] and cfg.data.max_test_users == 300
    assert Path(cfg.data.path) == small_world


def test_train_federated_writes_run_dir(small_world: Path, tmp_path: Path) -> None:
    run = tmp_path / "RUNF"
    result = adfed("train", "--mode", "federated", "--data", small_world, "--out", run,
                 "--rounds", "2", "--clients-per-round", "10", "--set", "window.min_clients=2",
                 *SMALL_TRAIN)
    assert result.exit_code == 0, result.stderr
    with open(run / "rounds.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        columns = set(reader.fieldnames or ())
    for col in ("round", "auc", "arrived", "late", "failed", "deadline_s", "sim_time_s",
                "wall_time_s", "bytes_up", "bytes_down"):
        assert col in columns, col
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert all(int(r["arrived"]) >= 2 for r in rows)
    assert rows[-1]["auc"] != ""  # the last round is always evaluated
    for plot in ("auc_vs_round.png", "auc_vs_sim_time.png"):
        assert (run / "plots" / plot).stat().st_size > 0
    summary = json.loads((run / "summary.json").read_text())
    for key in ("mode", "auc", "bytes_up_per_client", "bytes_down_per_client",
                "bytes_up_dense_per_client", "bytes_up_sparse_per_client", "clients_per_round",
                "dropped_clients", "sim_time_s"):
        assert key in summary, key
    assert summary["mode"] == "federated" and summary["clients_per_round"] == 10
    assert summary["sim_time_s"] > 0
    assert config_mod.load(run / "config.toml").fl.rounds == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "fl.bogus=1"], "fl.bogus"),
        (["--set", "train.mode=sideways"], "train.mode"),
    ],
    ids=["unknown-key", "bad-mode"],
)
def test_train_bad_config(small_world: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    result = adfed("train", "--data", small_world, "--out", tmp_path / "run", *args)
    assert result.exit_code == 2
    (err,) = error_lines(result)
    assert needle in err
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_run_directory_that_holds_a_run(small_world: Path, tmp_path: Path) -> None:
    run = tmp_path / "RUN"
    fed = ["--mode", "federated", "--rounds", "1", "--clients-per-round", "10", "--set", "window.min_clients=2"]
    assert adfed("train", "--data", small_world, "--out", run, *fed, *SMALL_TRAIN).exit_code == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert "checkpoint.safetensors" in before and "rounds.csv" in before
    # a second run into it: refused, the first run untouched
    result = adfed("train", "--mode", "centralized", "--data", small_world, "--out", run, *SMALL_TRAIN)
    assert result.exit_code == 2
    (err,) = error_lines(result)
    assert f"--out {run} already holds files; pass --overwrite" in err and "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # --overwrite replaces it: no file of the federated run is left beside the centralized one
    (run / "notes.txt").write_text("mine")
    result = adfed("train", "--mode", "centralized", "--data", small_world, "--out", run, "--overwrite", *SMALL_TRAIN)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["config.toml", "epochs.csv", "model.safetensors", "notes.txt",
                                                     "plots", "steps.csv", "summary.json"]
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["learning_curve.png"]
    # a file as --out, both flags: one-line errors before any training
    target = tmp_path / "afile"
    target.write_text("x")
    for args, needle in (([], f"--out {target} is a file"),
                         (["--resume", "--overwrite"], "pass one")):
        result = adfed("train", "--data", small_world, "--out", target, *args, *SMALL_TRAIN)
        assert result.exit_code == 2 and "Traceback" not in result.stderr
        assert needle in error_lines(result)[0]
    assert target.read_text() == "x"


def test_federated_flags_on_a_centralized_run_are_named_in_a_warning(small_world: Path, tmp_path: Path) -> None:
    result = adfed("train", "--data", small_world, "--out", tmp_path / "run", "--rounds", "3", *SMALL_TRAIN)
    assert result.exit_code == 0, result.stderr
    assert ("warning: --rounds set federated training; this run is centralized (one epoch per train.epochs): "
            "pass --mode federated to use it") in " ".join(result.stderr.split())


def test_overwrite_keeps_the_old_run_when_the_new_one_fails(small_world: Path, tmp_path: Path) -> None:
    # Prepare: a finished federated run
    run = tmp_path / "RUN"
    fed = ["--mode", "federated", "--rounds", "1", "--clients-per-round", "10", "--set", "window.min_clients=2"]
    assert adfed("train", "--data", small_world, "--out", run, *fed, *SMALL_TRAIN).exit_code == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    # Execute: --overwrite with a setting only the engine checks (after --out was cleared)
    result = adfed("train", "--data", small_world, "--out", run, "--overwrite", *fed, *SMALL_TRAIN,
                   "--set", 'robust.aggregator="bogus"')

    # Assert: a one-line error, and the old run exactly as it was (nothing set aside is left)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    (err,) = error_lines(result)
    assert "bogus" in err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (run / ".replaced").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "fl.over_selection=inf"], "fl.over_selection must be a finite number; got inf"),
        (["--set", "train.lr=nan"], "train.lr must be a finite number; got nan"),
        (["--set", "seed=18446744073709551616"], "seed must be an int in [0, 2**63)"),
        (["--mode", "federated", "--clients-per-round", "5"],
         "window.min_clients must be <= fl.clients_per_round (5): pass --set window.min_clients=5"),
    ],
    ids=["inf", "nan", "huge-seed", "min-clients"],
)
def test_train_bad_values_are_one_line_errors(small_world: Path, tmp_path: Path, args: list[str],
                                              needle: str) -> None:
    result = adfed("train", "--data", small_world, "--out", tmp_path / "run", *args)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    (err,) = error_lines(result)
    assert needle in err
    assert not (tmp_path / "run").exists()


def test_resume_is_for_federated_runs_and_cannot_go_back_in_rounds(small_world: Path, tmp_path: Path) -> None:
    run = tmp_path / "RUN"
    fed = ["--mode", "federated", "--clients-per-round", "10", "--set", "window.min_clients=2"]
    assert adfed("train", "--data", small_world, "--out", run, "--rounds", "2", *fed, *SMALL_TRAIN).exit_code == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for args, needle in (
        (["--mode", "centralized", "--resume"], "--resume continues a federated run from its checkpoint"),
        ([*fed, "--rounds", "1", "--resume"], "is at round 2; fl.rounds (1) must be at least that"),
    ):
        result = adfed("train", "--data", small_world, "--out", run, *args, *SMALL_TRAIN)
        assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
        assert needle in error_lines(result)[0]
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_bad_outputs_of_import_describe_and_experiment_are_one_line_errors(small_world: Path, tmp_path: Path) -> None:
    # import into an existing directory names the flag, not the Python argument
    target = tmp_path / "exists"
    target.mkdir()
    result = adfed("data", "import", "--format", "taobao", tmp_path / "none.csv", target)
    assert result.exit_code == 2 and f"OUT {target} already exists; pass --overwrite" in error_lines(result)[0]
    # describe on a truncated shard names the file
    broken = tmp_path / "broken"
    shutil.copytree(small_world, broken)
    shard = broken / "impressions" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:1000])
    result = adfed("data", "describe", broken)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    (line,) = error_lines(result)  # the dataset is opened as training opens it, first
    assert "part-00000.parquet: not a readable parquet file" in line and line.endswith("re-import the dataset")
    # an experiment --out that cannot be created
    (tmp_path / "afile").write_text("x")
    result = adfed("experiment", "run", "window", "--data", small_world, "--rounds", "1", "--out", tmp_path / "afile" / "x")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "afile" in error_lines(result)[0]


def test_train_with_a_directory_as_config_is_a_one_line_error(small_world: Path, tmp_path: Path) -> None:
    result = adfed("train", "--data", small_world, "--out", tmp_path / "run", "--config", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    (err,) = error_lines(result)
    assert f"config file {tmp_path} cannot be read" in err


def test_train_missing_dataset(tmp_path: Path) -> None:
    result = adfed("train", "--data", "/nonexistent", "--out", tmp_path / "run")
    assert result.exit_code == 2
    (err,) = error_lines(result)
    assert "manifest.json" in err and "/nonexistent" in err
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("cmd", [["train"], ["data", "generate"], ["experiment", "run"]],
                         ids=lambda c: " ".join(c))
def test_help(cmd: list[str]) -> None:
    result = adfed(*cmd, "--help")
    assert result.exit_code == 0, result.stderr
    assert "Usage" in result.stdout
