"""TalkingData AdTracking (Kaggle 2018): mobile-ad clicks and the app installs they led to.

Source: ``train.csv`` or the official 100,000-row ``train_sample.csv`` (or a directory holding one); columns ``ip, app,
device, os, channel, click_time, attributed_time, is_attributed``. Some copies write the
header as ``..ip,...`` (leading dots): dots are stripped from every column name.

Mapping:

- client = ``ip`` (the only user-like key; NAT'd ips make some clients very large);
- ad = ``app`` (the advertised app); no AD fields, no USER fields;
- CONTEXT: ``device``, ``os``, ``channel`` (the publisher), ``hour`` and ``weekday`` of
  ``click_time`` in China Standard Time (the file is UTC);
- every row is a click (``click = 1``); ``conversion = is_attributed`` (an install);
  ``timestamp`` = ``click_time`` in unix seconds. ``attributed_time`` is not used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from adfed.data.importers.raw import (
    RawField,
    RawImport,
    binary_column,
    int_column,
    local_hour_weekday,
    read_csv,
    resolve_source,
)
from adfed.data.schema import Entity, FieldKind
from adfed.errors import DataError

FIX = "give TalkingData's train.csv or train_sample.csv (Kaggle talkingdata-adtracking)"
ID_COLUMNS = ["ip", "app", "device", "os", "channel"]
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
FIELDS = (
    RawField(name="device", kind=FieldKind.CATEGORICAL, entity=Entity.CONTEXT,
             description="device type (phone model) of the click, raw `device`"),
    RawField(name="os", kind=FieldKind.CATEGORICAL, entity=Entity.CONTEXT,
             description="OS version of the clicking device, raw `os`"),
    RawField(name="channel", kind=FieldKind.CATEGORICAL, entity=Entity.CONTEXT,
             description="ad publisher channel, raw `channel`"),
    RawField(name="hour", kind=FieldKind.CATEGORICAL, entity=Entity.CONTEXT,
             description="hour of day of the click, China Standard Time"),
    RawField(name="weekday", kind=FieldKind.CATEGORICAL, entity=Entity.CONTEXT,
             description="day of week of the click (Monday first), China Standard Time"),
)


def _click_seconds(frame: pd.DataFrame, path: Path) -> np.ndarray:
    raw = frame["click_time"]
    when = pd.to_datetime(raw, format=TIME_FORMAT, errors="coerce")
    failed = when.isna().to_numpy()
    if failed.any():  # the first failure, whole (to_datetime's own message is long)
        row = int(failed.argmax())
        value = raw.iloc[row]
        if pd.isna(value) or not str(value).strip():
            raise DataError(f"{path}: column 'click_time' is blank in data row {row + 1}; {FIX}")
        raise DataError(f"{path}: column 'click_time' must hold 'YYYY-MM-DD HH:MM:SS' times; data row "
                        f"{row + 1} holds {str(value)!r}; {FIX}")
    seconds: np.ndarray = when.to_numpy().astype("datetime64[s]").astype(np.int64)
    return seconds


def load(src: Path) -> RawImport:
    """Read a TalkingData CSV file into a :class:`RawImport` (module docstring).

    Raises
    ------
    DataError
        ``src`` is unreadable or a directory without train.csv / train_sample.csv, a column is missing, an id is not an
        integer, ``click_time`` does not parse, or ``is_attributed`` is not 0/1.
    """
    path = resolve_source(Path(src), ("train.csv", "train_sample.csv"), FIX)
    frame = read_csv(path, what="TalkingData CSV", fix=FIX,
                     columns=[*ID_COLUMNS, "click_time", "is_attributed"],
                     normalize=lambda c: c.lstrip("."))
    ids = {c: int_column(frame, c, path, FIX) for c in ID_COLUMNS}
    timestamp = _click_seconds(frame, path)
    conversion = binary_column(frame, "is_attributed", path, FIX)
    hour, weekday = local_hour_weekday(timestamp)
    table = pd.DataFrame({
        "raw_user": ids["ip"],
        "raw_ad": ids["app"],
        "timestamp": timestamp,
        "click": np.ones(len(frame), dtype=np.int8),
        "conversion": conversion,
        "device": ids["device"],
        "os": ids["os"],
        "channel": ids["channel"],
        "hour": hour,
        "weekday": weekday,
    })
    return RawImport(
        frame=table,
        fields=FIELDS,
        sources=(path,),
        user_description="TalkingData ip (raw `ip`)",
        ad_description="the advertised app (raw `app`)",
    )
