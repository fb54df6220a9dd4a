"""The on-disk dataset layout and its writer.

Shared by the synthetic world (``data_gen/``) and the real-data importers; depends only
on numpy and pyarrow (no torch), so ``data_gen`` stays light. Layout of a dataset dir::

    manifest.json                 format version, generator, seed, params, schema, counts,
                                  sha256 of every file
    users.parquet                 user_id + USER fields; row i is user i
    devices.parquet               user_id + device profile columns (optional)
    ads.parquet                   ad_id + AD fields + bid; row i is ad i
    impressions/part-NNNNN.parquet  user_id, ad_id, CONTEXT fields, label columns,
                                  sorted by (user_id, timestamp); shard s holds a
                                  contiguous user-id range
    truth/part-NNNNN.parquet      p_click, p_cvr, aligned with impressions (optional)
    index.parquet                 user_id, shard, start, count (rows of each user)
    requests.parquet              held-out rerank requests (optional)

Writing goes to ``DIR.partial`` and is renamed into place by :meth:`DatasetWriter.close`,
so an interrupted run never leaves a half-written dataset under the final name.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from adfed.data.schema import Schema
from adfed.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Rows per parquet row group: small, so that loading one client reads little.
ROW_GROUP_ROWS = 4096
#: Impression rows per shard file (a shard always holds whole users).
SHARD_ROWS = 1 << 20
DEVICE_COLUMNS: dict[str, str] = {
    "compute_speed": "float32",  # local training examples per second
    "bandwidth_up_kbps": "float32",
    "bandwidth_down_kbps": "float32",
    "latency_ms": "float32",
    "online_prob": "float32",
    "dropout_prob": "float32",
}


def _writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    # Fixed options (no timestamps, no dictionary surprises) keep files byte-identical
    # for the same input.
    return pq.ParquetWriter(
        path, schema, compression="zstd", use_dictionary=False, write_statistics=True
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: written into ``OUT.partial`` when it is created: a leftover of a crashed writer may be
#: removed, any other directory of that name is not ours
_PARTIAL_MARK = ".adfed-partial"


def _replaceable(path: Path) -> bool:
    """An existing dataset (its manifest) or an empty directory: what --overwrite may remove."""
    return path.is_dir() and ((path / MANIFEST).exists() or not any(path.iterdir()))


class DatasetWriter:
    """Stream tables into the layout above.

    Call the ``write_*`` methods in any interleaving; users, devices and impressions
    must each arrive in ascending ``user_id`` order (chunk after chunk), impressions as
    whole users. ``close()`` writes the index and manifest and moves the directory into
    place.
    """

    def __init__(
        self,
        out: Path,
        *,
        schema: Schema,
        generator: str,
        params: dict[str, Any],
        overwrite: bool = False,
    ) -> None:
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise DataError(f"{self.out} already exists; pass --overwrite or choose another --out")
        if self.out.exists() and not _replaceable(self.out):
            raise DataError(f"{self.out} is not an adfed dataset (no {MANIFEST}); --overwrite replaces "
                            f"datasets only: choose another --out or remove it yourself")
        self.tmp = self.out.with_name(self.out.name + ".partial")
        if self.tmp.exists():
            if not (self.tmp / _PARTIAL_MARK).exists() and not _replaceable(self.tmp):
                raise DataError(f"{self.tmp} exists and was not left by an adfed writer; "
                                f"move it away or choose another --out")
            shutil.rmtree(self.tmp)
        (self.tmp / "impressions").mkdir(parents=True)
        (self.tmp / _PARTIAL_MARK).touch()
        self.schema = schema
        self.generator = generator
        self.params = params
        self._single: dict[str, pq.ParquetWriter] = {}
        self._counts: dict[str, int] = {}
        self._shard = -1
        self._shard_rows = SHARD_ROWS  # forces a new shard on the first chunk
        self._imp_writer: pq.ParquetWriter | None = None
        self._truth_writer: pq.ParquetWriter | None = None
        self._index: list[pa.Table] = []
        self._last_user = -1
        self._with_truth: bool | None = None  # set by the first chunk

    # -- single-file tables ------------------------------------------------------------
    def _append(self, name: str, table: pa.Table) -> None:
        if name not in self._single:
            self._single[name] = _writer(self.tmp / f"{name}.parquet", table.schema)
        self._single[name].write_table(table, row_group_size=ROW_GROUP_ROWS)
        self._counts[name] = self._counts.get(name, 0) + table.num_rows

    def write_users(self, table: pa.Table) -> None:
        self._append("users", table)

    def write_devices(self, table: pa.Table) -> None:
        self._append("devices", table)

    def write_ads(self, table: pa.Table) -> None:
        self._append("ads", table)

    def write_requests(self, table: pa.Table) -> None:
        self._append("requests", table)

    # -- impressions -------------------------------------------------------------------
    def _next_shard(self, imp_schema: pa.Schema, truth_schema: pa.Schema | None) -> None:
        for w in (self._imp_writer, self._truth_writer):
            if w is not None:
                w.close()
        self._shard += 1
        self._shard_rows = 0
        name = f"part-{self._shard:05d}.parquet"
        self._imp_writer = _writer(self.tmp / "impressions" / name, imp_schema)
        self._truth_writer = None
        if truth_schema is not None:
            (self.tmp / "truth").mkdir(exist_ok=True)
            self._truth_writer = _writer(self.tmp / "truth" / name, truth_schema)

    def write_impressions(self, impressions: pa.Table, truth: pa.Table | None = None) -> None:
        """Append a chunk of whole users' impressions (sorted by user_id, timestamp)."""
        if truth is not None and truth.num_rows != impressions.num_rows:
            raise DataError("truth chunk must align row by row with its impressions chunk")
        users = impressions.column("user_id").to_numpy()
        if len(users) == 0:
            return
        if users[0] <= self._last_user or np.any(np.diff(users) < 0):
            raise DataError("impressions must arrive sorted by user_id, whole users per chunk")
        if "timestamp" in impressions.column_names:
            ts = impressions.column("timestamp").to_numpy()
            if np.any((np.diff(ts) < 0) & (np.diff(users) == 0)):
                raise DataError("impressions must be sorted by timestamp within each user "
                                "(the time split relies on it)")
        if self._with_truth is None:
            self._with_truth = truth is not None
        elif self._with_truth != (truth is not None):
            raise DataError("truth must be given for every impressions chunk or none")
        self._last_user = int(users[-1])
        if self._shard_rows >= SHARD_ROWS:
            self._next_shard(impressions.schema, None if truth is None else truth.schema)
        assert self._imp_writer is not None  # set by _next_shard
        self._imp_writer.write_table(impressions, row_group_size=ROW_GROUP_ROWS)
        if truth is not None:
            if self._truth_writer is None:
                raise DataError("truth must be given for every impressions chunk or none")
            self._truth_writer.write_table(truth, row_group_size=ROW_GROUP_ROWS)
        uniq, starts, counts = np.unique(users, return_index=True, return_counts=True)
        self._index.append(
            pa.table(
                {
                    "user_id": pa.array(uniq.astype(np.int64)),
                    "shard": pa.array(np.full(len(uniq), self._shard, dtype=np.int32)),
                    "start": pa.array((starts + self._shard_rows).astype(np.int64)),
                    "count": pa.array(counts.astype(np.int32)),
                }
            )
        )
        self._shard_rows += impressions.num_rows
        self._counts["impressions"] = self._counts.get("impressions", 0) + impressions.num_rows

    # -- finish ------------------------------------------------------------------------
    def close(self, extra: dict[str, Any] | None = None) -> Path:
        """Write index and manifest, checksum every file, move into place."""
        for w in [*self._single.values(), self._imp_writer, self._truth_writer]:
            if w is not None:
                w.close()
        if self._index:
            index = pa.concat_tables(self._index)
            pq.write_table(index, self.tmp / "index.parquet", compression="zstd",
                           row_group_size=1 << 20)
        files = sorted(p for p in self.tmp.rglob("*.parquet"))
        manifest = {
            "format_version": FORMAT_VERSION,
            "generator": self.generator,
            "params": self.params,
            "schema": self.schema.to_dict(),
            "counts": {**self._counts, "shards": self._shard + 1},
            "files": {str(p.relative_to(self.tmp)): sha256_file(p) for p in files},
            **(extra or {}),
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (self.tmp / _PARTIAL_MARK).unlink()
        if self.out.exists():
            shutil.rmtree(self.out)
        self.tmp.rename(self.out)
        return self.out

    def abort(self) -> None:
        """Drop everything written so far (the final directory is untouched)."""
        for w in [*self._single.values(), self._imp_writer, self._truth_writer]:
            if w is not None:
                w.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
