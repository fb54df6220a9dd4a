"""Shared fixtures: a small synthetic world generated once per test session."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

from adfed.config import Config, with_overrides

# One thread: on a busy 2-core machine, torch's second thread makes every op 3-10x slower.
torch.set_num_threads(1)
# Property tests draw the same examples on every run: a failure reproduces, CI never flakes.
settings.register_profile("adfed", derandomize=True)
settings.load_profile("adfed")


@pytest.fixture(autouse=True)
def _seeded_global_rngs() -> None:
    """torch's and numpy's global generators start from the same state in every test, so
    a test that draws from them does not depend on which tests ran before it."""
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - the legacy global state, for code that uses it


@pytest.fixture
def modules_loaded_by() -> Callable[[str, tuple[str, ...]], set[str]]:
    """Factory: which of the modules ``watch`` a fresh interpreter has imported after
    running ``code`` at the repository root; for start-up costs that the test process,
    which has imported everything, cannot see."""
    root = Path(__file__).resolve().parents[1]

    def loaded(code: str, watch: tuple[str, ...]) -> set[str]:
        probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {list(watch)!r} if m in sys.modules]))\n"
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=root)
        return set(json.loads(out.stdout.strip().splitlines()[-1]))

    return loaded


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3,000-user, 6,000-ad synthetic dataset (seed 7); ad_id is a sparse_shared table."""
    from data_gen.generate import generate
    from data_gen.params import WorldParams

    out = tmp_path_factory.mktemp("world") / "small"
    return generate(out, WorldParams(num_users=3000, num_ads=6000), seed=7, workers=1)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 200-user, 50-ad synthetic dataset (seed 5), generated once; tests that damage
    files work on a copy."""
    from data_gen.generate import generate
    from data_gen.params import WorldParams

    return generate(tmp_path_factory.mktemp("tiny") / "D", WorldParams(num_users=200, num_ads=50),
                    seed=5, workers=1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _fl_config(data: Path, *overrides: str) -> Config:
    base = [
        f'data.path="{data}"', "train.mode=\"federated\"", "fl.rounds=4",
        "fl.clients_per_round=12", "fl.eval_every=2", "window.min_clients=3",
        "data.max_test_users=600", "model.tower=[32,16]", "model.embedding_dim=8",
    ]
    return with_overrides(Config(), base + list(overrides))


@pytest.fixture
def fl_config():  # noqa: ANN201 - returns the factory
    """Factory: a small, fast federated config on a dataset, plus ``--set`` overrides."""
    return _fl_config
