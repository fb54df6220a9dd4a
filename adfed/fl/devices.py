"""Device profiles and simulated time.

A client's simulated round time is download + compute + upload, from the payload bytes
and its device profile (DESIGN.md "Federated engine"). Profiles come from the dataset's
``devices.parquet`` (the synthetic world) or, for real imports that have none, are
simulated from the run seed with the same kind of heavy-tailed distributions (say so in
results: such times are simulated, not measured).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa

from adfed.data.layout import DEVICE_COLUMNS


@dataclasses.dataclass(frozen=True)
class DeviceProfiles:
    """Arrays indexed by user id (float32 [num_users] each)."""

    compute_speed: np.ndarray  # examples / s
    bandwidth_up_kbps: np.ndarray
    bandwidth_down_kbps: np.ndarray
    latency_ms: np.ndarray
    online_prob: np.ndarray
    dropout_prob: np.ndarray
    simulated: bool = False

    @classmethod
    def from_table(cls, table: pa.Table, num_users: int) -> DeviceProfiles:
        users = table.column("user_id").to_numpy()
        cols: dict[str, Any] = {}
        for name in DEVICE_COLUMNS:
            arr = np.zeros(num_users, dtype=np.float32)
            arr[users] = table.column(name).to_numpy()
            cols[name] = arr
        return cls(**cols)

    @classmethod
    def simulate(cls, num_users: int, rng: np.random.Generator) -> DeviceProfiles:
        """Heavy-tailed profiles for datasets without devices.parquet."""
        n = num_users
        return cls(
            compute_speed=rng.lognormal(np.log(400.0), 0.7, n).astype(np.float32),
            bandwidth_up_kbps=rng.lognormal(np.log(2000.0), 1.0, n).astype(np.float32),
            bandwidth_down_kbps=rng.lognormal(np.log(8000.0), 1.0, n).astype(np.float32),
            latency_ms=rng.lognormal(np.log(80.0), 0.6, n).astype(np.float32),
            online_prob=rng.beta(4.0, 2.0, n).astype(np.float32),
            dropout_prob=rng.beta(1.0, 15.0, n).astype(np.float32),
            simulated=True,
        )


def round_trip_s(
    profiles: DeviceProfiles,
    clients: np.ndarray,
    *,
    bytes_down: np.ndarray,
    bytes_up: np.ndarray,
    examples: np.ndarray,
) -> np.ndarray:
    """Simulated seconds from round start to upload done, float64 [len(clients)]."""
    lat = profiles.latency_ms[clients].astype(np.float64) / 1000.0
    down = bytes_down * 8.0 / (1000.0 * profiles.bandwidth_down_kbps[clients])
    up = bytes_up * 8.0 / (1000.0 * profiles.bandwidth_up_kbps[clients])
    compute = examples / np.maximum(profiles.compute_speed[clients].astype(np.float64), 1e-6)
    return 2 * lat + down + compute + up


def failures(profiles: DeviceProfiles, clients: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Which clients drop out during the round (bool [len(clients)])."""
    return rng.random(len(clients)) < profiles.dropout_prob[clients]
