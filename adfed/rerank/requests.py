"""Rerank requests: what the cloud sends a phone, checked at the edge, as model inputs.

A request is one user, one context (``hour``, ``slot``, ``network``) and N candidate ads
with their bids; a held-out request of a synthetic world (``requests.parquet``, see
``data_gen/requests.py``) also carries the true ``p_click`` / ``p_cvr`` of every
candidate. :class:`Requests` holds R requests of N candidates each as [R, N] arrays;
:func:`request_examples` turns them into the model's :class:`Examples` (row ``r * N + j``
is candidate ``j`` of request ``r``), the user fields read from the phone's own table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from adfed.data.examples import Examples
from adfed.data.schema import AD_KEY, LABEL_COLUMNS, USER_KEY, Entity, Schema
from adfed.data.store import Dataset, table_to_examples
from adfed.errors import AdfedError, DataError

#: the context fields a request carries
CONTEXT_FIELDS = ("hour", "slot", "network")


class RequestError(AdfedError, ValueError):
    """A rerank request is malformed: unknown user, no candidates, bad context or ad."""


@dataclasses.dataclass(frozen=True)
class Requests:
    """R requests of N candidates each.

    request_id, user_id : int64 [R].
    context : field name -> int64 [R] (:data:`CONTEXT_FIELDS`).
    candidates : int64 [R, N] ad ids, in the cloud's candidate order.
    bid : float32 [R, N].
    p_click, p_cvr : float32 [R, N], the truth; ``None`` for a live request.
    """

    request_id: np.ndarray
    user_id: np.ndarray
    context: dict[str, np.ndarray]
    candidates: np.ndarray
    bid: np.ndarray
    p_click: np.ndarray | None = None
    p_cvr: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.request_id)

    @property
    def num_candidates(self) -> int:
        """N."""
        return int(self.candidates.shape[1])

    def take(self, rows: np.ndarray) -> Requests:
        """The requests at ``rows``."""
        def sub(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[rows]
        return Requests(request_id=self.request_id[rows], user_id=self.user_id[rows],
                        context={k: v[rows] for k, v in self.context.items()},
                        candidates=self.candidates[rows], bid=self.bid[rows],
                        p_click=sub(self.p_click), p_cvr=sub(self.p_cvr))

    def with_candidates(self, columns: np.ndarray) -> Requests:
        """The same requests with only the candidates at ``columns`` (int [R, M]: per
        request, which of its N candidates to keep, in that order)."""
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.take_along_axis(a, columns, axis=1)
        return dataclasses.replace(self, candidates=np.take_along_axis(self.candidates, columns, axis=1),
                                   bid=np.take_along_axis(self.bid, columns, axis=1),
                                   p_click=pick(self.p_click), p_cvr=pick(self.p_cvr))


def _check_range(name: str, values: np.ndarray, high: int, ids: np.ndarray) -> None:
    bad = (values < 0) | (values >= high)
    if bad.any():
        row = int(np.argmax(bad.reshape(len(ids), -1).any(axis=1)))
        value = int(values.reshape(len(ids), -1)[row][bad.reshape(len(ids), -1)[row]][0])
        what = "is not a user of the dataset" if name == USER_KEY else "is out of range"
        raise RequestError(f"request {int(ids[row])}: {name} {value} {what}; it must lie in [0, {high})")


def check_requests(req: Requests, schema: Schema) -> None:
    """Raise :class:`RequestError` (one line naming the request) for an unknown user,
    an empty candidate list, a context field missing or out of its vocabulary, an unknown
    ad, or arrays whose shapes disagree."""
    ids = req.request_id
    if req.candidates.ndim != 2 or req.candidates.shape[0] != len(ids):
        raise RequestError(f"candidates must be an [R, N] array with R = {len(ids)} requests; "
                           f"got shape {req.candidates.shape}")
    if len(ids) and req.candidates.shape[1] == 0:
        raise RequestError(f"request {int(ids[0])}: the candidate list is empty; send at least one ad")
    if req.bid.shape != req.candidates.shape:
        raise RequestError(f"bid must have the candidates' shape {req.candidates.shape}; got {req.bid.shape}")
    _check_range(USER_KEY, req.user_id, schema.num_users, ids)
    for name in CONTEXT_FIELDS:
        if name not in req.context:
            raise RequestError(f"the context lacks {name!r}; a request's context has {', '.join(CONTEXT_FIELDS)}")
        if req.context[name].shape != ids.shape:
            raise RequestError(f"context field {name} must hold one value per request; got shape "
                               f"{req.context[name].shape}")
        _check_range(f"context field {name}", req.context[name], schema.field(name).vocab_size, ids)
    _check_range(AD_KEY, req.candidates, schema.num_ads, ids)
    if not np.isfinite(req.bid).all() or (req.bid < 0).any():
        raise RequestError("bids must be finite numbers >= 0")


def one_request(schema: Schema, *, user_id: Any, context: Any, candidates: Any, bids: Any,
                request_id: int = 0) -> Requests:
    """One live request (as the serving demo receives it) as :class:`Requests`, checked.

    ``context`` is a mapping with integer ``hour``, ``slot`` and ``network``; ``candidates``
    and ``bids`` are equal-length sequences of ad ids and bids.

    Raises
    ------
    RequestError : anything malformed (one line).
    """
    if not isinstance(context, Mapping):
        raise RequestError(f"request {request_id}: the context must be a mapping of {', '.join(CONTEXT_FIELDS)}; "
                           f"got {type(context).__name__}")
    try:
        user = np.array([int(user_id)], dtype=np.int64)
        cand = np.asarray(candidates, dtype=np.int64).reshape(1, -1)
        bid = np.asarray(bids, dtype=np.float32).reshape(1, -1)
        ctx = {k: np.array([int(v)], dtype=np.int64) for k, v in context.items() if k in CONTEXT_FIELDS}
    except (TypeError, ValueError) as exc:
        raise RequestError(f"request {request_id}: malformed field ({exc})") from None
    req = Requests(request_id=np.array([request_id], dtype=np.int64), user_id=user, context=ctx,
                   candidates=cand, bid=bid)
    check_requests(req, schema)
    return req


def read_requests(dataset: Dataset) -> Requests:
    """The held-out requests of ``dataset`` (``requests.parquet``), checked.

    Raises
    ------
    DataError : the dataset has no requests or a request lacks a column or has lists of
        different lengths.
    RequestError : a malformed request (see :func:`check_requests`).
    """
    path = Path(dataset.path) / "requests.parquet"
    if not path.exists():
        raise DataError(f"{path}: not found; rerank needs a synthetic world's held-out requests "
                        f"(adfed data generate writes them)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot be read ({str(exc).splitlines()[0]}); the file is truncated or damaged: "
                        f"regenerate the dataset (adfed data verify DATASET names the files that changed)") from exc
    return requests_from_table(table, dataset.schema, where=str(path))


def _matrix(table: pa.Table, name: str, dtype: type, where: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    offsets = col.offsets.to_numpy()
    lengths = np.diff(offsets)
    if len(lengths) and (lengths != lengths[0]).any():
        raise DataError(f"{where}: column {name} holds lists of different lengths; every request of a file "
                        f"must have the same number of candidates")
    n = int(lengths[0]) if len(lengths) else 0
    return col.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(lengths), n)


def requests_from_table(table: pa.Table, schema: Schema, *, where: str = "requests") -> Requests:
    """:class:`Requests` from a ``requests.parquet`` table (columns of data_gen/requests.py)."""
    need = ("request_id", USER_KEY, *CONTEXT_FIELDS, "candidates", "bid")
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise DataError(f"{where}: lacks column(s) {', '.join(missing)}")
    truth = {k: _matrix(table, k, np.float32, where) for k in ("p_click", "p_cvr") if k in table.column_names}
    req = Requests(
        request_id=table.column("request_id").to_numpy().astype(np.int64),
        user_id=table.column(USER_KEY).to_numpy().astype(np.int64),
        context={k: table.column(k).to_numpy().astype(np.int64) for k in CONTEXT_FIELDS},
        candidates=_matrix(table, "candidates", np.int64, where),
        bid=_matrix(table, "bid", np.float32, where),
        p_click=truth.get("p_click"), p_cvr=truth.get("p_cvr"),
    )
    check_requests(req, schema)
    return req


def user_table(dataset: Dataset) -> Examples:
    """Every user's fields (row ``u`` is user ``u``; ``user_id`` not included): what each
    phone holds of itself. Read once, then :func:`request_examples` takes rows of it."""
    fields = tuple(f for f in dataset.schema.by_entity(Entity.USER) if f.name != USER_KEY)
    return table_to_examples(pq.read_table(Path(dataset.path) / "users.parquet",
                                           columns=[f.name for f in fields]), fields)


def request_examples(req: Requests, users: Examples, ads: Examples) -> Examples:
    """The model inputs of every candidate of every request, ``R * N`` rows (row
    ``r * N + j`` = candidate ``j`` of request ``r``): the user's fields, ``user_id``,
    the context and the ad's fields. ``users``: :func:`user_table`; ``ads``: the
    dataset's ``ads``. The label columns are zeros (a request has no outcome yet)."""
    n = req.num_candidates
    rows = np.repeat(np.arange(len(req)), n)
    user_part = users.take(req.user_id[rows])
    ad_part = ads.take(req.candidates.ravel())
    ids = {USER_KEY: req.user_id[rows], **{k: v[rows] for k, v in req.context.items()},
           **user_part.ids, **ad_part.ids}
    return Examples(ids=ids, dense={**user_part.dense, **ad_part.dense},
                    bags={**user_part.bags, **ad_part.bags},
                    labels={k: np.zeros(len(rows), dtype=dtype) for k, dtype in LABEL_COLUMNS.items()})
