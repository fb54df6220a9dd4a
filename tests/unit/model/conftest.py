"""Fixtures for the model tests (helpers live in ``model_toys``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from model_toys import random_examples, toy_schema

from adfed.data.examples import Batch
from adfed.data.schema import Schema


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def schema() -> Schema:
    return toy_schema()


@pytest.fixture
def make_batch(schema: Schema, rng: np.random.Generator) -> Callable[..., Batch]:
    def make(n: int = 64, **kwargs: bool) -> Batch:
        return random_examples(schema, n, rng, **kwargs).to_batch()

    return make
