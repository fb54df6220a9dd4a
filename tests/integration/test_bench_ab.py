"""benchmarks/bench_ab.py imports a git revision's package beside the working tree's and
times both in one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_ab_runs_a_revision_beside_the_working_tree(small_world: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_ab import extract
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    assert extract("HEAD", tmp_path) == head
    source = (tmp_path / "adfed_base" / "trainer.py").read_text()
    assert "from adfed_base.model" in source and "from adfed." not in source

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ab.py"), "--base", "HEAD",
                          "--data", str(small_world), "--batch", "256", "--batches", "2", "--passes", "2",
                          "--threads", "1"], cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout)
    assert result["base_commit"] == head and result["passes"] == len(result["ratios"]) == 2
    assert result["base_median"] > 0 and result["work_median"] > 0 and result["ratio_median"] > 0
