"""Statistics of a dataset directory, for ``adfed data describe``.

Streams the impression and truth shards row group by row group (never a whole shard),
so memory stays flat on any size. Works on any dataset in the adfed layout; the oracle
figures need ``truth/`` and the per-persona figures need a world written by
:mod:`data_gen.generate` (personas are not stored: they are recomputed from the
manifest's ``(params, seed)``, which is exact because every user is a pure function of
them).

AUCs are computed from histograms of the truth logit (65,536 bins over [-20, 20], ties
within a bin counted half), exact to about 1e-4, in constant memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from adfed.data.layout import MANIFEST
from adfed.errors import DataError
from data_gen.generate import world_from_manifest
from data_gen.users import personas

_BINS = 1 << 16
_LOGIT_RANGE = 20.0
_IMP_COLUMNS = ["user_id", "click", "conversion", "label_observed"]
_GROUPS_PER_READ = 64


class _AucHistogram:
    """Streaming binned ROC AUC of scores in (0, 1)."""

    def __init__(self) -> None:
        self.pos = np.zeros(_BINS, dtype=np.int64)
        self.neg = np.zeros(_BINS, dtype=np.int64)

    def add(self, prob: np.ndarray, label: np.ndarray) -> None:
        p = np.clip(prob.astype(np.float64), 1e-12, 1 - 1e-12)
        logit = np.log(p) - np.log1p(-p)
        b = ((logit + _LOGIT_RANGE) * (_BINS / (2 * _LOGIT_RANGE))).astype(np.int64)
        b = np.clip(b, 0, _BINS - 1)
        self.pos += np.bincount(b[label], minlength=_BINS)
        self.neg += np.bincount(b[~label], minlength=_BINS)

    def auc(self) -> float | None:
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        if n_pos == 0 or n_neg == 0:
            return None
        neg_below = np.cumsum(self.neg) - self.neg
        wins = (self.pos * (neg_below + 0.5 * self.neg)).sum()
        return float(wins / (n_pos * n_neg))


def _row_groups(path: Path, shard: str,
                truth: bool) -> Iterator[tuple[pa.Table, pa.Table | None]]:
    """Aligned impression and truth row groups, ``_GROUPS_PER_READ`` at a time.

    Raises
    ------
    DataError : a shard that does not read (truncated or damaged), naming it.
    """
    where = path / "impressions" / shard
    try:
        imp = pq.ParquetFile(where)
        where = path / "truth" / shard
        tr = pq.ParquetFile(where) if truth else None
        where = path / "impressions" / shard
        for start in range(0, imp.num_row_groups, _GROUPS_PER_READ):
            groups = list(range(start, min(start + _GROUPS_PER_READ, imp.num_row_groups)))
            where = path / "truth" / shard
            t = tr.read_row_groups(groups, columns=["p_click", "p_cvr"]) if tr is not None else None
            where = path / "impressions" / shard
            yield imp.read_row_groups(groups, columns=_IMP_COLUMNS), t
    except (pa.ArrowException, OSError) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise DataError(f"{where}: cannot be read ({detail}); the file is truncated or damaged: "
                        f"regenerate or re-import the dataset") from exc


def _persona_of(manifest: dict[str, Any], where: Path) -> tuple[Callable[[np.ndarray], np.ndarray], int] | None:
    """``(user_ids -> persona, number of personas)`` for a data_gen world, else None."""
    world = world_from_manifest(manifest, str(where))
    if world is None:
        return None
    return (lambda ids: personas(world, ids)), world.params.num_personas


def _quantiles(hist: np.ndarray) -> dict[str, float]:
    """Median, p90 and max of a histogram of non-negative integer values."""
    total = int(hist.sum())
    if total == 0:
        return {"rows_per_user_median": 0.0, "rows_per_user_p90": 0.0, "rows_per_user_max": 0}
    cum = np.cumsum(hist)
    q = {k: float(np.searchsorted(cum, f * total)) for k, f in
         (("rows_per_user_median", 0.5), ("rows_per_user_p90", 0.9))}
    return {**q, "rows_per_user_max": int(np.flatnonzero(hist)[-1])}


def describe(path: Path | str) -> dict[str, Any]:
    """Statistics of the dataset at ``path`` as a JSON-ready dict.

    Keys: ``generator``, ``users``, ``ads``, ``impressions``, ``requests``,
    ``click_rate``, ``cvr_among_clicks`` (observed rows only),
    ``label_unobserved_user_share``, ``rows_per_user_median`` / ``_p90`` / ``_max``,
    ``oracle_ctr_auc`` and ``oracle_cvr_auc`` (truth vs sampled labels; the CVR one on
    observed clicked rows), and ``personas`` (per persona: ``users``, ``impressions``,
    ``click_rate``, ``cvr_among_clicks``) for synthetic worlds.

    Raises
    ------
    adfed.errors.DataError : ``path`` is not a dataset directory.
    """
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise DataError(f"{path}: no {MANIFEST}; not a dataset directory")
    manifest = json.loads((path / MANIFEST).read_text())
    counts = manifest.get("counts", {})
    shards = sorted(p.name for p in (path / "impressions").glob("part-*.parquet"))
    truth = (path / "truth").is_dir()
    per = _persona_of(manifest, path / MANIFEST)
    k = per[1] if per else 1
    # per persona: users, impressions, clicks, observed clicks, conversions
    acc = np.zeros((k, 5), dtype=np.int64)
    unobserved_users = 0
    prev_user = -1
    ctr_auc, cvr_auc = _AucHistogram(), _AucHistogram()
    rows_hist = np.zeros(1, dtype=np.int64)
    for shard in shards:
        for imp, tr in _row_groups(path, shard, truth):
            user = imp.column("user_id").to_numpy()
            click = imp.column("click").to_numpy().astype(bool)
            conv = imp.column("conversion").to_numpy().astype(bool)
            obs = imp.column("label_observed").to_numpy(zero_copy_only=False).astype(bool)
            first = np.empty(len(user), dtype=bool)
            first[:1] = user[:1] != prev_user
            first[1:] = user[1:] != user[:-1]
            prev_user = int(user[-1]) if len(user) else prev_user
            unobserved_users += int((first & ~obs).sum())
            group = per[0](user) if per else np.zeros(len(user), dtype=np.int64)
            seen = click & obs
            for j, x in enumerate((first, np.ones_like(click), click, seen, seen & conv)):
                acc[:, j] += np.bincount(group[x], minlength=k)
            if tr is not None:
                ctr_auc.add(tr.column("p_click").to_numpy(), click)
                cvr_auc.add(tr.column("p_cvr").to_numpy()[seen], conv[seen])
    index = path / "index.parquet"
    if index.exists():
        for batch in pq.ParquetFile(index).iter_batches(columns=["count"]):
            c = batch.column(0).to_numpy()
            h = np.bincount(c)
            if len(h) > len(rows_hist):
                rows_hist = np.pad(rows_hist, (0, len(h) - len(rows_hist)))
            rows_hist[: len(h)] += h
    total = acc.sum(axis=0)
    stats: dict[str, Any] = {
        "generator": manifest.get("generator"),
        "users": int(manifest.get("schema", {}).get("num_users", total[0])),
        "ads": int(counts.get("ads", 0)),
        "impressions": int(total[1]),
        "requests": int(counts.get("requests", 0)),
        "click_rate": float(total[2] / max(total[1], 1)),
        "cvr_among_clicks": float(total[4] / max(total[3], 1)),
        "label_unobserved_user_share": float(unobserved_users / max(total[0], 1)),
        **_quantiles(rows_hist),
        "oracle_ctr_auc": ctr_auc.auc() if truth else None,
        "oracle_cvr_auc": cvr_auc.auc() if truth else None,
    }
    if per:
        stats["personas"] = [
            {"persona": i, "users": int(a[0]), "impressions": int(a[1]),
             "click_rate": float(a[2] / max(a[1], 1)), "cvr_among_clicks": float(a[4] / max(a[3], 1))}
            for i, a in enumerate(acc)
        ]
    return stats
