"""Device profiles: heterogeneous, heavy-tailed compute, network and availability.

Columns are ``adfed.data.layout.DEVICE_COLUMNS`` plus ``user_id`` (one device per
user). Each is log-normal or logit-normal, so a few devices are very slow, badly
connected or flaky::

    compute_speed       examples/s   exp(log 300 + brand tier + 0.8 N)  (brand 0, the
                                     premium maker, is fastest; tiers fall with rank)
    bandwidth_down_kbps kbps         exp(log 8000 + 1.0 N)
    bandwidth_up_kbps   kbps         down * exp(log 0.25 + 0.5 N)  (correlated)
    latency_ms          ms           exp(log 60 + 0.6 N)
    online_prob         probability  sigmoid(0.8 + 1.2 N)    mean ~0.65
    dropout_prob        probability  sigmoid(-3.0 + 1.1 N)   mean ~0.07, heavy upper tail
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from adfed.data.layout import DEVICE_COLUMNS
from data_gen import arrow, rng
from data_gen.users import check_user_ids, user_state

if TYPE_CHECKING:
    from data_gen.users import UserState
    from data_gen.world import World

S_DEVICE = 30


def _brand_tier(num_brands: int) -> np.ndarray:
    """Log speed offset per brand: premium brand 0 fastest, then falling with rank."""
    tier = -0.08 * np.arange(num_brands, dtype=np.float64)
    tier[0] = 0.4
    return tier


def devices_from_state(world: World, st: UserState) -> pa.Table:
    """Device table of the users of ``st`` (see module docstring)."""
    n = rng.normal(rng.keys(world.seed, st.user_id, S_DEVICE)[:, None], np.arange(6)[None, :])
    speed = np.exp(np.log(300.0) + _brand_tier(world.params.num_device_brands)[st.brand]
                   + 0.8 * n[:, 0])
    down = np.exp(np.log(8000.0) + 1.0 * n[:, 1])
    up = down * np.exp(np.log(0.25) + 0.5 * n[:, 2])
    latency = np.exp(np.log(60.0) + 0.6 * n[:, 3])
    online = 1.0 / (1.0 + np.exp(-(0.8 + 1.2 * n[:, 4])))
    dropout = 1.0 / (1.0 + np.exp(-(-3.0 + 1.1 * n[:, 5])))
    values = {
        "compute_speed": speed, "bandwidth_up_kbps": up, "bandwidth_down_kbps": down,
        "latency_ms": latency, "online_prob": online, "dropout_prob": dropout,
    }
    cols: dict[str, pa.Array] = {"user_id": arrow.column(st.user_id, pa.int64())}
    for name, dtype in DEVICE_COLUMNS.items():
        cols[name] = arrow.column(values[name], pa.from_numpy_dtype(np.dtype(dtype)))
    return arrow.table(cols)


def devices_table(world: World, user_ids: np.ndarray) -> pa.Table:
    """``devices.parquet`` rows of users ``user_ids``: ``user_id`` + DEVICE_COLUMNS."""
    ids = check_user_ids(user_ids, world.params.num_users)
    return devices_from_state(world, user_state(world, ids))
