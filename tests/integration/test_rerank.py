"""``adfed rerank`` end to end, in-process (typer's CliRunner), on the small world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from adfed.cli import app

TINY = ["--set", "data.max_test_users=100", "--set", "model.tower=[16]", "--set", "model.embedding_dim=8"]


def adfed(*args: str | Path) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result


@pytest.fixture(scope="module")
def runs(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    device, cloud = root / "device", root / "cloud"
    assert adfed("train", "--data", small_world, "--out", device, *TINY).exit_code == 0
    assert adfed("train", "--data", small_world, "--out", cloud, *TINY,
                 "--set", 'model.variant="cloud_only"').exit_code == 0
    return device, cloud


def test_rerank_writes_its_figures(small_world: Path, runs: tuple[Path, Path], tmp_path: Path) -> None:
    device, cloud = runs
    out = tmp_path / "rr"
    result = adfed("rerank", "--run", device, "--data", small_world, "--out", out, "--cloud-run", cloud)
    assert result.exit_code == 0, result.stderr
    got = json.loads((out / "rerank.json").read_text())
    for key in ("requests", "uplift_conversions_at_5", "uplift_revenue_at_5", "ndcg_at_5_cloud",
                "ndcg_at_5_device", "ndcg_at_5_oracle", "latency_p50_ms", "latency_p99_ms"):
        assert isinstance(got[key], (int, float)), key
    assert got["ndcg_at_5_oracle"] == pytest.approx(1.0)
    assert got["onnx_max_abs_diff"] < 1e-5
    assert got["uplift_conversions_at_5_oracle"] >= got["uplift_conversions_at_5"]
    assert 0 < got["tags"]["ldp"][0]["mean_abs_error"] and "tag_auc" in got["tags"]
    assert (out / "plots" / "uplift_vs_k.png").stat().st_size > 0
    assert (out / "rerank_by_k.csv").read_text().startswith("k,")
    assert json.loads(result.stdout)["requests"] == got["requests"]


def test_rerank_trains_a_cloud_model_without_cloud_run(small_world: Path, runs: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "rr"
    result = adfed("rerank", "--run", runs[0], "--data", small_world, "--out", out, "--no-tags")
    assert result.exit_code == 0, result.stderr
    assert (out / "cloud_run" / "model.safetensors").exists()
    assert "training the cloud's cloud_only model" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--run", "{cloud}"], "its model.variant is 'cloud_only'; the phone re-ranks with the full model"),
    (["--cloud-run", "{device}"], "its model.variant is 'full'; the cloud ranks without private fields"),
    (["--run", "{missing}"], "config.toml: not found; is"),
    (["--blend", "2"], "--blend must be in"),
])
def test_rerank_errors_are_one_line(small_world: Path, runs: tuple[Path, Path], tmp_path: Path,
                                    args: list[str], message: str) -> None:
    device, cloud = runs
    base = {"--run": str(device), "--cloud-run": str(cloud)}
    fill = {"device": device, "cloud": cloud, "missing": tmp_path / "nope"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value.format(**fill)
    flat = [x for kv in base.items() for x in kv]
    result = adfed("rerank", "--data", small_world, "--out", tmp_path / "rr", *flat)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.count("error:") == 1


def test_rerank_runs_on_a_world_of_fewer_ads_than_the_latency_sizes(tiny_world: Path, tmp_path: Path) -> None:
    # Prepare: a world of 50 ads (the latency table times 100 and 200 candidates)
    device, cloud = tmp_path / "device", tmp_path / "cloud"
    assert adfed("train", "--data", tiny_world, "--out", device, *TINY).exit_code == 0
    assert adfed("train", "--data", tiny_world, "--out", cloud, *TINY,
                 "--set", 'model.variant="cloud_only"').exit_code == 0
    # Execute
    result = adfed("rerank", "--run", device, "--data", tiny_world, "--out", tmp_path / "rr",
                   "--cloud-run", cloud, "--no-tags")
    # Assert
    assert result.exit_code == 0, result.stderr
    got = json.loads((tmp_path / "rr" / "rerank.json").read_text())
    assert [r["candidates"] for r in got["latency"]] == [20, 100, 200]
    assert got["latency_candidates"] == 100 and got["latency_p99_ms"] > 0
