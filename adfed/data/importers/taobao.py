"""Taobao UserBehavior (Tianchi 649): page views and the purchases that followed.

Source: ``UserBehavior.csv``, or a directory holding it (no header; ``user_id, item_id, category_id,
behavior_type, timestamp``; behaviour one of ``pv, cart, fav, buy``; unix seconds).

There is no impression log, so samples are made from the event stream:

- one sample per viewed (user, item) pair, at the pair's **first** ``pv`` (its timestamp);
  a page view of an item detail page is taken as the click (``click = 1`` everywhere);
- ``conversion = 1`` when the same user bought the same item at or after that first
  view. Buys of an item the user never viewed inside the file are **dropped** (no
  sample carries them; counted as ``buys_without_pv`` in the manifest), and so are buys
  earlier than the first view (``buys_before_pv``). ``cart`` and ``fav`` events are not
  used: they happen between view and purchase and would leak the label. Users with no
  ``pv`` at all have no samples and so are not clients (``users_without_pv``);
- client = ``user_id``; ad = ``item_id`` with AD field ``category`` (``category_id``);
  CONTEXT ``hour`` and ``weekday`` of the view in China Standard Time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from adfed.data.importers.raw import (
    RawField,
    RawImport,
    int_column,
    local_hour_weekday,
    read_csv,
    resolve_source,
)
from adfed.data.schema import Entity, FieldKind
from adfed.errors import DataError

FIX = ("give Taobao's UserBehavior.csv (no header; user_id,item_id,category_id,"
       "behavior_type,timestamp)")
COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
BEHAVIOURS = {"pv", "cart", "fav", "buy"}
FIELDS = (
    RawField(name="category", kind=FieldKind.CATEGORICAL, entity=Entity.AD,
             description="item category, raw `category_id`"),
    RawField(name="hour", kind=FieldKind.CATEGORICAL, entity=Entity.CONTEXT,
             description="hour of day of the first page view, China Standard Time"),
    RawField(name="weekday", kind=FieldKind.CATEGORICAL, entity=Entity.CONTEXT,
             description="day of week of the first page view (Monday first), CST"),
)


def _read(path: Path) -> pd.DataFrame:
    frame = read_csv(path, what="Taobao UserBehavior CSV", fix=FIX, header=None)
    if frame.shape[1] != len(COLUMNS):
        raise DataError(
            f"{path}: expected {len(COLUMNS)} columns ({','.join(COLUMNS)}), "
            f"found {frame.shape[1]}; {FIX}"
        )
    frame.columns = COLUMNS
    for col in ("user_id", "item_id", "category_id", "timestamp"):
        int_column(frame, col, path, FIX + "; a header row is not allowed")
    behaviour = frame["behavior_type"].astype(str)
    unknown = sorted(set(behaviour.unique()) - BEHAVIOURS)
    if unknown:
        raise DataError(
            f"{path}: column 'behavior_type' must be one of {sorted(BEHAVIOURS)}; "
            f"found {unknown[:3]}; {FIX}"
        )
    frame["behavior_type"] = behaviour
    return frame


def _samples(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """First page view of every (user, item) pair, labelled by a later buy."""
    views = frame[frame["behavior_type"] == "pv"]
    order = np.lexsort((np.arange(len(views)), views["timestamp"].to_numpy(),
                        views["item_id"].to_numpy(), views["user_id"].to_numpy()))
    first = views.iloc[order].drop_duplicates(["user_id", "item_id"], keep="first")
    buys = frame[frame["behavior_type"] == "buy"]
    last_buy = (buys.groupby(["user_id", "item_id"], sort=True)["timestamp"].max()
                .rename("last_buy").reset_index())
    joined = first.merge(last_buy, on=["user_id", "item_id"], how="left", sort=False)
    bought = (joined["last_buy"].to_numpy() >= joined["timestamp"].to_numpy())
    with_pv = buys.merge(first[["user_id", "item_id", "timestamp"]],
                         on=["user_id", "item_id"], how="left", suffixes=("", "_pv"))
    pv_time = with_pv["timestamp_pv"].to_numpy(dtype=np.float64)
    stats = {
        "events": len(frame),
        "buys": len(buys),
        "buys_without_pv": int(np.isnan(pv_time).sum()),
        "buys_before_pv": int((with_pv["timestamp"].to_numpy() < pv_time).sum()),
        "viewed_pairs": len(joined),
        "users_without_pv": int(frame["user_id"].nunique() - first["user_id"].nunique()),
    }
    joined = joined.assign(conversion=bought.astype(np.int8))
    return joined, stats


def load(src: Path) -> RawImport:
    """Read a UserBehavior CSV file into a :class:`RawImport` (module docstring).

    Raises
    ------
    DataError
        ``src`` is unreadable (or a directory without UserBehavior.csv), has the wrong number of columns or a header row, holds a
        non-integer id or an unknown ``behavior_type``, or has no page views.
    """
    path = resolve_source(Path(src), ("UserBehavior.csv",), FIX)
    frame = _read(path)
    samples, stats = _samples(frame)
    if len(samples) == 0:
        raise DataError(f"{path}: no 'pv' events, so no samples; {FIX}")
    timestamp = samples["timestamp"].to_numpy(dtype=np.int64)
    hour, weekday = local_hour_weekday(timestamp)
    table = pd.DataFrame({
        "raw_user": samples["user_id"].to_numpy(dtype=np.int64),
        "raw_ad": samples["item_id"].to_numpy(dtype=np.int64),
        "timestamp": timestamp,
        "click": np.ones(len(samples), dtype=np.int8),
        "conversion": samples["conversion"].to_numpy(dtype=np.int8),
        "category": samples["category_id"].to_numpy(dtype=np.int64),
        "hour": hour,
        "weekday": weekday,
    })
    return RawImport(
        frame=table,
        fields=FIELDS,
        sources=(path,),
        user_description="Taobao user (raw `user_id`)",
        ad_description="the viewed item (raw `item_id`)",
        stats=stats,
    )
