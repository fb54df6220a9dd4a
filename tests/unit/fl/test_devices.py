"""Device profiles and simulated round times."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from adfed.data.layout import DEVICE_COLUMNS
from adfed.fl.devices import DeviceProfiles, failures, round_trip_s


def _uniform(n: int, **values: float) -> DeviceProfiles:
    base = {"compute_speed": 100.0, "bandwidth_up_kbps": 1000.0, "bandwidth_down_kbps": 8000.0,
            "latency_ms": 50.0, "online_prob": 1.0, "dropout_prob": 0.0, **values}
    return DeviceProfiles(**{k: np.full(n, v, dtype=np.float32) for k, v in base.items()})


def test_round_trip_by_hand() -> None:
    # Prepare: 50 ms latency each way, 1 MB down at 8 Mbit/s, 125 kB up at 1 Mbit/s,
    # 250 examples at 100 examples/s
    profiles = _uniform(3)

    # Execute
    t = round_trip_s(profiles, np.array([1]), bytes_down=np.array([1_000_000]),
                     bytes_up=np.array([125_000]), examples=np.array([250]))

    # Assert
    assert t.dtype == np.float64
    assert t.tolist() == pytest.approx([2 * 0.05 + 1.0 + 2.5 + 1.0])


def test_round_trip_indexes_each_clients_profile() -> None:
    # Prepare
    profiles = _uniform(4)
    profiles.compute_speed[2] = 10.0
    profiles.latency_ms[3] = 1000.0

    # Execute
    t = round_trip_s(profiles, np.array([3, 2, 0]), bytes_down=np.zeros(3), bytes_up=np.zeros(3),
                     examples=np.array([100, 100, 100]))

    # Assert
    assert t.tolist() == pytest.approx([2.0 + 1.0, 0.1 + 10.0, 0.1 + 1.0])


def test_round_trip_survives_zero_compute_speed() -> None:
    profiles = _uniform(1, compute_speed=0.0)
    t = round_trip_s(profiles, np.array([0]), bytes_down=np.zeros(1), bytes_up=np.zeros(1),
                     examples=np.array([1]))
    assert np.isfinite(t).all() and t[0] > 1e5


def test_simulate_is_deterministic_per_seed() -> None:
    a = DeviceProfiles.simulate(500, np.random.default_rng(3))
    b = DeviceProfiles.simulate(500, np.random.default_rng(3))
    c = DeviceProfiles.simulate(500, np.random.default_rng(4))
    for name in DEVICE_COLUMNS:
        assert np.array_equal(getattr(a, name), getattr(b, name))
        assert not np.array_equal(getattr(a, name), getattr(c, name))
    assert a.simulated


def test_simulate_is_heavy_tailed_and_in_range(rng: np.random.Generator) -> None:
    # Execute
    p = DeviceProfiles.simulate(20_000, rng)

    # Assert
    for name in DEVICE_COLUMNS:
        arr = getattr(p, name)
        assert arr.shape == (20_000,) and arr.dtype == np.float32
    for name in ("compute_speed", "bandwidth_up_kbps", "bandwidth_down_kbps", "latency_ms"):
        arr = getattr(p, name)
        median = np.median(arr)
        assert (arr > 0).all()
        assert arr.mean() > 1.1 * median  # right-skewed
        assert np.quantile(arr, 0.99) > 3 * median  # a long upper tail
    assert ((p.online_prob >= 0) & (p.online_prob <= 1)).all()
    assert ((p.dropout_prob >= 0) & (p.dropout_prob <= 1)).all()


def test_simulated_round_times_are_heavy_tailed(rng: np.random.Generator) -> None:
    p = DeviceProfiles.simulate(20_000, rng)
    n = 20_000
    t = round_trip_s(p, np.arange(n), bytes_down=np.full(n, 2e6), bytes_up=np.full(n, 5e5),
                     examples=np.full(n, 200))
    assert np.quantile(t, 0.99) > 4 * np.median(t)


def test_failure_rate_matches_dropout_prob(rng: np.random.Generator) -> None:
    # Prepare
    n = 50_000
    profiles = _uniform(n, dropout_prob=0.1)

    # Execute
    failed = failures(profiles, np.arange(n), rng)

    # Assert
    assert failed.dtype == bool and failed.shape == (n,)
    assert failed.mean() == pytest.approx(0.1, abs=0.01)


def test_failures_follow_each_clients_probability(rng: np.random.Generator) -> None:
    profiles = _uniform(4)
    profiles.dropout_prob[:] = [0.0, 1.0, 0.0, 1.0]
    failed = failures(profiles, np.tile(np.arange(4), 100), rng)
    assert failed.reshape(100, 4).all(axis=0).tolist() == [False, True, False, True]
    assert failed.reshape(100, 4).any(axis=0).tolist() == [False, True, False, True]


def test_from_table_places_rows_by_user_id() -> None:
    # Prepare: rows out of order, user 1 absent
    users = np.array([3, 0, 2])
    table = pa.table({"user_id": users,
                      **{k: pa.array(users.astype(np.float32) + i, pa.float32()) for i, k in enumerate(DEVICE_COLUMNS)}})

    # Execute
    p = DeviceProfiles.from_table(table, num_users=4)

    # Assert
    assert p.compute_speed.tolist() == [0.0, 0.0, 2.0, 3.0]
    assert p.dropout_prob.tolist() == [5.0, 0.0, 7.0, 8.0]
    assert not p.simulated
