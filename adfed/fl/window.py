"""The time-limited round window and its adaptive deadline.

A sync round closes at its deadline: clients that finished by then are aggregated,
later ones are counted as late and dropped. The adaptive window sets the next deadline
to an exponential moving average of the ``quantile`` of recent completion times
(including the simulated times of late clients, which the server learns when they
finish), clamped to ``[min_deadline_s, max_deadline_s]``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from adfed.config import WindowConfig


@dataclasses.dataclass(frozen=True)
class WindowState:
    deadline_s: float
    history: tuple[tuple[float, ...], ...] = ()


def initial_state(cfg: WindowConfig) -> WindowState:
    return WindowState(deadline_s=math.inf if cfg.kind == "none" else cfg.deadline_s)


def close_round(
    cfg: WindowConfig, state: WindowState, completion_s: np.ndarray
) -> tuple[np.ndarray, float]:
    """Which clients made the deadline, and when the round ends (simulated seconds).

    ``completion_s`` float [k] is each non-failed client's completion time. With no
    window the round waits for all of them.
    """
    on_time = completion_s <= state.deadline_s
    if cfg.kind == "none":
        end = float(completion_s.max()) if len(completion_s) else 0.0
    else:
        end = float(state.deadline_s)
        if on_time.all() and len(completion_s):
            end = float(completion_s.max())  # everyone arrived: close early
    return on_time, end


def next_state(cfg: WindowConfig, state: WindowState, completion_s: np.ndarray) -> WindowState:
    """The window after a round whose clients completed at ``completion_s``."""
    if cfg.kind != "adaptive" or len(completion_s) == 0:
        return state
    history = (*state.history, tuple(float(x) for x in completion_s))[-cfg.history :]
    recent = np.concatenate([np.asarray(h) for h in history])
    target = float(np.quantile(recent, cfg.quantile))
    smoothed = (1 - cfg.smoothing) * state.deadline_s + cfg.smoothing * target
    deadline = float(np.clip(smoothed, cfg.min_deadline_s, cfg.max_deadline_s))
    return WindowState(deadline_s=deadline, history=history)
