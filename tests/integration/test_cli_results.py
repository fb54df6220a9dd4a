"""What ``adfed train`` and ``adfed compare`` show at the end of a run (in-process CLI)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adfed.cli import app

SMALL = ["--set", "model.tower=[32,16]"]


def invoke(*args: str | Path) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_gen.generate import generate
    from data_gen.params import WorldParams

    return generate(tmp_path_factory.mktemp("results") / "D", WorldParams(num_users=300, num_ads=100),
                    seed=3, workers=1)


@pytest.fixture(scope="module")
def central(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    run = tmp_path_factory.mktemp("central") / "centralized"
    return run, invoke("train", "--mode", "centralized", "--data", tiny, "--out", run, *SMALL)


def test_train_ends_with_a_results_table_the_run_directory_and_a_noise_warning(
        central: tuple[Path, object]) -> None:
    run, result = central
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    # the positives behind the CVR AUC and its interval are recorded
    assert isinstance(summary["test_positives"], int) and summary["test_positives"] < 50
    assert summary["auc_ci_low"] <= summary["auc"] <= summary["auc_ci_high"]
    assert summary["auc_noisy"] is True
    err = result.stderr
    for needle in ("CVR AUC [95% CI]", "CVR oracle", "CTCVR oracle", "CTCVR AUC", "test conversions",
                   "wall time"):
        assert needle in err, needle
    tail = [line for line in err.splitlines() if line.strip()]
    assert tail[-1].startswith("run directory: ") and str(run) in tail[-1]
    assert any(line.startswith("warning:") and "noisy" in line for line in tail[-3:])
    assert json.loads(result.stdout)["mode"] == "centralized"  # stdout stays JSON


def test_federated_run_clamps_clients_per_round_and_draws_the_reference(
        tiny: Path, central: tuple[Path, object], tmp_path: Path) -> None:
    ref, _ = central
    run = tmp_path / "federated"
    result = invoke("train", "--mode", "federated", "--data", tiny, "--out", run, "--rounds", "3",
                    "--clients-per-round", "5000", "--set", "fl.eval_every=2", "--reference", ref, *SMALL)
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if "--clients-per-round 5000" in line]
    assert warning and warning[0].startswith("warning:") and "using 300" in warning[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["clients_per_round"] == summary["population"] == 300
    assert summary["clients_per_round_requested"] == 5000
    assert summary["reference_auc"] == json.loads((ref / "summary.json").read_text())["auc"]
    for needle in ("rounds", "upload per client", "download per client", "simulated time"):
        assert needle in result.stderr
    with open(run / "rounds.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[-5:] == ["auc", "auc_expected", "ctcvr_auc", "logloss", "eval_s"]  # round 1 unscored
    for plot in ("auc_vs_round.png", "auc_vs_sim_time.png"):
        assert (run / "plots" / plot).stat().st_size > 0


def test_compare_prints_runs_side_by_side(central: tuple[Path, object], tmp_path: Path) -> None:
    run, _ = central
    other = tmp_path / "other"
    other.mkdir()
    summary = json.loads((run / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps({**summary, "mode": "federated", "auc": 0.5}))
    result = invoke("compare", run, other)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "centralized" in line and "other" in line)
    assert header.index("centralized") < header.index("other")
    assert "0.5000" in result.stdout and f"{summary['auc']:.4f}" in result.stdout


def test_compare_and_reference_name_a_directory_without_a_summary(tiny: Path, tmp_path: Path) -> None:
    result = invoke("compare", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'summary.json'}: not found; is {tmp_path} a run directory (adfed train --out)?"]
    result = invoke("train", "--data", tiny, "--out", tmp_path / "r", "--reference", tmp_path)
    assert result.exit_code == 2 and "summary.json: not found" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("summary", "bad"), [({}, "mode, auc"), ({"mode": "federated", "auc": "high"}, "auc"),
                                              ({"mode": "centralized", "auc": 0.7, "logloss": [1]}, "logloss")])
def test_compare_refuses_a_summary_that_is_not_a_runs(tmp_path: Path, summary: dict, bad: str) -> None:
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    result = invoke("compare", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'summary.json'}: not an adfed run summary ({bad} missing or not a number); is "
        f"{tmp_path} a run directory (adfed train --out)?"]
