"""Run-directory files: rounds.csv's column order, the summary's noise flag, the plots."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from adfed import rundir


def _header(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return next(csv.reader(fh))


def test_rounds_csv_keeps_one_column_order_whichever_round_was_scored(tmp_path: Path) -> None:
    # Prepare: the same rounds, once with the first round scored and once without
    scored = {"round": 1, "sim_time_s": 1.0, "auc": 0.7, "ctcvr_auc": 0.8, "eval_s": 0.1, "wall_time_s": 2.0}
    plain = {"round": 1, "sim_time_s": 1.0, "wall_time_s": 2.0}
    second = {"round": 2, "sim_time_s": 2.0, "auc": 0.71, "ctcvr_auc": 0.81, "eval_s": 0.1, "wall_time_s": 3.0}
    # Execute
    rundir.write_rows(tmp_path / "a.csv", [scored, second], last=rundir.EVAL_COLUMNS)
    rundir.write_rows(tmp_path / "b.csv", [plain, second], last=rundir.EVAL_COLUMNS)
    # Assert
    assert _header(tmp_path / "a.csv") == _header(tmp_path / "b.csv") == [
        "round", "sim_time_s", "wall_time_s", "auc", "ctcvr_auc", "eval_s"]
    with open(tmp_path / "b.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["auc"] == "" and rows[1]["auc"] == "0.71"


@pytest.mark.parametrize(("positives", "noisy"), [(3, True), (49, True), (50, False), (400, False)])
def test_summary_flags_a_noisy_auc_below_50_test_conversions(positives: int, noisy: bool) -> None:
    summary = rundir.finish_summary({"auc": 0.7, "test_positives": positives}, {"clients_per_round_requested": 9})
    assert summary["auc_noisy"] is noisy
    assert summary["clients_per_round_requested"] == 9


def test_auc_plot_names_each_oracle_and_the_reference(tmp_path: Path) -> None:
    rows = [{"round": r, "auc": 0.6 + r / 100, "ctcvr_auc": 0.7, "auc_expected": 0.65} for r in (2, 4)]
    summary = {"oracle_auc": 0.79, "oracle_ctcvr_auc": 0.88, "oracle_auc_expected": 0.75}
    labels = rundir.plot_auc(tmp_path / "p.png", rows, x="round", xlabel="federated round", title="t",
                             summary=summary, reference={"auc": 0.72, "auc_expected": 0.7}, integer_x=True)
    assert (tmp_path / "p.png").stat().st_size > 0
    assert "CVR oracle (true p_cvr): 0.790" in labels
    assert "CTCVR oracle (true p_click x p_cvr): 0.880" in labels
    assert "centralized CVR AUC: 0.720" in labels
    assert any(label.startswith("CTCVR AUC") for label in labels)
    assert not any(label in ("auc", "ctcvr_auc", "oracle") for label in labels)  # words, not keys


def test_auc_plot_without_truth_draws_no_oracle(tmp_path: Path) -> None:
    labels = rundir.plot_auc(tmp_path / "p.png", [{"round": 1, "auc": 0.6}], x="round", xlabel="round",
                             title="t", summary={"oracle_auc": float("nan")})
    assert labels == ["CVR AUC (test clicks)"]
