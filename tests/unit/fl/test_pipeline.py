"""The client update pipeline: registry, order, per-phone state, server-side inverse."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from adfed.config import Config, with_overrides
from adfed.errors import ConfigError
from adfed.fl import pipeline, wirespec
from adfed.fl.pipeline import Identity, Pipeline
from adfed.fl.rounds import client_settings
from adfed.fl.types import SparseRows, Update

SETTINGS = client_settings(Config())


def _update() -> Update:
    return Update(client_id=3, dense={"w": torch.ones(2, 2)},
                  sparse={"ad": SparseRows(torch.tensor([1, 4]), torch.ones(2, 3))}, num_examples=7, base_version=2)


@dataclasses.dataclass(frozen=True)
class Scale:
    """A test transform: scales the dense part, counts its calls in per-phone state."""

    factor: float
    name: str = "scale"

    def forward(self, update, rng, state, settings):  # noqa: ANN001, ANN201
        calls = (state or {}).get("calls", torch.zeros(1)) + 1
        dense = {k: v * self.factor for k, v in update.dense.items()}
        return dataclasses.replace(update, dense=dense), {"calls": calls}

    def inverse(self, update):  # noqa: ANN001, ANN201
        return dataclasses.replace(update, dense={k: v / self.factor for k, v in update.dense.items()})


def test_default_pipeline_is_identity_and_keeps_no_state() -> None:
    p = pipeline.build(Config())
    update = _update()
    out, kept = p.apply(update, np.random.default_rng(0), None, SETTINGS)
    assert p.codec == "identity" and out is update and kept == {}
    assert p.invert(out) is out
    assert p.plain and Pipeline((Identity(), Identity())).plain


def test_a_pipeline_with_any_other_transform_is_not_plain() -> None:
    assert not Pipeline((Identity(), Scale(2.0))).plain
    assert not Pipeline((Scale(1.0),)).plain


def test_state_is_kept_under_the_transforms_prefix_and_comes_back_next_round() -> None:
    # Prepare
    p = Pipeline((Identity(), Scale(2.0)))

    # Execute: two rounds on one phone, its local store holding other keys too
    _, kept = p.apply(_update(), np.random.default_rng(0), {"user_emb.weight": torch.zeros(1, 4)}, SETTINGS)
    phone = {"user_emb.weight": torch.zeros(1, 4), **kept}
    out, kept2 = p.apply(_update(), np.random.default_rng(0), phone, SETTINGS)

    # Assert
    assert set(kept) == {"pipeline/scale/calls"} and float(kept2["pipeline/scale/calls"]) == 2.0
    assert torch.equal(out.dense["w"], torch.full((2, 2), 2.0))
    assert p.codec == "identity+scale"


def test_invert_undoes_in_reverse_order() -> None:
    p = Pipeline((Scale(2.0), Scale(5.0, name="five")))
    out, _ = p.apply(_update(), np.random.default_rng(0), None, SETTINGS)
    assert torch.equal(out.dense["w"], torch.full((2, 2), 10.0))
    assert torch.equal(p.invert(out).dense["w"], torch.ones(2, 2))


def test_unknown_or_repeated_transform_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"fl.update_pipeline lists 'zip'; known transforms: \[.*'identity'"):
        pipeline.build(with_overrides(Config(), ['fl.update_pipeline=["identity", "zip"]']))
    with pytest.raises(ConfigError, match="lists a transform twice"):
        pipeline.build(with_overrides(Config(), ['fl.update_pipeline=["identity", "identity"]']))
    with pytest.raises(ConfigError, match="fl.update_pipeline must be a non-empty list"):
        with_overrides(Config(), ["fl.update_pipeline=[]"])


def test_register_refuses_duplicates_and_new_transforms_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "_REGISTRY", dict(pipeline._REGISTRY))
    monkeypatch.setattr(wirespec, "KNOWN_CODECS", set(wirespec.KNOWN_CODECS))
    with pytest.raises(ValueError, match="already registered"):
        pipeline.register("identity", lambda cfg: Identity())
    pipeline.register("scale", lambda cfg: Scale(3.0))
    p = pipeline.build(with_overrides(Config(), ['fl.update_pipeline=["scale"]']))
    assert p.codec == "scale" and "scale" in pipeline.names()
