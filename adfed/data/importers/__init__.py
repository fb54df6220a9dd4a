"""Real-dataset importers: a public log in, the synthetic world's layout out.

Each format module has a ``load(src) -> RawImport`` that reads and validates the source;
:func:`import_dataset` then builds the tables (:mod:`.build`: users as clients, dense
ids, schema) and writes them with :class:`~adfed.data.layout.DatasetWriter`. Imported
datasets have no truth (no oracle metrics), no rerank requests and no devices (the FL
engine simulates device profiles when ``devices.parquet`` is absent).

Formats (see each module's docstring for the source and its quirks):

=============  ==========================================================
``talkingdata``  TalkingData AdTracking clicks -> app installs (Kaggle CSV)
``taobao``       Taobao UserBehavior events: page view -> later purchase
``aliccp``       Ali-CCP in torch-rechub's flat CSV layout (ESMM's dataset)
=============  ==========================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from adfed.data.importers import aliccp, talkingdata, taobao
from adfed.data.importers.build import build_tables
from adfed.data.importers.clients import SmallClients
from adfed.data.importers.raw import RawImport
from adfed.data.layout import ROW_GROUP_ROWS, DatasetWriter, sha256_file
from adfed.errors import DataError

logger = logging.getLogger(__name__)

Loader = Callable[[Path], RawImport]
#: Format name -> loader. Register new formats with :func:`register`.
IMPORTERS: dict[str, Loader] = {}
DEFAULT_GROUP_SIZE = 32
#: Impression rows handed to the writer at a time (whole users, about this many).
_CHUNK_ROWS = 64 * ROW_GROUP_ROWS


def register(name: str, loader: Loader, *, force: bool = False) -> None:
    """Add a format; refuses to replace an existing one unless ``force``."""
    if name in IMPORTERS and not force:
        raise ValueError(f"import format {name!r} is already registered; pass force=True")
    IMPORTERS[name] = loader


register("talkingdata", talkingdata.load)
register("taobao", taobao.load)
register("aliccp", aliccp.load)


def get_loader(fmt: str) -> Loader:
    """The loader for ``fmt``; a :class:`DataError` listing the known formats on a miss."""
    try:
        return IMPORTERS[fmt]
    except KeyError:
        known = ", ".join(sorted(IMPORTERS))
        raise DataError(f"unknown import format {fmt!r}; known: {known}") from None


def import_dataset(
    fmt: str,
    src: Path,
    out: Path,
    *,
    min_rows: int = 1,
    small_clients: SmallClients = "group",
    group_size: int = DEFAULT_GROUP_SIZE,
    overwrite: bool = False,
    seed: int = 0,
) -> Path:
    """Import a real dataset into the adfed layout at ``out``.

    Parameters
    ----------
    fmt : a key of :data:`IMPORTERS`.
    src : the source file, or a directory where the format allows one.
    out : the dataset directory to write (written to ``out.partial``, then renamed).
    min_rows : users with fewer rows are small clients.
    small_clients : ``"drop"`` removes small users; ``"group"`` packs consecutive small
        users (raw-key order) into pseudo-clients of about ``group_size`` rows (see
        :mod:`adfed.data.importers.clients`); ``users.parquet`` records ``grouped_from``.
    group_size : target rows of a pseudo-client (at least ``min_rows`` is used).
    overwrite : replace an existing ``out``.
    seed : recorded in the manifest; an import is deterministic and draws nothing.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    DataError
        Unknown format, missing or unreadable source, a missing or malformed column,
        ``out`` exists without ``overwrite``, or no client left. One line naming the
        file, the column and the fix.
    ValueError
        Bad ``min_rows``, ``small_clients`` or ``group_size``.
    """
    loader = get_loader(fmt)
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass overwrite=True or choose another out")
    if not src.exists():
        raise DataError(f"{src}: source not found; give the {fmt} file or directory")
    raw = loader(src)
    tables = build_tables(
        raw, min_rows=min_rows, small_clients=small_clients, group_size=group_size
    )
    params: dict[str, Any] = {
        "format": fmt,
        "sources": [{"file": p.name, "sha256": sha256_file(p)} for p in raw.sources],
        "min_rows": min_rows,
        "small_clients": small_clients,
        "group_size": group_size,
        "seed": seed,
    }
    writer = DatasetWriter(
        out, schema=tables.schema, generator=f"adfed.import.{fmt}", params=params,
        overwrite=overwrite,
    )
    try:
        writer.write_users(tables.users)
        writer.write_ads(tables.ads)
        imp = tables.impressions
        for start, stop in _user_chunks(imp.column("user_id").to_numpy(), _CHUNK_ROWS):
            writer.write_impressions(imp.slice(start, stop - start))
        path = writer.close(extra={"seed": seed, "import_stats": tables.stats})
    except BaseException:
        writer.abort()
        raise
    logger.info("imported %s from %s: %s", fmt, src, tables.stats)
    return path


def _user_chunks(user_id: np.ndarray, chunk_rows: int) -> list[tuple[int, int]]:
    """(start, stop) row ranges of about ``chunk_rows`` rows that never split a user.

    ``user_id`` is int [n], sorted.
    """
    n = len(user_id)
    change = np.flatnonzero(np.diff(user_id)) + 1  # first row of every user but the first
    idx = np.searchsorted(change, np.arange(chunk_rows, n, chunk_rows))
    cuts = np.unique(np.concatenate([[0], change[idx[idx < len(change)]], [n]])).tolist()
    return list(zip(cuts[:-1], cuts[1:], strict=True))


__all__ = ["IMPORTERS", "DEFAULT_GROUP_SIZE", "get_loader", "import_dataset", "register"]
