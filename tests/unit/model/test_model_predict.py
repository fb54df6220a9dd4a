"""Batched inference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from adfed.data.examples import Examples
from adfed.data.schema import Schema
from adfed.model import build_model, predict


def test_predict_matches_forward_for_any_batch_size(schema: Schema, make_examples: Callable[..., Examples]) -> None:
    model = build_model(schema)
    examples = make_examples(schema, 50)
    with torch.no_grad():
        out = model(examples.to_batch())

    for batch_size in (1, 7, 50, 8192):
        pctr, pcvr = predict(model, examples, batch_size=batch_size)

        assert pctr.dtype == np.float32 and pctr.shape == (50,)
        np.testing.assert_allclose(pctr, out.pctr.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(pcvr, out.pcvr.numpy(), rtol=1e-5, atol=1e-7)


def test_predict_restores_the_training_mode(schema: Schema, make_examples: Callable[..., Examples]) -> None:
    model = build_model(schema)
    examples = make_examples(schema, 5)

    model.train()
    predict(model, examples)
    assert model.training
    model.eval()
    predict(model, examples)
    assert not model.training


def test_predict_rejects_a_bad_batch_size(schema: Schema, make_examples: Callable[..., Examples]) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        predict(build_model(schema), make_examples(schema, 3), batch_size=0)
