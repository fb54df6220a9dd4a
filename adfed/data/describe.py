"""Dataset statistics for ``adfed data describe`` (synthetic or imported).

Reads only label, key and truth columns, shard by shard, so it runs on large datasets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from adfed.data.store import Dataset
from adfed.metrics import safe_auc


def describe(path: str | Path) -> dict[str, Any]:
    """Counts, label rates, rows-per-user distribution, oracle AUC (when truth exists)."""
    ds = Dataset.open(path)
    counts = ds.rows_per_user()
    clicks = conversions = observed_clicks = 0
    unobserved_users: set[int] = set()
    n_imp = 0
    oracle_y: list[np.ndarray] = []
    oracle_p: list[np.ndarray] = []
    for shard in range(int(ds.manifest["counts"]["shards"])):
        imp = pq.read_table(ds.path / "impressions" / f"part-{shard:05d}.parquet",
                            columns=["user_id", "click", "conversion", "label_observed"])
        click = imp.column("click").to_numpy().astype(bool)
        conv = imp.column("conversion").to_numpy().astype(bool)
        obs = imp.column("label_observed").to_numpy(zero_copy_only=False).astype(bool)
        users = imp.column("user_id").to_numpy()
        n_imp += len(click)
        clicks += int(click.sum())
        observed_clicks += int((click & obs).sum())
        conversions += int((conv & click & obs).sum())
        unobserved_users.update(np.unique(users[~obs]).tolist())
        if ds.has_truth:
            p_cvr = pq.read_table(ds.path / "truth" / f"part-{shard:05d}.parquet",
                                  columns=["p_cvr"]).column("p_cvr").to_numpy()
            rows = click & obs
            oracle_y.append(conv[rows])
            oracle_p.append(p_cvr[rows])
    stats: dict[str, Any] = {
        "generator": ds.manifest.get("generator"),
        "users": int(ds.schema.num_users),
        "users_with_impressions": int(len(ds.user_ids)),
        "ads": int(ds.schema.num_ads),
        "impressions": n_imp,
        "click_rate": clicks / max(n_imp, 1),
        "cvr_among_clicks": conversions / max(observed_clicks, 1),
        "rows_per_user_median": float(np.median(counts)) if len(counts) else 0.0,
        "rows_per_user_p90": float(np.quantile(counts, 0.9)) if len(counts) else 0.0,
        "rows_per_user_max": int(counts.max()) if len(counts) else 0,
        "users_label_unobserved_share": len(unobserved_users) / max(len(ds.user_ids), 1),
        "fields": len(ds.schema.fields),
        "private_fields": sum(f.visibility.value == "private" for f in ds.schema.fields),
        "has_truth": ds.has_truth,
    }
    if oracle_y:
        stats["oracle_cvr_auc"] = safe_auc(np.concatenate(oracle_y).astype(int), np.concatenate(oracle_p))
    return stats
