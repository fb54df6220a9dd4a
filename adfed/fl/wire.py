"""The wire format of updates and models: safetensors bytes with a metadata dict.

Every byte figure adfed reports is ``len()`` of these payloads, not an estimate.
Keys: ``dense/<param>`` for dense deltas, ``sparse/<table>/ids`` and
``sparse/<table>/values`` for row deltas; metadata carries client id, example count and
base version and the client's metrics as JSON (strings, as safetensors requires).
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adfed.errors import DataError
from adfed.fl.types import SparseRows, Update


def encode_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def encode_update(update: Update) -> bytes:
    tensors = {f"dense/{k}": v for k, v in update.dense.items()}
    for table, rows in update.sparse.items():
        tensors[f"sparse/{table}/ids"] = rows.ids
        tensors[f"sparse/{table}/values"] = rows.values
    meta = {"client_id": str(update.client_id), "num_examples": str(update.num_examples),
            "base_version": str(update.base_version), "metrics": json.dumps(update.metrics)}
    return encode_tensors(tensors, meta)


def decode_update(payload: bytes) -> Update:
    """Inverse of :func:`encode_update`; malformed bytes raise DataError."""
    try:
        tensors = st_load(payload)
        (header_len,) = struct.unpack("<Q", payload[:8])
        meta = json.loads(payload[8 : 8 + header_len]).get("__metadata__", {})
        dense = {k[len("dense/") :]: v for k, v in tensors.items() if k.startswith("dense/")}
        tables = {k.split("/")[1] for k in tensors if k.startswith("sparse/")}
        sparse = {t: SparseRows(tensors[f"sparse/{t}/ids"], tensors[f"sparse/{t}/values"]) for t in tables}
        return Update(client_id=int(meta["client_id"]), dense=dense, sparse=sparse,
                      num_examples=int(meta["num_examples"]), base_version=int(meta["base_version"]),
                      metrics={k: float(v) for k, v in json.loads(meta.get("metrics", "{}")).items()})
    except Exception as exc:  # safetensors raises its own error type for bad bytes
        raise DataError(f"update payload is malformed: {exc}") from exc
