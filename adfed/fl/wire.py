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
from collections.abc import Mapping, Sequence

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


#: One tensor of a payload, for :func:`encoded_size`: its place in safetensors' order
#: (dtype rank descending, then name), its header entry's length without the two
#: offsets, and its byte size.
Entry = tuple[tuple[int, str], int, int]


def tensor_layout(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> list[Entry]:
    """The :data:`Entry` of each tensor, named ``prefix + key``; no data is read.

    A layout depends only on names, dtypes and shapes: a caller that sends tensors of
    one layout many times (every client's dense delta of a round) computes it once.
    """
    out: list[Entry] = []
    for key, t in tensors.items():
        try:
            tag, rank = _DTYPES[t.dtype]
        except KeyError:
            raise ValueError(f"dtype {t.dtype} is not a wire dtype; use one of {list(_DTYPES)}") from None
        name = prefix + key
        out.append(((-rank, name), _entry_len(name, tag, tuple(t.shape)), t.numel() * t.element_size()))
    return out


def layout_size(entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> int:
    """``len()`` of the payload of tensors with these entries (see :func:`encoded_size`)."""
    order = sorted(entries)
    text = 2 + max(len(order) - 1, 0)  # braces, commas between entries
    if metadata is not None:
        meta = json.dumps({"__metadata__": metadata}, separators=(",", ":"), ensure_ascii=False)
        text += len(meta.encode()) - 2 + (1 if order else 0)
    offset = 0
    for _, entry_len, size in order:
        text += entry_len + len(str(offset)) + len(str(offset + size))
        offset += size
    return 8 + -(-text // 8) * 8 + offset


def encoded_size(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """``len(encode_tensors(tensors, metadata))``, computed from names, dtypes and shapes.

    The payload is an 8-byte header length, the header (compact JSON, padded with spaces
    to a multiple of 8) and the raw tensor bytes. The header's length is summed entry by
    entry: each entry's text but its two offsets is cached (a client's dense entries are
    the same every round), the offsets' digits are counted.
    """
    return layout_size(tensor_layout(tensors), metadata)


@functools.lru_cache(maxsize=4096)
def _entry_len(name: str, dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of ``"name":{"dtype":..,"shape":[..],"data_offsets":[a,b]}`` without a and b."""
    entry = {name: {"dtype": dtype, "shape": list(shape), "data_offsets": []}}
    return len(json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode()) - 2 + 1


def _sparse_parts(update: Update) -> dict[str, torch.Tensor]:
    tensors = {}
    for table, rows in update.sparse.items():
        tensors[f"sparse/{table}/ids"] = rows.ids
        tensors[f"sparse/{table}/values"] = rows.values
    return tensors


def _update_meta(update: Update) -> dict[str, str]:
    return {"client_id": str(update.client_id), "num_examples": str(update.num_examples),
            "base_version": str(update.base_version), "metrics": json.dumps(update.metrics)}


def _update_parts(update: Update) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return {f"dense/{k}": v for k, v in update.dense.items()} | _sparse_parts(update), _update_meta(update)


def encode_update(update: Update) -> bytes:
    return encode_tensors(*_update_parts(update))


def update_size(update: Update, dense_layout: Sequence[Entry] | None = None) -> int:
    """``len(encode_update(update))`` without encoding.

    ``dense_layout``: ``tensor_layout(update.dense, "dense/")`` when the caller has it
    (every dense delta of a round has the round model's layout); computed if None.
    """
    dense = tensor_layout(update.dense, "dense/") if dense_layout is None else dense_layout
    return layout_size([*dense, *tensor_layout(_sparse_parts(update))], _update_meta(update))


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
