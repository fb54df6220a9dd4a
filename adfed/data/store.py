"""Reading a dataset: validation, lazy per-client access, joins, the time split.

:class:`Dataset` opens a directory written by :class:`adfed.data.layout.DatasetWriter`
(synthetic world or real import). Opening reads the manifest, the index and the small ads
table, and checks every file's footer and columns; per-client access then reads only the
row groups that hold that client's rows (see ``layout.ROW_GROUP_ROWS``).
"""

from __future__ import annotations

import collections
import json
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from adfed.data.examples import Examples, id_dtype
from adfed.data.layout import DEVICE_COLUMNS, FORMAT_VERSION, MANIFEST, sha256_file
from adfed.data.schema import (
    AD_KEY,
    LABEL_COLUMNS,
    TRUTH_COLUMNS,
    USER_KEY,
    Entity,
    FieldKind,
    FieldSpec,
    Schema,
)
from adfed.errors import DataError

TRUTH_PREFIX = "truth_"
#: the label column kept for bookkeeping only (a user's rows are stored in time order)
TIME_COLUMN = "timestamp"
#: ``load(user_ids)`` scans every shard only when the users hold more than this share of
#: all rows; otherwise it reads their own rows. A scan decodes the whole dataset at once
#: (measured: +1.3 GiB peak RSS for 1,000 test users of a 1M-user world, 19M rows).
_SCAN_SHARE = 0.125
#: Row groups decoded at once by a read that keeps nothing (``cache=False``): bounds its
#: memory (1,000 test users of a 1M-user world touch ~250 groups of users.parquet alone).
_ONE_OFF_GROUPS = 16
#: Bytes of decoded row groups kept per dataset (an LRU; a row group is ~0.1-1 MB
#: decoded, so the demo dataset fits whole and a 1M-user one keeps its hottest groups).
_CACHE_BYTES = 256 * 2**20
#: Bytes of decoded ``users.parquet`` row groups kept per dataset (its own LRU: the
#: whole table of a 1M-user world, ~200 MB, so a round's user rows cost no decoding).
_USER_CACHE_BYTES = 256 * 2**20


def _expected_type(spec: FieldSpec) -> tuple[str, ...]:
    if spec.kind is FieldKind.DENSE:
        return ("float", "double")
    if spec.is_bag:
        return ("list<item: int32>", "list<element: int32>", "list<item: int64>",
                "list<element: int64>")
    return ("int32", "int64")


def _check_columns(path: Path, schema: pa.Schema, fields: dict[str, tuple[str, ...]]) -> None:
    for name, allowed in fields.items():
        idx = schema.get_field_index(name)
        if idx < 0:
            raise DataError(f"{path}: missing column {name!r}; regenerate or re-import the dataset")
        got = str(schema.field(idx).type)
        if got not in allowed:
            raise DataError(f"{path}: column {name!r} has type {got}; expected one of {allowed}")


def _check_ranges(path: Path, file: pq.ParquetFile, limits: dict[str, int]) -> None:
    """Every id of the columns in ``limits`` lies in ``[0, limit)`` and no id is null, by the
    footer's column statistics (no data is read; a file written without them is not checked).

    A null would become -2**31 and an id past the vocabulary would read another row or fail
    deep in training; both are refused here, naming the file and the column.
    """
    md = file.metadata
    for g in range(md.num_row_groups):
        group = md.row_group(g)
        for j in range(group.num_columns):
            column = group.column(j)
            name = column.path_in_schema.split(".")[0]
            stats = column.statistics
            if name not in limits or stats is None:
                continue
            # a list column's leaf counts empty bags as nulls: only top-level ids are checked
            if stats.null_count and "." not in column.path_in_schema:
                raise DataError(f"{path}: column {name!r} has {stats.null_count} null values; "
                                f"regenerate or re-import the dataset")
            if stats.has_min_max and (int(stats.min) < 0 or int(stats.max) >= limits[name]):
                raise DataError(f"{path}: column {name!r} holds ids in [{stats.min}, {stats.max}], outside "
                                f"its vocabulary [0, {limits[name]}); regenerate or re-import the dataset")


def _open_parquet(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise DataError(f"{path}: file is missing; regenerate or re-import the dataset")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        detail = " ".join(str(exc).split()).rstrip(".")
        raise DataError(f"{path}: not a readable parquet file (truncated?): {detail}; "
                        "regenerate or re-import the dataset") from exc


def table_to_examples(table: pa.Table, fields: tuple[FieldSpec, ...]) -> Examples:
    """Convert the given fields of an arrow table into columnar arrays."""
    ids: dict[str, np.ndarray] = {}
    dense: dict[str, np.ndarray] = {}
    bags: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for spec in fields:
        col = table.column(spec.name).combine_chunks()
        if spec.kind is FieldKind.DENSE:
            dense[spec.name] = col.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        elif spec.is_bag:
            # flatten() honours a sliced list array's offset (``values`` would be the whole
            # child array); offsets are then rebased to 0
            values = col.flatten().to_numpy(zero_copy_only=False).astype(id_dtype(spec.vocab_size), copy=False)
            offsets = col.offsets.to_numpy().astype(np.int64)
            bags[spec.name] = (values, offsets - offsets[0])
        else:
            ids[spec.name] = col.to_numpy(zero_copy_only=False).astype(id_dtype(spec.vocab_size), copy=False)
    return Examples(ids=ids, dense=dense, bags=bags, labels={})


def _merge(*parts: Examples, labels: dict[str, np.ndarray]) -> Examples:
    ids: dict[str, np.ndarray] = {}
    dense: dict[str, np.ndarray] = {}
    bags: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for p in parts:
        ids.update(p.ids)
        dense.update(p.dense)
        bags.update(p.bags)
    return Examples(ids=ids, dense=dense, bags=bags, labels=labels)


class _TableCache:
    """An LRU of decoded row groups, bounded in bytes (shared by a dataset's files)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._tables: collections.OrderedDict[Any, pa.Table] = collections.OrderedDict()

    def get(self, key: Any) -> pa.Table | None:
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
        return table

    def put(self, key: Any, table: pa.Table) -> None:
        self._tables[key] = table
        self.nbytes += table.nbytes
        while self.nbytes > self.max_bytes and len(self._tables) > 1:
            self.nbytes -= self._tables.popitem(last=False)[1].nbytes


def _damaged(path: Path, exc: Exception) -> str:
    """The one-line message for a file whose footer opened but whose data does not read."""
    detail = textwrap.shorten(str(exc), 160, placeholder=" ...")
    return (f"{path}: cannot read its data ({detail}); the file is damaged: regenerate or re-import the "
            f"dataset (adfed data verify DATASET compares every file with its manifest)")


def _read_table(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(_damaged(path, exc)) from exc


def _batches(first: np.ndarray, last: np.ndarray, limit: int) -> list[int]:
    """Cut points ``[0, ..., n]`` of ranges covering row groups ``first[i]..last[i]`` into
    runs of consecutive ranges that together touch at most ``limit`` groups (a range
    wider than that is a run of its own)."""
    cuts, seen = [0], set[int]()
    for i, (f, g) in enumerate(zip(first.tolist(), last.tolist(), strict=True)):
        span = set(range(f, g + 1))
        if seen and len(seen | span) > limit:
            cuts.append(i)
            seen = set()
        seen |= span
    cuts.append(len(first))
    return cuts


def _narrow_types(fields: tuple[FieldSpec, ...]) -> dict[str, pa.DataType]:
    """For each plain categorical field of ``fields``, the smallest integer type that holds
    its ids ``0 .. vocab_size - 1``: how its column is kept once decoded."""
    out: dict[str, pa.DataType] = {}
    for spec in fields:
        if spec.kind is FieldKind.DENSE or spec.is_bag or spec.vocab_size <= 0:
            continue
        top = spec.vocab_size - 1
        out[spec.name] = pa.int8() if top <= 127 else pa.int16() if top <= 32767 else pa.int32() \
            if top <= 2**31 - 1 else pa.int64()
    return out


class _RowGroupFile:
    """A parquet file addressed by global row number, reading only needed row groups.

    ``narrow``: column name -> integer type the decoded column is cast to (its field's
    vocabulary fits it): ``user_id`` 8 -> 4 bytes a row, ``ad_id`` 4 -> 2, each context field
    4 -> 1, so the byte-bounded cache holds more groups (a training read's group: 26 -> 11
    bytes a row). Values are unchanged (a cast that would not fit raises, as a damaged file)."""

    def __init__(self, path: Path, cache: _TableCache | None = None,
                 narrow: dict[str, pa.DataType] | None = None) -> None:
        self.path = path
        self.file = _open_parquet(path)
        self._cache = cache
        schema = self.file.schema_arrow
        self._narrow = {k: t for k, t in (narrow or {}).items()
                        if k in schema.names and pa.types.is_integer(schema.field(k).type)
                        and schema.field(k).type.bit_width > t.bit_width}
        md = self.file.metadata
        sizes = np.array([md.row_group(i).num_rows for i in range(md.num_row_groups)])
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._lock = threading.Lock()

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The whole file (``columns`` only)."""
        try:
            with self._lock:
                return self.file.read(columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(_damaged(self.path, exc)) from exc

    def read_ranges(self, starts: np.ndarray, counts: np.ndarray, columns: list[str] | None = None, *,
                    cache: bool = True) -> pa.Table:
        """Rows ``[starts[i], starts[i] + counts[i])`` of every range ``i``, back to back.

        Each row group is read (and decoded) at most once, however many ranges fall in
        it: the groups not in the cache are read in file order, then kept in the cache;
        no per-range Python beyond one zero-copy slice. Ranges of zero rows contribute
        nothing. ``cache=False`` (a one-off read, e.g. a test set) keeps nothing: the rows
        are copied out of their groups, which are dropped at once.
        """
        try:
            return self._read_ranges(np.asarray(starts, np.int64), np.asarray(counts, np.int64), columns, cache)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(_damaged(self.path, exc)) from exc

    def _read_ranges(self, starts: np.ndarray, counts: np.ndarray, columns: list[str] | None,
                     cache: bool = True) -> pa.Table:
        keep = counts > 0
        starts, counts = starts[keep], counts[keep]
        if not len(starts):
            with self._lock:
                empty = self.file.schema_arrow.empty_table()
            return self._narrowed(empty.select(columns) if columns else empty)
        first = np.searchsorted(self.starts, starts, side="right") - 1
        last = np.searchsorted(self.starts, starts + counts - 1, side="right") - 1
        if not cache:  # a few groups decoded at a time, their rows copied out before the next
            cuts = _batches(first, last, _ONE_OFF_GROUPS)
            if len(cuts) > 2:
                return pa.concat_tables([self._read_ranges(starts[a:b], counts[a:b], columns, False)
                                         for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
        spans = [np.arange(f, g + 1) for f, g in zip(first[first != last], last[first != last], strict=True)]
        needed = np.unique(np.concatenate([first, *spans])).tolist()
        tables = self._groups(needed, columns, cache)
        group_start = self.starts
        if not spans:  # the common case: every range inside one group
            parts = [tables[f].slice(s - group_start[f], c)
                     for f, s, c in zip(first.tolist(), starts.tolist(), counts.tolist(), strict=True)]
        else:
            parts = []
            for f, g, s, c in zip(first.tolist(), last.tolist(), starts.tolist(), counts.tolist(), strict=True):
                end = s + c
                for h in range(f, g + 1):
                    lo, hi = max(s, int(group_start[h])), min(end, int(group_start[h + 1]))
                    parts.append(tables[h].slice(lo - int(group_start[h]), hi - lo))
        out = pa.concat_tables(parts)
        return out if cache else out.combine_chunks()  # a copy: the decoded groups go now

    def _narrowed(self, table: pa.Table) -> pa.Table:
        if not self._narrow:
            return table
        names = table.column_names
        for name, kind in self._narrow.items():
            if name in names:
                i = names.index(name)
                table = table.set_column(i, table.schema.field(i).with_type(kind), table.column(i).cast(kind))
        return table

    def _groups(self, groups: list[int], columns: list[str] | None, cache: bool = True) -> dict[int, pa.Table]:
        """Decoded row groups ``groups`` (sorted, unique) by number: cached ones from the
        cache, the others read (in file order) and cached (unless ``cache`` is False)."""
        key = (str(self.path), tuple(columns or ()))
        out: dict[int, pa.Table] = {}
        with self._lock:  # ParquetFile is not thread-safe
            missing = []
            for g in groups:
                table = self._cache.get((*key, g)) if self._cache is not None else None
                if table is None:
                    missing.append(g)
                else:
                    out[g] = table
            for g in missing:  # in file order; one group at a time, so each is its own buffer
                table = self._narrowed(self.file.read_row_group(g, columns=columns))
                out[g] = table
                if self._cache is not None and cache:
                    self._cache.put((*key, g), table)
        return out


class Dataset:
    """An opened dataset directory. Use :meth:`open`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        try:
            self.schema = Schema.from_dict(manifest["schema"])
        except DataError as exc:
            raise DataError(f"{path / MANIFEST}: {exc}; regenerate or re-import the dataset") from exc
        self.has_truth = (path / "truth").is_dir()
        self._check_tables()
        index = _read_table(path / "index.parquet")
        self.user_ids = index.column("user_id").to_numpy()
        n = self.schema.num_users
        self._shard = np.full(n, -1, dtype=np.int32)
        self._start = np.zeros(n, dtype=np.int64)
        self._count = np.zeros(n, dtype=np.int64)
        self._shard[self.user_ids] = index.column("shard").to_numpy()
        self._start[self.user_ids] = index.column("start").to_numpy()
        self._count[self.user_ids] = index.column("count").to_numpy()
        num_shards = int(manifest["counts"]["shards"])
        cache = _TableCache(_CACHE_BYTES)
        narrow = _narrow_types(tuple(self.schema.fields))
        self._imp = [_RowGroupFile(self._shard_path("impressions", s), cache, narrow) for s in range(num_shards)]
        self._check_index(index)
        self._truth = (
            [_RowGroupFile(self._shard_path("truth", s), cache) for s in range(num_shards)]
            if self.has_truth
            else []
        )
        # users' own cache: a round's users touch most user row groups (1,000 of 1M users:
        # ~240 of 244 groups), which would push the impressions' groups out of a shared one
        self._users = _RowGroupFile(path / "users.parquet", _TableCache(_USER_CACHE_BYTES))
        self.ads = table_to_examples(
            _read_table(path / "ads.parquet"), self.schema.by_entity(Entity.AD)
        )
        self._user_fields = self.schema.by_entity(Entity.USER)
        self._ctx_fields = self.schema.by_entity(Entity.CONTEXT)
        self._imp_columns = [USER_KEY, AD_KEY, *[f.name for f in self._ctx_fields], *LABEL_COLUMNS]
        #: what training reads: no ``timestamp`` (bookkeeping; rows are already in time
        #: order), so a decoded group takes 11 instead of 20 bytes a row in the cache
        self._train_columns = [c for c in self._imp_columns if c != TIME_COLUMN]
        del index  # then its decoding buffers back to the system: ~390 MB kept by arrow's pool at 10M users
        release_arrow_memory()

    # -- opening and validation --------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, verify_checksums: bool = False) -> Dataset:
        """Open and validate a dataset directory.

        Raises
        ------
        DataError
            Missing directory/manifest/file, foreign format version, a missing column,
            a wrong dtype, a truncated file, or (with ``verify_checksums``) a checksum
            mismatch. The message names the file and the field.
        """
        path = Path(path)
        manifest = read_manifest(path)
        check_files_present(path, manifest)
        if verify_checksums:
            bad = verify_files(path, manifest)
            if bad:
                raise DataError(f"{bad[0]} (adfed data verify {path} lists every file)")
        return cls(path, manifest)

    def _shard_path(self, kind: str, shard: int) -> Path:
        return self.path / kind / f"part-{shard:05d}.parquet"

    def _check_tables(self) -> None:
        users = self.schema.by_entity(Entity.USER)
        ads = self.schema.by_entity(Entity.AD)
        ctx = self.schema.by_entity(Entity.CONTEXT)
        def vocab(fields: tuple[FieldSpec, ...]) -> dict[str, int]:
            return {f.name: f.vocab_size for f in fields if f.kind is not FieldKind.DENSE}

        index_types = {"user_id": ("int64",), "shard": ("int32", "int64"), "start": ("int64",),
                       "count": ("int32", "int64")}
        checks: list[tuple[Path, dict[str, tuple[str, ...]], dict[str, int]]] = [
            (self.path / "users.parquet", {f.name: _expected_type(f) for f in users if f.name != USER_KEY},
             vocab(tuple(f for f in users if f.name != USER_KEY))),
            (self.path / "ads.parquet", {f.name: _expected_type(f) for f in ads}, vocab(ads)),
            (self.path / "index.parquet", index_types, {"user_id": self.schema.num_users}),
        ]
        labels = {k: (v,) for k, v in LABEL_COLUMNS.items()}
        imp_vocab = {USER_KEY: self.schema.num_users, AD_KEY: self.schema.num_ads, **vocab(ctx)}
        for shard in range(int(self.manifest["counts"]["shards"])):
            imp = {USER_KEY: ("int32", "int64"), AD_KEY: ("int32", "int64"), **labels}
            imp.update({f.name: _expected_type(f) for f in ctx})
            checks.append((self._shard_path("impressions", shard), imp, imp_vocab))
            if self.has_truth:
                checks.append((self._shard_path("truth", shard), {k: ("float",) for k in TRUTH_COLUMNS}, {}))
        rows: dict[Path, int] = {}
        for fpath, fields, limits in checks:
            file = _open_parquet(fpath)
            _check_columns(fpath, file.schema_arrow, fields)
            _check_ranges(fpath, file, limits)
            rows[fpath] = file.metadata.num_rows
        for fpath, need, what in ((self.path / "users.parquet", self.schema.num_users, "schema.num_users"),
                                  (self.path / "ads.parquet", self.schema.num_ads, "schema.num_ads")):
            if rows[fpath] < need:
                raise DataError(f"{fpath}: {rows[fpath]} rows, fewer than the manifest's {what} = {need} "
                                f"(one row per id); regenerate or re-import the dataset")
        if self.has_truth:
            for shard in range(int(self.manifest["counts"]["shards"])):
                imp_path, truth_path = self._shard_path("impressions", shard), self._shard_path("truth", shard)
                if rows[imp_path] != rows[truth_path]:
                    raise DataError(f"{truth_path}: {rows[truth_path]} rows for the {rows[imp_path]} of "
                                    f"{imp_path.name}; regenerate the dataset")
        if (self.path / "devices.parquet").exists():
            fpath = self.path / "devices.parquet"
            _check_columns(fpath, _open_parquet(fpath).schema_arrow, {k: ("float",) for k in DEVICE_COLUMNS})

    def _check_index(self, index: pa.Table) -> None:
        """Every user's rows lie inside its shard (a truncated shard or a foreign index
        would otherwise read other users' rows or fail mid-run)."""
        path = self.path / "index.parquet"
        shard = index.column("shard").to_numpy().astype(np.int64)
        start = index.column("start").to_numpy()
        end = start + index.column("count").to_numpy()
        if len(shard) and (shard.min() < 0 or shard.max() >= len(self._imp)):
            raise DataError(f"{path}: shard numbers must lie in [0, {len(self._imp)}) (counts.shards); "
                            f"got [{shard.min()}, {shard.max()}]; regenerate the dataset")
        rows = np.array([f.num_rows for f in self._imp], dtype=np.int64)
        bad = (start < 0) | (end > rows[shard]) if len(shard) else np.zeros(0, bool)
        if bad.any():
            i = int(bad.argmax())
            raise DataError(f"{path}: user {int(index.column('user_id')[i].as_py())} has rows "
                            f"[{int(start[i])}, {int(end[i])}) but shard {int(shard[i])} holds {int(rows[shard[i]])}; "
                            f"regenerate the dataset")

    # -- access ------------------------------------------------------------------------
    @property
    def num_impressions(self) -> int:
        return int(self._count.sum())

    def rows_per_user(self) -> np.ndarray:
        """Impressions per user, aligned with ``self.user_ids`` (int64)."""
        return self._count[self.user_ids]

    def rows_of(self, user_id: int) -> int:
        """Number of impressions of one user (0 for an unknown user)."""
        return int(self.rows_of_users(np.array([user_id]))[0])

    def rows_of_users(self, user_ids: np.ndarray) -> np.ndarray:
        """Number of impressions of each of ``user_ids`` (int64; 0 for an unknown user)."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        known = (user_ids >= 0) & (user_ids < len(self._count))
        return np.where(known, self._count[np.where(known, user_ids, 0)], 0)

    def client(self, user_id: int, *, with_truth: bool = True) -> Examples:
        """All impressions of one user, joined with its user and ad fields.

        Reads only the row groups that hold this user's rows (recently read row groups
        are cached, bounded). ``with_truth=False`` skips the truth columns (training
        never reads them).
        """
        return self.clients(np.array([user_id]), with_truth=with_truth)[0]

    def _known(self, user_ids: np.ndarray) -> np.ndarray:
        """``user_ids`` as int64, or DataError naming the first one without impressions."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        bad = (user_ids < 0) | (user_ids >= len(self._count))
        bad[~bad] = self._count[user_ids[~bad]] == 0
        if bad.any():
            raise DataError(f"user_id {int(user_ids[bad][0])} has no impressions in {self.path}")
        return user_ids

    def _rows_of(self, files: list[_RowGroupFile], user_ids: np.ndarray, columns: list[str] | None = None,
                 counts: np.ndarray | None = None, *, cache: bool = True) -> pa.Table:
        """The rows of ``user_ids`` (known users) from the sharded ``files``, back to back
        in the given order: each user's first ``counts`` rows (all of them by default).

        One :meth:`_RowGroupFile.read_ranges` per run of users in the same shard (one per
        shard for sorted users), so every row group is decoded at most once.
        """
        if not len(user_ids):
            return files[0].read_ranges(np.zeros(0, np.int64), np.zeros(0, np.int64), columns, cache=cache)
        shard, start = self._shard[user_ids], self._start[user_ids]
        count = self._count[user_ids] if counts is None else counts
        cut = np.flatnonzero(np.diff(shard)) + 1
        bounds = [0, *cut.tolist(), len(user_ids)]
        return pa.concat_tables([files[int(shard[lo])].read_ranges(start[lo:hi], count[lo:hi], columns, cache=cache)
                                 for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)])

    def clients(self, user_ids: np.ndarray, *, with_truth: bool = True) -> list[Examples]:
        """:meth:`client` of each of ``user_ids`` (in that order), joined in one pass.

        One join for all users is several times cheaper than one per user (the
        simulation loads a round's clients this way). Each result is a view into the
        joined arrays (:meth:`Examples.slice`).
        """
        user_ids = self._known(user_ids)
        if not len(user_ids):
            return []
        uniq, where = np.unique(user_ids, return_inverse=True)  # file order: fewest reads
        joined, offsets = self.clients_joined(uniq, with_truth=with_truth)
        return [joined.slice(int(offsets[i]), int(offsets[i + 1])) for i in where.tolist()]

    def clients_joined(self, user_ids: np.ndarray, *, limit: np.ndarray | None = None,
                       with_truth: bool = True, with_time: bool = True) -> tuple[Examples, np.ndarray]:
        """The rows of ``user_ids`` joined into one :class:`Examples`, users back to back in
        the given order, and where each user's rows start (int64 [n + 1]).

        ``limit`` (int [n]): read only each user's first ``limit[i]`` rows (its rows are
        sorted by time: its training rows under :func:`split_by_time`); at most its row
        count. Rows are read in file order whatever the order asked (each row group
        decoded at most once, see :meth:`_RowGroupFile.read_ranges`) and reordered after
        the join when needed. The same values, bit for bit, as :meth:`clients`.
        ``with_time=False`` leaves out ``labels["timestamp"]`` (training reads: their
        cached row groups are ~40 % smaller).

        Raises
        ------
        DataError : a user without impressions.
        """
        user_ids = self._known(user_ids)
        count = self._count[user_ids]
        if limit is not None:
            count = np.minimum(count, np.maximum(np.asarray(limit, dtype=np.int64), 0))
        offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
        np.cumsum(count, out=offsets[1:])
        order = np.argsort(user_ids, kind="stable")
        if not len(order) or bool((np.diff(user_ids) >= 0).all()):
            return self._joined(user_ids, with_truth=with_truth, counts=count, with_time=with_time), offsets
        joined = self._joined(user_ids[order], with_truth=with_truth, counts=count[order], with_time=with_time)
        # the rows of user i sit at sorted_offsets[rank[i]] in the joined (sorted) table
        sorted_offsets = np.concatenate([[0], np.cumsum(count[order])])
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        rows = np.repeat(sorted_offsets[rank] - offsets[:-1], count) + np.arange(int(offsets[-1]))
        return joined.take(rows), offsets

    def _joined(self, user_ids: np.ndarray, *, with_truth: bool, counts: np.ndarray | None = None,
                cache: bool = True, with_time: bool = True) -> Examples:
        """Every row (the first ``counts``) of ``user_ids`` (known users), users in the
        given order, one join; ``cache=False`` leaves the row-group caches as they were."""
        count = self._count[user_ids] if counts is None else counts
        imp = self._rows_of(self._imp, user_ids, self._columns(with_time), count, cache=cache)
        truth = self._rows_of(self._truth, user_ids, None, count, cache=cache) if self.has_truth and with_truth else None
        names = [f.name for f in self._user_fields if f.name != USER_KEY]
        users = self._users.read_ranges(user_ids, np.ones(len(user_ids), np.int64), names, cache=cache)
        return _writable(self._join(imp, truth, users, np.repeat(np.arange(len(user_ids)), count)))

    def _columns(self, with_time: bool) -> list[str]:
        """The impression columns a read takes: all, or training's (no ``timestamp``)."""
        return self._imp_columns if with_time else self._train_columns

    def labels(self, user_ids: np.ndarray, *, with_time: bool = True) -> dict[str, np.ndarray]:
        """The label columns (``LABEL_COLUMNS``; without ``timestamp`` if not
        ``with_time``) of every impression of ``user_ids``.

        Users back to back in the given order, each user's rows sorted by time, as
        :meth:`clients` would return them; nothing is joined (the user and ad fields are
        not read), so label statistics over many users cost a small part of
        :meth:`clients`. Unknown users raise :class:`DataError` as there.
        """
        user_ids = self._known(user_ids)
        names = [k for k in LABEL_COLUMNS if with_time or k != TIME_COLUMN]
        if not len(user_ids):
            return {k: np.zeros(0, dtype=LABEL_COLUMNS[k]) for k in names}
        # the same columns as clients(), so both share the cached row groups
        imp = self._rows_of(self._imp, user_ids, self._columns(with_time))
        return {k: imp.column(k).to_numpy(zero_copy_only=False) for k in names}

    def load(self, user_ids: np.ndarray | None = None) -> Examples:
        """All impressions (of ``user_ids`` if given) as one joined table.

        For centralized training and evaluation; memory grows with the rows loaded. Rows
        come sorted by user, each user once however often ``user_ids`` names it; users
        without impressions contribute nothing.
        """
        if user_ids is not None:
            ids = np.unique(np.asarray(user_ids, dtype=np.int64))
            rows = self.rows_of_users(ids)
            if rows.any() and rows.sum() <= _SCAN_SHARE * self.num_impressions:
                # a one-off read (a test set): filling the caches with its row groups would
                # hold ~0.5 GiB for 1,000 users of a 1M-user world and evict a round's
                out = self._joined(ids[rows > 0], with_truth=True, cache=False)
                release_arrow_memory()
                return out
        imp = pa.concat_tables([f.read(self._imp_columns) for f in self._imp])
        truth = pa.concat_tables([f.read() for f in self._truth]) if self._truth else None
        if user_ids is not None:  # many users: one scan and a row mask beats many reads
            mask = np.isin(imp.column(USER_KEY).to_numpy(), user_ids)
            imp = imp.filter(pa.array(mask))
            truth = truth.filter(pa.array(mask)) if truth is not None else None
        users = self._users.read([f.name for f in self._user_fields if f.name != USER_KEY])
        user_rows = imp.column(USER_KEY).to_numpy().astype(np.int64)
        return self._join(imp, truth, users, user_rows)

    def _join(self, imp: pa.Table, truth: pa.Table | None, users: pa.Table, user_rows: np.ndarray) -> Examples:
        ctx = table_to_examples(imp, self._ctx_fields)
        user_part = table_to_examples(
            users, tuple(f for f in self._user_fields if f.name != USER_KEY)
        ).take(user_rows)
        labels = {k: imp.column(k).to_numpy(zero_copy_only=False) for k in LABEL_COLUMNS if k in imp.column_names}
        if truth is not None:
            for k in TRUTH_COLUMNS:
                labels[TRUTH_PREFIX + k] = truth.column(k).to_numpy()
        ids = {key: imp.column(key).to_numpy().astype(id_dtype(self.schema.field(key).vocab_size), copy=False)
               for key in (USER_KEY, AD_KEY)}
        keys = Examples(ids=ids, dense={}, bags={}, labels={})
        return _merge(keys, ctx, user_part, self.ads.take(ids[AD_KEY]), labels=labels)

    def devices(self) -> pa.Table | None:
        """The device-profile table, or None when the dataset has none (real imports)."""
        path = self.path / "devices.parquet"
        return pq.read_table(path) if path.exists() else None

    def requests(self) -> pa.Table | None:
        """Held-out rerank requests, or None."""
        path = self.path / "requests.parquet"
        return pq.read_table(path) if path.exists() else None


def _writable(ex: Examples) -> Examples:
    """``ex`` with a copy of each array numpy may not write to (a column arrow handed over
    without a copy, when the rows read are one chunk), as ``torch.from_numpy`` expects.
    For the reads of some users only: a whole-dataset scan keeps arrow's arrays (a copy
    would double its peak; nothing writes into them)."""
    def own(a: np.ndarray) -> np.ndarray:
        return a if a.flags.writeable else a.copy()
    return Examples(ids={k: own(v) for k, v in ex.ids.items()}, dense={k: own(v) for k, v in ex.dense.items()},
                    bags={k: (own(v), own(o)) for k, (v, o) in ex.bags.items()},
                    labels={k: own(v) for k, v in ex.labels.items()})


def release_arrow_memory() -> None:
    """Hand the memory arrow's pool keeps after a one-off read of a whole table (the
    index, the device profiles, a test set) back to the system: its allocator (mimalloc)
    otherwise holds it as resident memory (measured at 10M users: 386 MB after opening,
    520 MB after the device profiles). A few milliseconds; not for hot paths."""
    pa.default_memory_pool().release_unused()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the dataset directory ``path``, checked for the keys every reader
    needs (``format_version``, ``schema``, ``counts.shards``, ``files``).

    Raises
    ------
    DataError : the manifest is missing, unreadable, not JSON, not an object, of another
        format version, or lacks those keys. The message names the manifest file.
    """
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise DataError(f"{mpath}: not found; is {path} a dataset (adfed data generate / import)?")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise DataError(f"{mpath}: not valid JSON ({detail}); regenerate or re-import the dataset") from exc
    except OSError as exc:
        raise DataError(f"{mpath}: cannot read it ({exc.strerror})") from exc
    if not isinstance(manifest, dict):
        raise DataError(f"{mpath}: not a manifest (a JSON object); regenerate or re-import the dataset")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{mpath}: format_version {version!r} is not {FORMAT_VERSION}; "
                        "regenerate the dataset with this adfed")
    for key in ("schema", "counts"):
        if not isinstance(manifest.get(key), dict):
            raise DataError(f"{mpath}: missing or malformed {key!r}; regenerate or re-import the dataset")
    shards = manifest["counts"].get("shards")
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 0:
        raise DataError(f"{mpath}: counts.shards must be an int >= 0; got {shards!r}; regenerate the dataset")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise DataError(f"{mpath}: 'files' must map file names to sha256 digests; regenerate or re-import "
                        f"the dataset")
    return manifest


def required_files(manifest: dict[str, Any]) -> list[str]:
    """The files every dataset has (relative paths): users, ads, index, impression shards."""
    shards = int(manifest["counts"]["shards"])
    return ["users.parquet", "ads.parquet", "index.parquet",
            *[f"impressions/part-{s:05d}.parquet" for s in range(shards)]]


def check_files_present(path: Path, manifest: dict[str, Any]) -> None:
    """DataError naming the first missing file: a required one or one the manifest lists."""
    listed = manifest.get("files", {})
    for rel in dict.fromkeys([*required_files(manifest), *listed]):
        if not (path / rel).is_file():
            what = "file listed in the manifest is missing" if rel in listed else "file is missing"
            raise DataError(f"{path / rel}: {what}; regenerate or re-import the dataset")


def verify_files(path: str | Path, manifest: dict[str, Any] | None = None) -> list[str]:
    """Compare every file with its sha256 in the manifest; one line per problem.

    Problems: a listed file that is missing or whose digest differs, a required file the
    manifest does not list, a parquet file the manifest does not list. An empty list
    means every file is as written. Reads every byte (about 1 s per GB).

    Raises
    ------
    DataError : a manifest :func:`read_manifest` refuses, or one without checksums.
    """
    path = Path(path)
    manifest = read_manifest(path) if manifest is None else manifest
    files: dict[str, str] = manifest.get("files", {})
    if not files:
        raise DataError(f"{path / MANIFEST}: lists no file checksums ('files'); regenerate or re-import the "
                        f"dataset to get them")
    problems = []
    for rel, digest in sorted(files.items()):
        fpath = path / rel
        if not fpath.is_file():
            problems.append(f"{fpath}: missing (listed in {MANIFEST})")
            continue
        actual = sha256_file(fpath)
        if actual != digest:
            problems.append(f"{fpath}: checksum does not match the manifest (sha256 {actual[:12]}..., "
                            f"{MANIFEST} has {digest[:12]}...): the file changed or is damaged")
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*.parquet")}
    for rel in sorted(set(required_files(manifest)) - set(files)):
        problems.append(f"{path / rel}: required, but {MANIFEST} lists no checksum for it")
    for rel in sorted(on_disk - set(files) - set(required_files(manifest))):
        problems.append(f"{path / rel}: not listed in {MANIFEST} (a file from elsewhere?)")
    return problems


def split_by_time(user_ids: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-user time split of rows sorted by (user, timestamp).

    Each user's last ``round(n_u * test_fraction)`` rows are test rows, so no test row is
    ever earlier than a training row of the same user. Returns (train_rows, test_rows).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1); got {test_fraction}")
    n = len(user_ids)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.flatnonzero(np.diff(user_ids)) + 1
    starts = np.concatenate([[0], change])
    counts = np.diff(np.concatenate([starts, [n]]))
    group_start = np.repeat(starts, counts)
    group_count = np.repeat(counts, counts)
    pos = np.arange(n) - group_start
    is_test = pos >= num_train_rows(group_count, test_fraction)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def num_train_rows(counts: np.ndarray, test_fraction: float) -> np.ndarray:
    """Training rows of users with ``counts`` rows under :func:`split_by_time` (int64):
    the last ``floor(count * test_fraction + 0.5)`` rows of each are test rows."""
    counts = np.asarray(counts, dtype=np.int64)
    return counts - np.floor(counts * test_fraction + 0.5).astype(np.int64)
