"""Fixtures: one mid-sized world, built and materialised once per session.

20,000 users / 2,000 ads (about 330k impressions, 10k clicks, 1k conversions): enough
rows for the statistical properties to be decided well outside their noise, small
enough to build in about a second.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from data_gen.ads import ads_table
from data_gen.calibrate import build_world
from data_gen.impressions import impressions_tables
from data_gen.params import WorldParams
from data_gen.users import users_table
from data_gen.world import World

SEED = 11
NUM_USERS = 20_000


@dataclasses.dataclass(frozen=True)
class Materialised:
    world: World
    impressions: pd.DataFrame  # impressions + truth columns
    users: pd.DataFrame  # scalar user columns (row i is user i)
    user_lists: pa.Table  # the list-valued user columns, as arrow
    ads: pd.DataFrame


@pytest.fixture(scope="session")
def world() -> World:
    return build_world(WorldParams(num_users=NUM_USERS, num_ads=2_000), SEED)


@pytest.fixture(scope="session")
def data(world: World) -> Materialised:
    ids = np.arange(NUM_USERS)
    imp, truth = impressions_tables(world, ids)
    df = imp.to_pandas()
    df["p_click"] = truth.column("p_click").to_numpy()
    df["p_cvr"] = truth.column("p_cvr").to_numpy()
    users = users_table(world, ids)
    lists = [f.name for f in users.schema if pa.types.is_list(f.type)]
    return Materialised(world=world, impressions=df, users=users.drop_columns(lists).to_pandas(),
                        user_lists=users.select(lists), ads=ads_table(world).to_pandas())
