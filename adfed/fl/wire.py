"""The wire format of updates and models: safetensors bytes with a metadata dict.

Every byte figure adfed reports is the exact ``len()`` of these payloads, not an estimate:
the simulation gets it from :func:`encoded_size` (the same header, without copying the
tensor data), which the tests check against real encodings.
Keys: ``dense/<param>`` for dense deltas, ``sparse/<table>/ids`` and
``sparse/<table>/values`` for row deltas; metadata carries client id, example count and
base version and the client's metrics as JSON (strings, as safetensors requires).
"""

from __future__ import annotations

import functools
import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adfed.errors import DataError
from adfed.fl.types import SparseRows, Update

#: safetensors' dtype tags, and the order it lays tensors out in (higher rank first, then
#: by name); only the dtypes adfed puts on the wire.
_DTYPES = {torch.int64: ("I64", 3), torch.float64: ("F64", 2), torch.float32: ("F32", 1),
           torch.int32: ("I32", 0)}


def encode_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def encoded_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """``len(encode_tensors(tensors, metadata))``, computed from names, dtypes and shapes.

    The payload is an 8-byte header length, the header (compact JSON, padded with spaces
    to a multiple of 8) and the raw tensor bytes. The header's length is summed entry by
    entry: each entry's text but its two offsets is cached (a client's dense entries are
    the same every round), the offsets' digits are counted.
    """
    try:
        order = sorted(tensors, key=lambda k: (-_DTYPES[tensors[k].dtype][1], k))
    except KeyError as exc:
        raise ValueError(f"dtype {exc.args[0]} is not a wire dtype; use one of {list(_DTYPES)}") from None
    text = 2 + max(len(order) - 1, 0)  # braces, commas between entries
    if metadata is not None:
        meta = json.dumps({"__metadata__": metadata}, separators=(",", ":"), ensure_ascii=False)
        text += len(meta.encode()) - 2 + (1 if order else 0)
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        text += _entry_len(name, _DTYPES[t.dtype][0], tuple(t.shape)) + len(str(offset)) + len(str(offset + size))
        offset += size
    return 8 + -(-text // 8) * 8 + offset


@functools.lru_cache(maxsize=4096)
def _entry_len(name: str, dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of ``"name":{"dtype":..,"shape":[..],"data_offsets":[a,b]}`` without a and b."""
    entry = {name: {"dtype": dtype, "shape": list(shape), "data_offsets": []}}
    return len(json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode()) - 2 + 1


def _update_parts(update: Update) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {f"dense/{k}": v for k, v in update.dense.items()}
    for table, rows in update.sparse.items():
        tensors[f"sparse/{table}/ids"] = rows.ids
        tensors[f"sparse/{table}/values"] = rows.values
    meta = {"client_id": str(update.client_id), "num_examples": str(update.num_examples),
            "base_version": str(update.base_version), "metrics": json.dumps(update.metrics)}
    return tensors, meta


def encode_update(update: Update) -> bytes:
    return encode_tensors(*_update_parts(update))


def update_size(update: Update) -> int:
    """``len(encode_update(update))`` without encoding."""
    return encoded_size(*_update_parts(update))


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
