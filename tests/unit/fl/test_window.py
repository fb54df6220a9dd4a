"""The round window: none / fixed / adaptive deadlines."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adfed.config import WindowConfig
from adfed.fl.window import WindowState, close_round, initial_state, next_state


def _times(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float64)


# -- initial state and closing a round -------------------------------------------------------

@pytest.mark.parametrize(("kind", "deadline"), [("none", math.inf), ("fixed", 30.0), ("adaptive", 30.0)])
def test_initial_deadline(kind: str, deadline: float) -> None:
    state = initial_state(WindowConfig(kind=kind, deadline_s=30.0))
    assert state.deadline_s == deadline and state.history == ()


def test_none_waits_for_everyone() -> None:
    # Prepare
    cfg = WindowConfig(kind="none", deadline_s=5.0)
    state = initial_state(cfg)

    # Execute
    on_time, end = close_round(cfg, state, _times(3.0, 900.0, 12.0))

    # Assert
    assert on_time.tolist() == [True, True, True]
    assert end == 900.0


def test_none_with_no_clients_ends_at_zero() -> None:
    cfg = WindowConfig(kind="none")
    on_time, end = close_round(cfg, initial_state(cfg), _times())
    assert on_time.shape == (0,) and end == 0.0


@pytest.mark.parametrize("kind", ["fixed", "adaptive"])
def test_deadline_drops_late_clients_and_ends_at_deadline(kind: str) -> None:
    # Prepare
    cfg = WindowConfig(kind=kind, deadline_s=10.0)

    # Execute
    on_time, end = close_round(cfg, initial_state(cfg), _times(3.0, 10.0, 10.5, 40.0))

    # Assert
    assert on_time.tolist() == [True, True, False, False]
    assert end == 10.0


@pytest.mark.parametrize("kind", ["fixed", "adaptive"])
def test_round_closes_early_when_all_arrived(kind: str) -> None:
    cfg = WindowConfig(kind=kind, deadline_s=10.0)
    on_time, end = close_round(cfg, initial_state(cfg), _times(3.0, 7.5, 1.0))
    assert on_time.all()
    assert end == 7.5


@pytest.mark.parametrize("kind", ["fixed", "adaptive"])
def test_round_with_no_arrivals_lasts_until_the_deadline(kind: str) -> None:
    cfg = WindowConfig(kind=kind, deadline_s=10.0)
    on_time, end = close_round(cfg, initial_state(cfg), _times())
    assert on_time.shape == (0,) and end == 10.0


# -- next_state ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["none", "fixed"])
def test_non_adaptive_windows_do_not_move(kind: str) -> None:
    cfg = WindowConfig(kind=kind, deadline_s=10.0)
    state = initial_state(cfg)
    assert next_state(cfg, state, _times(100.0, 200.0)) == state


def test_adaptive_moves_toward_the_quantile_with_smoothing() -> None:
    # Prepare
    cfg = WindowConfig(kind="adaptive", deadline_s=60.0, quantile=0.5, smoothing=0.25)
    state = initial_state(cfg)

    # Execute
    one = next_state(cfg, state, _times(10.0, 20.0, 30.0))  # median 20
    two = next_state(cfg, one, _times(40.0, 50.0))  # median of {10,20,30,40,50} = 30

    # Assert
    assert one.deadline_s == pytest.approx(0.75 * 60.0 + 0.25 * 20.0)
    assert one.history == ((10.0, 20.0, 30.0),)
    assert two.deadline_s == pytest.approx(0.75 * one.deadline_s + 0.25 * 30.0)
    assert two.history == ((10.0, 20.0, 30.0), (40.0, 50.0))
    assert state == initial_state(cfg)  # the input state is not changed


def test_adaptive_uses_only_the_last_rounds() -> None:
    # Prepare
    cfg = WindowConfig(kind="adaptive", deadline_s=60.0, quantile=1.0, smoothing=1.0, history=2)
    state = initial_state(cfg)

    # Execute
    for times in (_times(500.0), _times(5.0), _times(7.0)):
        state = next_state(cfg, state, times)

    # Assert: the 500 s round fell out of the history
    assert state.history == ((5.0,), (7.0,))
    assert state.deadline_s == 7.0


def test_adaptive_quantile_is_of_the_pooled_times() -> None:
    cfg = WindowConfig(kind="adaptive", deadline_s=1.0, quantile=0.8, smoothing=1.0)
    times = np.arange(1.0, 101.0)
    state = next_state(cfg, initial_state(cfg), times)
    assert state.deadline_s == pytest.approx(np.quantile(times, 0.8))


@pytest.mark.parametrize(("times", "expected"), [((1000.0, 2000.0), 100.0), ((0.01, 0.02), 2.0)])
def test_adaptive_deadline_is_clamped(times: tuple[float, ...], expected: float) -> None:
    cfg = WindowConfig(kind="adaptive", deadline_s=50.0, smoothing=1.0, min_deadline_s=2.0, max_deadline_s=100.0)
    assert next_state(cfg, initial_state(cfg), _times(*times)).deadline_s == expected


def test_adaptive_ignores_a_round_without_completions() -> None:
    cfg = WindowConfig(kind="adaptive", deadline_s=50.0)
    state = next_state(cfg, initial_state(cfg), _times(10.0))
    assert next_state(cfg, state, _times()) == state


@settings(max_examples=100, deadline=None)
@given(
    deadline=st.floats(1.0, 600.0),
    times=st.lists(st.floats(0.0, 10_000.0), min_size=1, max_size=20),
    smoothing=st.floats(0.01, 1.0),
    quantile=st.floats(0.01, 1.0),
)
def test_adaptive_step_lies_between_old_deadline_and_clamped_target(
    deadline: float, times: list[float], smoothing: float, quantile: float
) -> None:
    # Prepare
    cfg = WindowConfig(kind="adaptive", deadline_s=deadline, smoothing=smoothing, quantile=quantile)
    state = WindowState(deadline_s=deadline)

    # Execute
    new = next_state(cfg, state, np.array(times))

    # Assert
    target = float(np.quantile(times, quantile))
    lo, hi = sorted((deadline, target))
    assert cfg.min_deadline_s <= new.deadline_s <= cfg.max_deadline_s
    assert min(max(lo, cfg.min_deadline_s), cfg.max_deadline_s) - 1e-9 <= new.deadline_s
    assert new.deadline_s <= max(min(hi, cfg.max_deadline_s), cfg.min_deadline_s) + 1e-9
