"""Turn a :class:`RawImport` into the dataset layout, the same for every format.

Steps (all deterministic; nothing random happens in an import):

1. Count rows per raw user and choose clients (:func:`plan_clients`: keep, drop or group
   small users). Clients become ``user_id`` ``0 .. U-1`` in raw-key order.
2. An **ad** is a distinct combination of the raw ad key and the AD fields (for most
   sources the key alone; see :mod:`aliccp` for why not always), numbered ``0 .. A-1`` in
   sorted order of that combination.
3. Every CATEGORICAL field is re-encoded densely, ``0 .. V-1`` in sorted raw-value order,
   over the table that carries it (users, ads or the kept impressions), so that
   ``vocab_size == max + 1`` and every id is used. DENSE fields are kept as float32.
4. USER fields take the value of the client's earliest row; for a pseudo-client, of its
   first member (grouping is lossy for user fields).
5. Impressions are sorted by ``(user_id, timestamp)`` (ties keep source order) and carry
   ``label_observed = True``; no truth, requests or devices are written.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa

from adfed.data.importers.clients import SmallClients, plan_clients
from adfed.data.importers.raw import RawField, RawImport
from adfed.data.schema import (
    AD_KEY,
    USER_KEY,
    Entity,
    FieldKind,
    FieldSpec,
    ParamGroup,
    Schema,
    Visibility,
    default_group,
)
from adfed.errors import DataError


@dataclasses.dataclass(frozen=True)
class Tables:
    """The three tables of an imported dataset, its schema and import counts."""

    users: pa.Table
    ads: pa.Table
    impressions: pa.Table
    schema: Schema
    stats: dict[str, int]


def _encode(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense codes (int32, sorted by raw value) and the vocabulary size."""
    uniq, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int32).reshape(-1), len(uniq)


def _column(raw: RawImport, f: RawField, rows: np.ndarray) -> tuple[np.ndarray, int]:
    values = raw.frame[f.name].to_numpy()[rows]
    if f.kind is FieldKind.DENSE:
        return values.astype(np.float32), 0
    return _encode(values)


def _spec(f: RawField, vocab: int) -> FieldSpec:
    return FieldSpec(
        name=f.name, kind=f.kind, vocab_size=vocab, visibility=Visibility.CLOUD,
        entity=f.entity,
        group=ParamGroup.DENSE_SHARED if f.kind is FieldKind.DENSE else default_group(vocab),
        description=f.description,
    )


def _order_rows(
    raw: RawImport, *, min_rows: int, small: SmallClients, group_size: int
) -> tuple[np.ndarray, np.ndarray, pa.Table, dict[str, int]]:
    """Kept rows in (client, timestamp, source) order, their client ids, the clients."""
    raw_user = raw.frame["raw_user"].to_numpy(dtype=np.int64)
    timestamp = raw.frame["timestamp"].to_numpy(dtype=np.int64)
    users, inverse, counts = np.unique(raw_user, return_inverse=True, return_counts=True)
    client_of_user, grouped_from = plan_clients(
        counts, min_rows=min_rows, small=small, group_size=group_size
    )
    if len(grouped_from) == 0:
        raise DataError(
            f"no user has >= {min_rows} rows (largest has {int(counts.max())}); "
            "lower min_rows (--min-rows) or group small users (--small-clients group)"
        )
    client = client_of_user[inverse.reshape(-1)]
    kept = np.flatnonzero(client >= 0)
    rows = kept[np.lexsort((kept, timestamp[kept], client[kept]))]
    first_member = np.unique(client_of_user[client_of_user >= 0], return_index=True)[1]
    first_member = np.flatnonzero(client_of_user >= 0)[first_member]
    clients = pa.table({
        USER_KEY: pa.array(np.arange(len(grouped_from), dtype=np.int64)),
        "raw_user": pa.array(users[first_member].astype(np.int64)),
        "grouped_from": pa.array(grouped_from),
    })
    stats = {
        "raw_users": len(users),
        "raw_rows": len(raw_user),
        "dropped_users": int((client_of_user < 0).sum()),
        "dropped_rows": len(raw_user) - len(rows),
        "pseudo_clients": int((grouped_from > 1).sum()),
    }
    return rows, client[rows], clients, stats


def _users_table(raw: RawImport, clients: pa.Table, rows: np.ndarray,
                 user_id: np.ndarray) -> tuple[pa.Table, list[FieldSpec]]:
    first_row = rows[np.unique(user_id, return_index=True)[1]]
    specs = [FieldSpec(
        name=USER_KEY, kind=FieldKind.CATEGORICAL, vocab_size=clients.num_rows,
        visibility=Visibility.PRIVATE, entity=Entity.USER,
        group=default_group(clients.num_rows, is_user_key=True),
        description=f"the client (phone): {raw.user_description}",
    )]
    for f in raw.fields:
        if f.entity is Entity.USER:
            values, vocab = _column(raw, f, first_row)
            clients = clients.append_column(f.name, pa.array(values))
            specs.append(_spec(f, vocab))
    return clients, specs


def _ads(raw: RawImport, rows: np.ndarray) -> tuple[np.ndarray, pa.Table, list[FieldSpec]]:
    """Dense ad id of every kept row, the ads table and the AD field specs."""
    ad_fields = [f for f in raw.fields if f.entity is Entity.AD]
    keys = raw.frame.iloc[rows][["raw_ad", *(f.name for f in ad_fields)]]
    ad_id = keys.groupby(list(keys.columns), sort=True).ngroup().to_numpy(dtype=np.int64)
    num_ads = int(ad_id.max()) + 1
    first_row = rows[np.unique(ad_id, return_index=True)[1]]
    columns: dict[str, pa.Array] = {AD_KEY: pa.array(np.arange(num_ads, dtype=np.int64))}
    specs = [FieldSpec(
        name=AD_KEY, kind=FieldKind.CATEGORICAL, vocab_size=num_ads,
        visibility=Visibility.CLOUD, entity=Entity.AD, group=default_group(num_ads),
        description=raw.ad_description,
    )]
    for f in ad_fields:
        values, vocab = _column(raw, f, first_row)
        columns[f.name] = pa.array(values)
        specs.append(_spec(f, vocab))
    columns["bid"] = pa.array(np.ones(num_ads, dtype=np.float32))  # unknown in real logs
    columns["raw_ad"] = pa.array(raw.frame["raw_ad"].to_numpy(dtype=np.int64)[first_row])
    return ad_id, pa.table(columns), specs


def build_tables(
    raw: RawImport, *, min_rows: int, small_clients: SmallClients, group_size: int
) -> Tables:
    """Build users, ads and impressions tables and the :class:`Schema` (module docstring).

    Raises
    ------
    DataError
        When no client is left (every user dropped).
    ValueError
        For bad ``min_rows`` / ``small_clients`` / ``group_size``.
    """
    rows, user_id, clients, stats = _order_rows(
        raw, min_rows=min_rows, small=small_clients, group_size=group_size
    )
    users, user_specs = _users_table(raw, clients, rows, user_id)
    ad_id, ads, ad_specs = _ads(raw, rows)
    columns: dict[str, pa.Array] = {USER_KEY: pa.array(user_id), AD_KEY: pa.array(ad_id)}
    ctx_specs = []
    for f in raw.fields:
        if f.entity is Entity.CONTEXT:
            values, vocab = _column(raw, f, rows)
            columns[f.name] = pa.array(values)
            ctx_specs.append(_spec(f, vocab))
    frame: pd.DataFrame = raw.frame
    columns["timestamp"] = pa.array(frame["timestamp"].to_numpy(dtype=np.int64)[rows])
    columns["click"] = pa.array(frame["click"].to_numpy(dtype=np.int8)[rows])
    columns["conversion"] = pa.array(frame["conversion"].to_numpy(dtype=np.int8)[rows])
    columns["label_observed"] = pa.array(np.ones(len(rows), dtype=bool))
    schema = Schema(
        fields=(*user_specs, *ad_specs, *ctx_specs),
        num_users=users.num_rows, num_ads=ads.num_rows,
    )
    stats = {**raw.stats, **stats, "users": users.num_rows, "ads": ads.num_rows,
             "rows": len(rows)}
    return Tables(users=users, ads=ads, impressions=pa.table(columns), schema=schema,
                  stats=stats)
