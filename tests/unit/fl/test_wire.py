"""The update wire format: round trip, exact byte counts, malformed payloads."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adfed.errors import DataError
from adfed.fl.types import SparseRows, Update
from adfed.fl.wire import (
    decode_update,
    encode_tensors,
    encode_update,
    encoded_size,
    tensor_layout,
    update_size,
)


@pytest.fixture
def update(rng: np.random.Generator) -> Update:
    return Update(
        client_id=42,
        dense={
            "tower.0.weight": torch.from_numpy(rng.normal(size=(4, 3)).astype(np.float32)),
            "tower.0.bias": torch.from_numpy(rng.normal(size=4).astype(np.float32)),
        },
        sparse={
            "emb.ad_id.weight": SparseRows(torch.tensor([0, 7, 9]), torch.from_numpy(rng.normal(size=(3, 2)).astype(np.float32))),
            "emb.apps.weight": SparseRows(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2)),
        },
        num_examples=17,
        base_version=3,
        metrics={"loss": 0.6931},
    )


def _assert_same(a: Update, b: Update) -> None:
    assert (a.client_id, a.num_examples, a.base_version) == (b.client_id, b.num_examples, b.base_version)
    assert a.dense.keys() == b.dense.keys() and a.sparse.keys() == b.sparse.keys()
    for k in a.dense:
        assert a.dense[k].dtype == b.dense[k].dtype
        assert torch.equal(a.dense[k], b.dense[k])
    for k in a.sparse:
        assert a.sparse[k].ids.dtype == b.sparse[k].ids.dtype
        assert torch.equal(a.sparse[k].ids, b.sparse[k].ids)
        assert torch.equal(a.sparse[k].values, b.sparse[k].values)
    assert a.metrics == b.metrics


def test_round_trip(update: Update) -> None:
    # Execute
    decoded = decode_update(encode_update(update))

    # Assert
    _assert_same(decoded, update)


def test_round_trip_of_an_empty_update() -> None:
    empty = Update(client_id=0, dense={}, sparse={}, num_examples=0, base_version=0)
    _assert_same(decode_update(encode_update(empty)), empty)


def test_round_trip_of_non_contiguous_tensors() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T
    up = Update(client_id=1, dense={"w": t}, sparse={}, num_examples=1, base_version=0)
    assert torch.equal(decode_update(encode_update(up)).dense["w"], t)


def test_payload_length_is_header_plus_raw_tensor_bytes(update: Update) -> None:
    # Execute
    payload = encode_update(update)

    # Assert
    (header_len,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + header_len])
    raw = sum(t.numel() * t.element_size() for t in update.dense.values())
    raw += sum(r.ids.numel() * 8 + r.values.numel() * 4 for r in update.sparse.values())
    assert len(payload) == 8 + header_len + raw
    assert header["__metadata__"]["client_id"] == "42"


def test_payload_grows_with_touched_rows(update: Update) -> None:
    more = SparseRows(torch.arange(10), torch.zeros(10, 2))
    bigger = Update(client_id=42, dense=update.dense, sparse={**update.sparse, "emb.ad_id.weight": more},
                    num_examples=17, base_version=3, metrics=update.metrics)
    assert len(encode_update(bigger)) - len(encode_update(update)) == 7 * (8 + 2 * 4)


def test_encoded_size_is_deterministic(update: Update) -> None:
    # safetensors writes the metadata map in hash order, so bytes may differ between
    # encodings; their length (what adfed reports) and their content may not.
    a, b = encode_update(update), encode_update(update)
    assert len(a) == len(b)
    _assert_same(decode_update(a), decode_update(b))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage",
        b"\xff" * 64,
        struct.pack("<Q", 10**9) + b"{}",  # header length beyond the payload
    ],
)
def test_garbage_raises_data_error(payload: bytes) -> None:
    with pytest.raises(DataError, match="update payload is malformed"):
        decode_update(payload)


def test_truncated_payload_raises_data_error(update: Update) -> None:
    payload = encode_update(update)
    with pytest.raises(DataError, match="update payload is malformed"):
        decode_update(payload[: len(payload) - 5])


def test_tensors_without_update_metadata_raise_data_error() -> None:
    payload = encode_tensors({"dense/w": torch.zeros(2)})
    with pytest.raises(DataError, match="update payload is malformed.*client_id"):
        decode_update(payload)


_WIRE_DTYPES = [torch.float32, torch.int64, torch.int32, torch.float64]
_tensor_specs = st.dictionaries(
    st.text(alphabet="abz/._0129é", min_size=1, max_size=12),
    st.tuples(st.sampled_from(_WIRE_DTYPES), st.lists(st.integers(0, 12), min_size=0, max_size=3)),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(specs=_tensor_specs,
       meta=st.one_of(st.none(), st.dictionaries(st.text(max_size=6), st.text(max_size=20), max_size=3)))
def test_encoded_size_equals_the_length_of_the_real_encoding(specs, meta) -> None:
    # Prepare: tensors of any wire dtype and shape (empty ones included), any names
    tensors = {name: torch.zeros(tuple(shape), dtype=dtype) for name, (dtype, shape) in specs.items()}
    # Execute / Assert
    assert encoded_size(tensors, meta) == len(encode_tensors(tensors, meta))


def test_update_size_equals_the_length_of_the_encoded_update(update: Update) -> None:
    assert update_size(update) == len(encode_update(update))


def test_update_size_with_the_round_models_dense_layout(update: Update) -> None:
    """A layout computed once from other tensors of the same names, dtypes and shapes (the
    round model's dense part) gives every client's exact size, whatever its rows."""
    round_dense = {k: torch.zeros_like(v) for k, v in update.dense.items()}
    layout = tensor_layout(round_dense, "dense/")
    more = SparseRows(torch.arange(1000, 1012), torch.ones(12, 2))
    bigger = dataclasses.replace(update, client_id=123456, sparse={**update.sparse, "emb.ad_id.weight": more})
    for u in (update, bigger):
        assert update_size(u, layout) == len(encode_update(u)) == update_size(u)


def test_encoded_size_rejects_a_dtype_the_wire_does_not_carry() -> None:
    with pytest.raises(ValueError, match="not a wire dtype"):
        encoded_size({"x": torch.zeros(2, dtype=torch.bfloat16)})
