"""The ads table."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from data_gen import arrow

if TYPE_CHECKING:
    from data_gen.world import World


def ads_table(world: World) -> pa.Table:
    """``ads.parquet``: row ``i`` is ad ``i``.

    Columns: ``ad_id``, ``advertiser_id``, ``ad_category``, ``creative_type`` int32 and
    ``bid`` float32 (price per conversion, currency units). Ad latents and quality
    coefficients are truth and stay out of the file.
    """
    n = world.params.num_ads
    return arrow.table({
        "ad_id": arrow.column(np.arange(n, dtype=np.int32), pa.int32()),
        "advertiser_id": arrow.column(world.ad_advertiser, pa.int32()),
        "ad_category": arrow.column(world.ad_category, pa.int32()),
        "creative_type": arrow.column(world.ad_creative, pa.int32()),
        "bid": arrow.column(world.ad_bid, pa.float32()),
    })
