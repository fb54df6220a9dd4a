"""The code stays clean: ruff and mypy (versions pinned in pyproject's dev extra) find
nothing in the packages, the tests and the benchmarks (``make lint`` runs the same)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["adfed", "data_gen", "serving", "experiments", "benchmarks"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    out = _run("ruff", "check", *PACKAGES, "tests")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_mypy_finds_nothing() -> None:
    out = _run("mypy", *PACKAGES)  # cache in .mypy_cache: ~35 s cold, seconds warm
    assert out.returncode == 0, out.stdout + out.stderr
