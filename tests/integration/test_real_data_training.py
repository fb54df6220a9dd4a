"""Both training modes run on every real-data import (the shared samples).

The imports have small vocabularies (no table over 1,000 rows for TalkingData and
Ali-CCP), so their models have no ``sparse_shared`` table at all; federated training
used to crash there (an empty list of tensors to copy).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from adfed.config import Config, with_overrides
from adfed.data.importers import import_dataset
from adfed.data.schema import ParamGroup
from adfed.model.groups import group_names
from adfed.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
REAL = Path(os.environ.get("ADFED_REAL_DATA", REPO / ".." / "shared" / "data" / "real"))
SOURCES = {
    "talkingdata": REAL / "talkingdata_adtracking" / "train_sample.csv",
    "taobao": REAL / "taobao_user_behavior" / "UserBehavior.csv",
    "aliccp": REAL / "ali_ccp",
}


@pytest.fixture(scope="module")
def imports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cache: dict[str, Path] = {}

    def get(fmt: str) -> Path:
        if not SOURCES[fmt].exists():
            pytest.skip(f"real data {SOURCES[fmt]} absent (set ADFED_REAL_DATA to the shared data/real)")
        if fmt not in cache:
            cache[fmt] = import_dataset(fmt, SOURCES[fmt], tmp_path_factory.mktemp(fmt) / "ds")
        return cache[fmt]

    return get  # type: ignore[return-value]


@pytest.mark.parametrize("mode", ["centralized", "federated"])
@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_training_runs_on_each_import(imports, fmt: str, mode: str) -> None:  # noqa: ANN001
    path = imports(fmt)
    cfg = with_overrides(Config(), [
        f'data.path="{path}"', f'train.mode="{mode}"', "fl.rounds=2", "fl.clients_per_round=10",
        "window.min_clients=1", "fl.eval_every=1", "data.max_test_users=300", "model.tower=[16]",
    ])
    result = Trainer(cfg).fit()
    assert result.summary["mode"] == mode and math.isfinite(result.summary["logloss"])
    if mode == "federated":
        assert [r["round"] for r in result.rows] == [1, 2]
        if fmt != "taobao":  # the case that crashed: nothing sparse to ship
            assert not group_names(result.model, ParamGroup.SPARSE_SHARED)
