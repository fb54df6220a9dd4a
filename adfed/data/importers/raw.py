"""The common shape every format loader produces, and careful CSV reading.

A loader turns a source (a file or a directory) into a :class:`RawImport`: one flat
pandas frame with one row per future impression, still holding the source's raw ids,
plus a :class:`RawField` description of every model input column. Turning that into the
dataset layout (client grouping, dense re-numbering, schema) is shared by every format
and lives in :mod:`adfed.data.importers.build`.

Frame columns (n rows):

- ``raw_user`` int64 [n]: the source's user key (the future client).
- ``raw_ad`` int64 [n]: the source's ad key.
- ``timestamp`` int64 [n]: unix seconds (or row order where the source has no time).
- ``click`` int8 [n], ``conversion`` int8 [n] (0 or 1, conversion only where click is 1).
- one column per :class:`RawField`, named like the field: integer raw ids for
  CATEGORICAL fields, floats for DENSE fields.
"""

from __future__ import annotations

import dataclasses
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adfed.data.schema import Entity, FieldKind
from adfed.errors import DataError

#: China Standard Time (UTC+8): both TalkingData and Taobao logged Chinese traffic, so
#: hour-of-day and day-of-week are taken in local time.
CST_OFFSET_S = 8 * 3600
FRAME_KEYS: dict[str, str] = {
    "raw_user": "int64",
    "raw_ad": "int64",
    "timestamp": "int64",
    "click": "int8",
    "conversion": "int8",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RawField:
    """A model input column of a :class:`RawImport` frame.

    Parameters
    ----------
    name : field name (an identifier); also the frame column.
    kind : CATEGORICAL (raw integer ids, re-encoded densely) or DENSE (floats, kept).
    entity : USER (one value per client), AD (one value per ad) or CONTEXT (per row).
    description : one line for the schema.
    """

    name: str
    kind: FieldKind
    entity: Entity
    description: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class RawImport:
    """What a format loader returns (see the module docstring for ``frame``).

    Parameters
    ----------
    frame : the flat table, one row per impression.
    fields : every model input column besides the user and ad keys.
    sources : the files read, in the order read (their names and sha256 go into the
        manifest).
    user_description, ad_description : what the raw user and ad keys are.
    stats : counts worth recording in the manifest (rows dropped and why).
    """

    frame: pd.DataFrame
    fields: tuple[RawField, ...]
    sources: tuple[Path, ...]
    user_description: str
    ad_description: str
    stats: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in (*FRAME_KEYS, *(f.name for f in self.fields))
                   if c not in self.frame.columns]
        if missing:
            raise DataError(f"importer frame lacks columns {missing} (a loader bug)")


def _one_line(exc: BaseException) -> str:
    """The exception's text on one line, shortened at a word boundary."""
    return textwrap.shorten(str(exc), 200, placeholder=" ...")


#: suffixes pandas decompresses: their last byte says nothing about the CSV's last row
_COMPRESSED = (".gz", ".bz2", ".zip", ".xz", ".zst", ".tar")


def _ends_mid_row(path: Path) -> bool:
    """True when the (uncompressed) file's last byte is not a line break."""
    if path.suffix.lower() in _COMPRESSED or path.stat().st_size == 0:
        return False
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) not in (b"\n", b"\r")


def check_last_row(frame: pd.DataFrame, path: Path, what: str, fix: str) -> None:
    """A :class:`DataError` when the file ends mid-row and its last row lacks fields (a cut
    off download): otherwise the cut row would surface as a confusing blank or non-number
    in some column."""
    if len(frame) and frame.iloc[-1].isna().any() and _ends_mid_row(path):
        have = int(frame.iloc[-1].notna().sum())
        raise DataError(f"{path}: the last row (data row {len(frame)}) is cut off: it has {have} of "
                        f"{frame.shape[1]} fields and the file ends without a line break (an interrupted "
                        f"download or copy?); this {what} is incomplete: {fix}")


def resolve_source(src: Path, names: tuple[str, ...], fix: str) -> Path:
    """``src`` itself when it is a file; in a directory, the one of ``names`` it holds.

    Raises
    ------
    DataError : ``src`` is missing, or a directory holding none or several of ``names``.
    """
    if not src.is_dir():
        return src
    found = [src / n for n in names if (src / n).is_file()]
    if len(found) == 1:
        return found[0]
    listed = " or ".join(names)
    if not found:
        raise DataError(f"{src}: directory holds no {listed}; {fix}")
    raise DataError(f"{src}: directory holds {' and '.join(p.name for p in found)}; give one file")


def _read(path: Path, what: str, fix: str, **kwargs: Any) -> pd.DataFrame:
    try:
        with warnings.catch_warnings():  # mixed column types: the column checks after say it in one line
            warnings.simplefilter("ignore", pd.errors.DtypeWarning)
            return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: empty file, not a {what}; {fix}") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable {what} ({_one_line(exc)}); {fix}") from exc


def read_csv(
    path: Path,
    *,
    what: str,
    fix: str,
    columns: list[str] | None = None,
    normalize: Callable[[str], str] = str,
    **kwargs: Any,
) -> pd.DataFrame:
    """``pd.read_csv`` that turns every failure into a one-line :class:`DataError`.

    Parameters
    ----------
    path : the CSV file.
    what : the expected format, for the message (``"TalkingData CSV"``).
    fix : what the user should do instead, appended to the message.
    columns : when given, the header is checked for these columns first (after
        ``normalize``; a missing one is named in the error) and only they are read,
        renamed to their normalized names.
    normalize : maps a header name to the name used in ``columns``.
    kwargs : passed to ``pd.read_csv``.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found or not a file; {fix}")
    if columns is not None:
        header = _read(path, what, fix, nrows=0, **kwargs)
        names = {normalize(str(c)): c for c in header.columns}
        require_columns(header.rename(columns=lambda c: normalize(str(c))), path, columns, fix)
        kwargs["usecols"] = [names[c] for c in columns]
    frame = _read(path, what, fix, **kwargs)
    if columns is not None:
        frame.columns = [normalize(str(c)) for c in frame.columns]
    if len(frame) == 0:
        raise DataError(f"{path}: no data rows in this {what}; {fix}")
    check_last_row(frame, path, what, fix)
    return frame


def require_columns(frame: pd.DataFrame, path: Path, columns: list[str], fix: str) -> None:
    """Raise a :class:`DataError` naming the first of ``columns`` missing from ``frame``."""
    for col in columns:
        if col not in frame.columns:
            have = [str(c) for c in frame.columns[:12]]
            raise DataError(f"{path}: missing column {col!r} (found {have}); {fix}")


def int_column(frame: pd.DataFrame, col: str, path: Path, fix: str) -> np.ndarray:
    """Column ``col`` as int64, or a :class:`DataError` if it holds non-integers or blanks."""
    series = frame[col]
    if not pd.api.types.is_integer_dtype(series.dtype):
        example = series[pd.to_numeric(series, errors="coerce").isna()].head(1).tolist()
        raise DataError(
            f"{path}: column {col!r} must hold integer ids; found {example or series.dtype} "
            f"(dtype {series.dtype}); {fix}"
        )
    values: np.ndarray = series.to_numpy(dtype=np.int64)
    return values


def float_column(frame: pd.DataFrame, col: str, path: Path, fix: str) -> np.ndarray:
    """Column ``col`` as float32, or a :class:`DataError` if it holds non-numbers or blanks."""
    series = frame[col]
    values = pd.to_numeric(series, errors="coerce")
    if values.isna().any():
        raise DataError(f"{path}: column {col!r} must hold numbers; found a blank or "
                        f"non-number in row {int(values.isna().to_numpy().argmax())}; {fix}")
    out: np.ndarray = values.to_numpy(dtype=np.float32)
    return out


def binary_column(frame: pd.DataFrame, col: str, path: Path, fix: str) -> np.ndarray:
    """A 0/1 label column as int8, or a :class:`DataError` naming the bad value."""
    values = int_column(frame, col, path, fix)
    bad = (values != 0) & (values != 1)
    if bad.any():
        raise DataError(f"{path}: column {col!r} must be 0 or 1; found {values[bad][0]}; {fix}")
    return values.astype(np.int8)


def local_hour_weekday(timestamp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hour of day (0-23) and day of week (Monday=0) in China Standard Time.

    Parameters
    ----------
    timestamp : int64 [n], unix seconds.
    """
    local = timestamp.astype(np.int64) + CST_OFFSET_S
    hour = (local // 3600) % 24
    weekday = (local // 86400 + 3) % 7  # 1970-01-01 was a Thursday
    return hour, weekday
