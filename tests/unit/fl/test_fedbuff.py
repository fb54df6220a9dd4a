"""FedBuff's driver: staleness reaches the weights, the buffer size, the clock, immutability."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from adfed.data.store import Dataset
from adfed.fl import strategies
from adfed.fl.backends import InProcessBackend
from adfed.fl.fedbuff import AsyncState, run_async_step
from adfed.fl.population import LocalStore, Population
from adfed.fl.rounds import Engine
from adfed.fl.simulation import build_engine, initial_server_state
from adfed.model.assembly import model_from_config


@pytest.fixture
def async_run(small_world, fl_config):  # noqa: ANN001, ANN201
    cfg = fl_config(small_world, 'fl.schedule="async"', "fl.async_concurrency=12", "fl.async_buffer=4",
                    "fl.max_weight=30")
    dataset = Dataset.open(small_world)
    population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    backend = InProcessBackend(dataset.path, cfg)
    state = initial_server_state(cfg, model_from_config(cfg, dataset), strategies.create("fedavg", 1.0))
    engine = build_engine(cfg, dataset, population, state, backend, strategies.create("fedavg", 1.0))
    return cfg, state, engine


def test_staleness_and_caps_reach_the_aggregation_weights(async_run) -> None:  # noqa: ANN001
    # Prepare: record what the engine aggregates
    cfg, state, engine = async_run
    seen: list[tuple[list, np.ndarray, int]] = []

    class Recording(Engine):
        def aggregate(self, state, updates, weights, step):  # noqa: ANN001, ANN202
            seen.append((list(updates), weights.copy(), state.model.version))
            return super().aggregate(state, updates, weights, step)

    rec = Recording(**{f.name: getattr(engine, f.name) for f in dataclasses.fields(engine)})
    st, store = AsyncState(), LocalStore(capacity=100)

    # Execute: enough steps that some updates are stale
    for _ in range(6):
        state, st, row = run_async_step(state, st, rec, store)

    # Assert: weight = min(examples, max_weight) / sqrt(1 + staleness), staleness > 0 somewhere
    stale_seen = 0
    for updates, weights, version in seen:
        assert len(updates) == cfg.fl.async_buffer
        s = np.array([version - u.base_version for u in updates], dtype=np.float64)
        n = np.array([u.num_examples for u in updates], dtype=np.float64)
        np.testing.assert_allclose(weights, np.minimum(n, 30.0) / np.sqrt(1.0 + s))
        stale_seen += int((s > 0).sum())
    assert stale_seen > 0


def test_a_step_returns_new_state_and_never_mutates_the_old(async_run) -> None:  # noqa: ANN001
    cfg, state, engine = async_run
    st0 = AsyncState()
    state1, st1, _ = run_async_step(state, st0, engine, LocalStore(capacity=100))
    assert st0 == AsyncState() and state.model.version == 0
    assert state1.model.version == 1 and state1.round == 1
    assert st1.clock_s > 0 and len(st1.events) + len(st1.pending) == cfg.fl.async_concurrency
    assert [e.at_s for e in st1.events] == sorted(e.at_s for e in st1.events)
