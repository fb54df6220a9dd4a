"""The wire format: round trips of updates, models and rows, exact byte counts, and a
decoder that refuses every malformed payload with a one-line DataError."""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adfed.errors import DataError
from adfed.fl import wire
from adfed.fl.types import FlatDense, SparseRows, Update, flat_index
from adfed.fl.wire import (
    KNOWN_CODECS,
    Envelope,
    WireSpec,
    decode_model,
    decode_rows,
    decode_update,
    encode_model,
    encode_rows,
    encode_update,
)
from adfed.fl.wirespec import HEADER_ROOM

W, B, AD, APPS = "tower.0.weight", "tower.0.bias", "emb.ad_id.weight", "emb.apps.weight"


@pytest.fixture
def spec() -> WireSpec:
    dense = {W: torch.zeros(4, 3), B: torch.zeros(4)}
    return WireSpec.of(dense, {AD: torch.zeros(10, 2), APPS: torch.zeros(5, 2)})


@pytest.fixture
def env() -> Envelope:
    return Envelope(kind="update", round=3, model_version=4, codec="identity", client_id=17)


@pytest.fixture
def update(rng: np.random.Generator) -> Update:
    def f32(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.normal(size=shape).astype(np.float32))

    return Update(client_id=17, dense={W: f32(4, 3), B: f32(4)},
                  sparse={AD: SparseRows(torch.tensor([0, 7, 9]), f32(3, 2)),
                          APPS: SparseRows(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2))},
                  num_examples=30, base_version=4, metrics={"loss": 0.6931, "steps": 3.0})


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names in the same order, same dtypes and shapes, the same bits."""
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert a[k].contiguous().reshape(-1).view(torch.uint8).tolist() == b[k].contiguous().reshape(-1).view(torch.uint8).tolist()


def _equal_rows(a: dict[str, SparseRows], b: dict[str, SparseRows]) -> None:
    assert a.keys() == b.keys()
    _equal({k: r.ids for k, r in a.items()}, {k: r.ids for k, r in b.items()})
    _equal({k: r.values for k, r in a.items()}, {k: r.values for k, r in b.items()})


def _tensors(update: Update) -> dict[str, torch.Tensor]:
    """The wire's tensors of ``update``, its float32 dense parameters as one ``dense/F32``."""
    out = {"dense/F32": torch.cat([v.reshape(-1) for v in update.dense.values()])}
    for table, rows in update.sparse.items():
        out[f"sparse/{table}/ids"], out[f"sparse/{table}/values"] = rows.ids, rows.values
    return out


_META = {"kind": "update", "round": "3", "model_version": "4", "codec": "identity", "client_id": "17",
         "num_examples": "30", "metrics": '{"loss": 0.5}', "groups": "dense_shared,sparse_shared",
         "dense": json.dumps([W, B])}


def _st(tensors: dict[str, torch.Tensor], **meta: str | None) -> bytes:
    """A payload written by safetensors itself, with ``_META`` changed by ``meta`` (None drops a key)."""
    merged = {k: v for k, v in (_META | meta).items() if v is not None}
    return st_save({k: v.clone() for k, v in tensors.items()}, metadata=merged)


def _raw(header: object, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


# ---- round trips ---------------------------------------------------------------------------------

def test_update_round_trip(update: Update, env: Envelope, spec: WireSpec) -> None:
    # Execute
    got_env, got = decode_update(encode_update(update, env), spec)

    # Assert
    assert got_env == env
    assert (got.client_id, got.base_version, got.num_examples) == (17, 4, 30)
    _equal(got.dense, update.dense)
    _equal_rows(got.sparse, update.sparse)
    assert got.metrics == update.metrics


def test_update_without_rows_round_trip(update: Update, env: Envelope, spec: WireSpec) -> None:
    dense_only = Update(client_id=17, dense=update.dense, sparse={}, num_examples=0, base_version=4)
    _, got = decode_update(encode_update(dense_only, env), spec)
    assert got.sparse == {} and got.metrics == {} and got.num_examples == 0
    _equal(got.dense, update.dense)


def test_model_round_trip_of_parameters_and_non_contiguous_tensors(spec: WireSpec) -> None:
    # Prepare: what the server broadcasts may be live parameters or views
    dense = {W: torch.nn.Parameter(torch.randn(4, 3)), B: torch.arange(8.0)[::2]}
    env = Envelope(kind="model", round=5, model_version=6, codec="identity")

    # Execute
    got_env, got = decode_model(encode_model(dense, env), spec)

    # Assert
    assert got_env == env and got_env.client_id == -1
    _equal(got, {k: v.detach() for k, v in dense.items()})


def test_rows_round_trip(update: Update, spec: WireSpec) -> None:
    env = Envelope(kind="rows", round=2, model_version=2, codec="identity", client_id=9)
    got_env, got = decode_rows(encode_rows(update.sparse, env), spec)
    assert got_env == env
    _equal_rows(got, update.sparse)
    assert decode_rows(encode_rows({}, env), spec)[1] == {}


def test_other_wire_dtypes_and_scalars_round_trip() -> None:
    dense = {"s": torch.tensor(2.5, dtype=torch.float64), "h": torch.randn(3, 2).half(),
             "b": torch.randn(5).bfloat16()}
    spec = WireSpec.of(dense, {})
    env = Envelope(kind="model", round=0, model_version=0, codec="identity")
    _equal(decode_model(encode_model(dense, env), spec)[1], dense)


def test_huge_finite_values_whose_sum_overflows_are_accepted(spec: WireSpec) -> None:
    # The decoder's one-sum finiteness check overflows here and must fall back to an exact one
    dense = {W: torch.full((4, 3), 3e38), B: torch.full((4,), -3e38)}
    env = Envelope(kind="model", round=0, model_version=0, codec="identity")
    _equal(decode_model(encode_model(dense, env), spec)[1], dense)


def test_decoded_tensors_are_writable_copies(update: Update, env: Envelope, spec: WireSpec) -> None:
    payload = encode_update(update, env)
    _, first = decode_update(payload, spec)
    first.dense[W].add_(1.0)
    _, again = decode_update(payload, spec)
    assert torch.equal(again.dense[W], update.dense[W])


def test_safetensors_reads_our_payloads_and_we_read_its(update: Update, env: Envelope, spec: WireSpec) -> None:
    # Execute
    ours = encode_update(update, env)
    theirs = st_save(_tensors(update), metadata=_META | {"metrics": json.dumps(update.metrics)})

    # Assert: the reference reader agrees, lengths are equal, and we decode its writer's bytes
    _equal(dict(sorted(st_load(ours).items())), dict(sorted(_tensors(update).items())))
    assert len(ours) == len(theirs)
    _, got = decode_update(theirs, spec)
    _equal(got.dense, update.dense)


def test_payload_length_is_header_plus_raw_tensor_bytes(update: Update, env: Envelope) -> None:
    payload = encode_update(update, env)
    (header_len,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + header_len])
    raw = sum(t.numel() * t.element_size() for t in _tensors(update).values())
    assert len(payload) == 8 + header_len + raw and header_len % 8 == 0
    assert header["__metadata__"]["groups"] == "dense_shared,sparse_shared"


def test_payload_grows_with_touched_rows_by_their_bytes(update: Update, env: Envelope) -> None:
    more = SparseRows(torch.arange(10), torch.zeros(10, 2))
    bigger = Update(client_id=17, dense=update.dense, sparse={**update.sparse, AD: more}, num_examples=30,
                    base_version=4, metrics=update.metrics)
    def data_bytes(payload: bytes) -> int:  # the header's length moves with its digits and padding
        return len(payload) - 8 - struct.unpack("<Q", payload[:8])[0]

    assert data_bytes(encode_update(bigger, env)) - data_bytes(encode_update(update, env)) == 7 * (8 + 2 * 4)


def test_non_finite_metrics_are_left_out(update: Update, env: Envelope, spec: WireSpec) -> None:
    no_step = Update(client_id=17, dense=update.dense, sparse={}, num_examples=0, base_version=4,
                     metrics={"loss": math.nan, "n": 1.0})
    assert decode_update(encode_update(no_step, env), spec)[1].metrics == {"n": 1.0}


def test_one_tensor_under_two_tables_is_encoded(spec: WireSpec) -> None:
    ids = torch.tensor([1, 2])
    rows = {AD: SparseRows(ids, torch.ones(2, 2)), APPS: SparseRows(ids, torch.zeros(2, 2))}
    env = Envelope(kind="rows", round=0, model_version=0, codec="identity", client_id=1)
    _equal_rows(decode_rows(encode_rows(rows, env), spec)[1], rows)


# ---- encoder and spec edges ------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "match"), [
    ({"kind": "model"}, "encode_update needs an envelope of kind 'update'"),
    ({"client_id": 3}, "the envelope says client 3, version 4"),
    ({"model_version": 5}, "the envelope says client 17, version 5"),
])
def test_encode_update_refuses_an_envelope_that_disagrees(update: Update, env: Envelope, change, match) -> None:
    with pytest.raises(ValueError, match=match):
        encode_update(update, dataclasses.replace(env, **change))


def test_encoders_refuse_a_dtype_the_wire_does_not_carry() -> None:
    with pytest.raises(ValueError, match="not a wire dtype"):
        encode_model({"m": torch.zeros(2, dtype=torch.bool)}, Envelope("model", 0, 0, "identity"))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": "weights"}, "envelope kind must be one of"),
    ({"round": -1}, "envelope round must be an int >= 0"),
    ({"model_version": True}, "envelope model_version must be an int"),
    ({"client_id": -2}, "envelope client_id must be an int >= -1"),
    ({"codec": "identity+gzip"}, "envelope codec must be"),
])
def test_envelope_validates_its_fields(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        Envelope(**({"kind": "update", "round": 0, "model_version": 0, "codec": "identity"} | kwargs))


def test_spec_default_limit_bounds_an_honest_payload(update: Update, env: Envelope, spec: WireSpec) -> None:
    honest = (12 + 4) * 4 + (10 + 5) * (2 * 4 + 8)
    assert spec.max_bytes == 2 * honest + HEADER_ROOM
    assert len(encode_update(update, env)) < spec.max_bytes
    assert "identity" in KNOWN_CODECS


def test_spec_refuses_a_table_that_is_not_2d() -> None:
    with pytest.raises(ValueError, match="sparse table t must be 2-D"):
        WireSpec.of({}, {"t": torch.zeros(3)})


# ---- decoder validation ------------------------------------------------------------------------

class _HugePayload(bytes):
    """Claims 10**12 bytes; reading any of them fails the test."""

    def __len__(self) -> int:
        return 10**12

    def __getitem__(self, item):  # noqa: ANN001, ANN204
        raise AssertionError("a payload over max_bytes was read")


def test_a_payload_over_the_limit_is_refused_unread(spec: WireSpec) -> None:
    with pytest.raises(DataError, match=r"update payload is 1000000000000 bytes, over the limit of \d+"):
        decode_update(_HugePayload(), spec)


def test_a_huge_declared_header_or_tensor_is_refused_without_allocating(spec: WireSpec) -> None:
    # A header length of 10**12 is checked against the payload before any JSON is parsed
    with pytest.raises(DataError, match="declares a 1000000000000-byte header but 2 bytes follow"):
        decode_update(struct.pack("<Q", 10**12) + b"{}", spec)
    # A tensor of 10**12 floats cannot fit the data that is really there
    huge = {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}
    with pytest.raises(DataError, match="do not tile its 16 data bytes"):
        decode_update(_raw({"__metadata__": _META, "dense/F32": huge}, bytes(16)), spec)
    with pytest.raises(DataError, match=r"shape \[1000000, 1000000\] of F32 does not fit"):
        decode_update(_raw({"dense/F32": huge | {"data_offsets": [0, 16]}}, bytes(16)), spec)


@pytest.mark.parametrize(("payload", "match"), [
    (b"", "update payload is 0 bytes, shorter than safetensors' 8-byte header length"),
    (b"garbage", "shorter than safetensors' 8-byte"),
    (b"\xff" * 64, "declares a .*-byte header but 56 bytes follow"),
    (struct.pack("<Q", 4) + b"{\"a\"", "its header is not JSON"),
    (struct.pack("<Q", 2) + b"\xff\xfe", "its header is not JSON"),
    (_raw([1, 2]), "its header is not a JSON object"),
    (_raw("x"), "its header is not a JSON object"),
    (_raw({"__metadata__": {"kind": 1}}), "its __metadata__ is not a map of strings"),
    (_raw({"a": 3}), "header entry 'a' is not an object"),
    (_raw({"a": {"dtype": "BOOL", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "has dtype 'BOOL'; the wire carries"),
    (_raw({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)), "has shape"),
    (_raw({"a": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, bytes(4)), "at most 8 ints"),
    (_raw({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4)), "has shape"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, bytes(4)), "has data_offsets"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)), "does not fit data_offsets"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, bytes(6)), "unaligned"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8)), "do not tile its 8 data bytes"),
])
def test_malformed_safetensors_is_refused(payload: bytes, match: str, spec: WireSpec) -> None:
    with pytest.raises(DataError, match=match):
        decode_update(payload, spec)


def test_deeply_nested_header_is_refused(spec: WireSpec) -> None:
    text = b"[" * 100_000
    with pytest.raises(DataError, match="its header is not JSON"):
        decode_update(struct.pack("<Q", len(text)) + text, spec)


@pytest.mark.parametrize(("meta", "match"), [
    ({"round": None}, "update payload: metadata round is missing"),
    ({"round": "1.5"}, "metadata round must be an integer >= 0; got '1.5'"),
    ({"round": "+3"}, "metadata round must be an integer"),
    ({"model_version": "\uff13"}, "metadata model_version must be an integer"),  # a full-width 3
    ({"model_version": "-1"}, "metadata model_version must be an integer >= 0"),
    ({"client_id": "-1"}, "metadata client_id must be an integer >= 0"),
    ({"client_id": "9" * 30}, "metadata client_id must be an integer"),
    ({"kind": None}, "metadata kind is None, not 'update'"),
    ({"kind": "model"}, "metadata kind is 'model', not 'update'; decode it with decode_model"),
    ({"codec": "gzip"}, r"codec 'gzip' is not '\+'-joined names of \[.*'identity'"),
    ({"codec": None}, "codec None is not"),
    ({"num_examples": "-2"}, "update payload from client 17: metadata num_examples must be an integer >= 0"),
    ({"num_examples": None}, "metadata num_examples is missing"),
    ({"metrics": None}, "metadata metrics is missing"),
    ({"metrics": "[1]"}, "metrics must be a JSON object of finite numbers"),
    ({"metrics": "{"}, "metrics must be a JSON object of finite numbers"),
    ({"metrics": '{"loss": NaN}'}, "metrics must be a JSON object of finite numbers"),
    ({"metrics": '{"loss": 1e999}'}, "metrics must be a JSON object of finite numbers"),
    ({"metrics": '{"loss": ' + "9" * 400 + "}"}, "metrics must be a JSON object of finite numbers"),
    ({"metrics": '{"ok": true}'}, "metrics must be a JSON object of finite numbers"),
    ({"metrics": '{"loss": "low"}'}, "metrics must be a JSON object of finite numbers"),
    ({"groups": None}, "metadata groups is missing"),
    ({"groups": "dense_shared"}, "metadata groups is 'dense_shared' but the payload carries dense_shared,sparse_shared"),
    ({"groups": "sparse_shared,dense_shared"}, "metadata groups is"),
    ({"dense": None}, "update payload from client 17: metadata dense is missing"),
    ({"dense": "{"}, "metadata dense must be a JSON list of parameter names; got '{'"),
    ({"dense": '["a", 1]'}, "metadata dense must be a JSON list of parameter names"),
    ({"dense": json.dumps([W, B, "nope"])}, "metadata dense names 'nope', not one of the model's 2 dense_shared"),
    ({"dense": json.dumps([W, W, B])}, "metadata dense names 'tower.0.weight' twice"),
    ({"dense": json.dumps([W])}, r"misses dense/tower.0.bias \(1 of the model's 2 dense_shared parameters missing\)"),
])
def test_bad_metadata_is_refused(update: Update, spec: WireSpec, meta, match) -> None:
    with pytest.raises(DataError, match=match):
        decode_update(_st(_tensors(update), **meta), spec)


def _drop(key: str):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _put(key: str, value: torch.Tensor):
    return lambda t: t | {key: value}


_ADI, _ADV = f"sparse/{AD}/ids", f"sparse/{AD}/values"


_F32 = "dense/F32"


def _set(lo: int, hi: int, value: float):
    """Values ``lo:hi`` of the dense part set to ``value`` (W is 0:12, B 12:16)."""
    def change(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        flat = t[_F32].clone()
        flat[lo:hi] = value
        return t | {_F32: flat}
    return change


@pytest.mark.parametrize(("change", "match"), [
    (_put("dense/nope", torch.zeros(1)), r"tensor 'dense/nope' is neither dense/<dtype tag> nor"),
    (_drop(_F32), r"from client 17: misses dense/F32 \(the model's F32 dense_shared parameters\)"),
    (_put(_F32, torch.zeros(15)), r"dense/F32 is torch.float32 of shape \(15,\); the model's F32 dense_shared "
                                  r"parameters make torch.float32 of shape \(16,\)"),
    (_put(_F32, torch.zeros(4, 4)), r"dense/F32 is torch.float32 of shape \(4, 4\)"),
    (_put("dense/F64", torch.zeros(16, dtype=torch.float64)), "carries dense/F64; the model's dense_shared parameters are F32"),
    (_set(0, 1, math.nan), "dense/tower.0.weight holds NaN or infinite values"),
    (_set(11, 12, -math.inf), "dense/tower.0.weight holds NaN or infinite values"),
    (_set(13, 14, math.inf), "dense/tower.0.bias holds NaN or infinite values"),
    (_put(_ADV, torch.tensor([[0.0, 1], [2, 3], [-math.inf, 0]])), f"{_ADV} holds NaN or infinite values"),
    (_put("sparse/emb.x.weight/ids", torch.tensor([1])), "has only one of its ids and values"),
    (lambda t: t | {"sparse/emb.x.weight/ids": torch.tensor([1]), "sparse/emb.x.weight/values": torch.zeros(1, 2)},
     "'emb.x.weight' is not one of the model's sparse_shared tables"),
    (_put("weights", torch.zeros(1)), "tensor 'weights' is neither dense/<dtype tag> nor sparse/<table>/ids|values"),
    (_put(_ADI, torch.tensor([0, 7, 9], dtype=torch.int32)), r"ids is torch.int32 of shape \(3,\); ids are int64 \[R\]"),
    (lambda t: t | {_ADI: torch.tensor([[0, 7, 9]]), _ADV: torch.zeros(1, 2)}, r"ids are int64 \[R\]"),
    (_put(_ADI, torch.tensor([-1, 7, 9])), r"ids has ids in \[-1, 9\]; the table's rows are \[0, 10\)"),
    (_put(_ADI, torch.tensor([0, 7, 10])), r"ids has ids in \[0, 10\]; the table's rows are \[0, 10\)"),
    (_put(_ADI, torch.tensor([0, 9, 7])), "ids are not sorted and unique; send torch.unique"),
    (_put(_ADI, torch.tensor([0, 7, 7])), "ids are not sorted and unique"),
    (lambda t: t | {_ADI: torch.arange(11), _ADV: torch.zeros(11, 2)}, "has 11 ids; the table has 10 rows"),
    (_put(_ADV, torch.zeros(3, 5)), r"values has shape \(3, 5\); with 3 ids it must be \(3, 2\)"),
    (_put(_ADV, torch.zeros(2, 2)), "with 3 ids it must be"),
    (_put(_ADV, torch.zeros(3, 2, dtype=torch.float16)), "values has dtype torch.float16; the table's is torch.float32"),
])
def test_bad_tensors_are_refused(update: Update, spec: WireSpec, change, match) -> None:
    with pytest.raises(DataError, match=match):
        decode_update(_st(change(_tensors(update))), spec)


def test_model_and_rows_payloads_hold_only_their_part(update: Update, spec: WireSpec) -> None:
    tensors = _tensors(update)
    dense = {k: v for k, v in tensors.items() if k.startswith("dense/")}
    rows = {k: v for k, v in tensors.items() if k.startswith("sparse/")}
    model_meta = {"kind": "model", "client_id": "-1"}
    with pytest.raises(DataError, match="model payload of round 3: carries rows of 'emb.ad_id.weight'"):
        decode_model(_st(tensors, **model_meta), spec)
    with pytest.raises(DataError, match="model payload of round 3: misses dense/tower.0.weight"):
        decode_model(_st(dense, **model_meta, dense=json.dumps([B])), spec)
    with pytest.raises(DataError, match="model payload of round 3: metadata dense is missing"):
        decode_model(_st(dense, **model_meta, dense=None), spec)
    with pytest.raises(DataError, match="rows payload from client 17: carries dense/F32; a rows payload"):
        decode_rows(_st(tensors, kind="rows"), spec)
    with pytest.raises(DataError, match="rows payload: metadata kind is 'update', not 'rows'; decode it with decode_update"):
        decode_rows(_st(rows), spec)


def test_every_message_is_one_line(update: Update, spec: WireSpec) -> None:
    bad_name = _put("dense/evil\nname", torch.zeros(1))(_tensors(update))
    with pytest.raises(DataError) as info:
        decode_update(_st(bad_name), spec)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError) as info:
        decode_update(_st(_tensors(update), dense=json.dumps([W, "evil\nname"])), spec)
    assert "\n" not in str(info.value)


def test_dense_parameters_may_come_in_any_order_the_metadata_names(update: Update, spec: WireSpec) -> None:
    # Prepare: B before W on the wire, as an encoder with another dict order writes them
    tensors = _tensors(update) | {_F32: torch.cat([update.dense[B], update.dense[W].reshape(-1)])}

    # Execute
    _, got = decode_update(_st(tensors, dense=json.dumps([B, W])), spec)

    # Assert: each parameter read from where the metadata puts it, in the payload's order
    assert list(got.dense) == [B, W]
    _equal(dict(sorted(got.dense.items())), dict(sorted(update.dense.items())))


def test_a_decoded_dense_part_is_a_flat_dense_over_the_payload(update: Update, env: Envelope, spec: WireSpec) -> None:
    _, got = decode_update(encode_update(update, env), spec)
    assert isinstance(got.dense, FlatDense) and got.dense.flat.shape == (16,)
    assert got.dense["tower.0.bias"].data_ptr() == got.dense.flat.data_ptr() + 12 * 4
    _equal(dict(got.dense.items()), update.dense)


def test_the_dense_part_is_one_tensor_per_dtype(update: Update, env: Envelope) -> None:
    header_len = struct.unpack("<Q", encode_update(update, env)[:8])[0]
    header = json.loads(encode_update(update, env)[8 : 8 + header_len])
    assert [k for k in header if k.startswith("dense")] == ["dense/F32"] and header["dense/F32"]["shape"] == [16]
    assert json.loads(header["__metadata__"]["dense"]) == [W, B]


# ---- never anything but DataError -----------------------------------------------------------------

def _check_valid(kind: str, result: object, spec: WireSpec) -> None:
    """What a decoder may return: a result that obeys the spec."""
    env, body = result  # type: ignore[misc]
    assert env.kind == kind and env.codec in KNOWN_CODECS
    dense = body.dense if kind == "update" else body if kind == "model" else {}
    sparse = body.sparse if kind == "update" else body if kind == "rows" else {}
    if kind != "rows":
        assert {k: (tuple(v.shape), v.dtype) for k, v in dense.items()} == spec.dense
        assert all(bool(torch.isfinite(v).all()) for v in dense.values())
    for table, rows in sparse.items():
        n, dim, dtype = spec.tables[table]
        assert rows.ids.dtype == torch.int64 and rows.values.shape == (len(rows.ids), dim)
        assert bool((rows.ids[1:] > rows.ids[:-1]).all()) and bool(((rows.ids >= 0) & (rows.ids < n)).all())
        assert rows.values.dtype == dtype and bool(torch.isfinite(rows.values).all())


_DECODERS = {"update": decode_update, "model": decode_model, "rows": decode_rows}


def _decode_or_refuse(kind: str, payload: bytes, spec: WireSpec) -> None:
    try:
        result = _DECODERS[kind](payload, spec)
    except DataError as exc:
        assert "\n" not in str(exc)
        return
    _check_valid(kind, result, spec)


def _valid_payloads(spec: WireSpec) -> dict[str, bytes]:
    ids = torch.tensor([1, 4])
    update = Update(client_id=5, dense={W: torch.ones(4, 3), B: torch.zeros(4)},
                    sparse={APPS: SparseRows(ids, torch.ones(2, 2))}, num_examples=2, base_version=1,
                    metrics={"loss": 0.5})
    return {
        "update": encode_update(update, Envelope("update", 1, 1, "identity", 5)),
        "model": encode_model(update.dense, Envelope("model", 1, 1, "identity")),
        "rows": encode_rows(update.sparse, Envelope("rows", 1, 1, "identity", 5)),
    }


_SPEC = WireSpec.of({W: torch.zeros(4, 3), B: torch.zeros(4)}, {AD: torch.zeros(10, 2), APPS: torch.zeros(5, 2)})
_VALID = _valid_payloads(_SPEC)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(_DECODERS)), payload=st.binary(max_size=400))
def test_random_bytes_never_raise_anything_but_data_error(kind: str, payload: bytes) -> None:
    _decode_or_refuse(kind, payload, _SPEC)


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(sorted(_DECODERS)), data=st.data())
def test_truncated_payloads_are_refused(kind: str, data: st.DataObject) -> None:
    payload = _VALID[kind]
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(DataError):
        _DECODERS[kind](payload[:cut], _SPEC)


@settings(max_examples=1000, deadline=None)
@given(kind=st.sampled_from(sorted(_DECODERS)), data=st.data())
def test_single_byte_flips_decode_validly_or_are_refused(kind: str, data: st.DataObject) -> None:
    payload = bytearray(_VALID[kind])
    at = data.draw(st.integers(0, len(payload) - 1))
    payload[at] = data.draw(st.integers(0, 255))
    _decode_or_refuse(kind, bytes(payload), _SPEC)


@pytest.mark.parametrize("kind", sorted(_DECODERS))
def test_valid_payloads_decode(kind: str) -> None:
    _check_valid(kind, _DECODERS[kind](_VALID[kind], _SPEC), _SPEC)


def test_header_is_compact_json_with_names_and_metadata_escaped() -> None:
    # Setup: names and metadata with quotes, backslashes, control and non-ASCII characters
    tensors = {'dense/a"b\\c': torch.arange(6, dtype=torch.float32).view(2, 3), "sparse/é\n/ids": torch.arange(2)}
    meta = {"kind": 'x"y\n', "é": "\\"}

    # Execute
    payload = wire._save(tensors, meta)

    # Assert: the header is json.dumps' compact form of what it says (space-padded), and
    # safetensors reads the tensors back
    (header_len,) = struct.unpack("<Q", payload[:8])
    text = payload[8 : 8 + header_len]
    header = json.loads(text)
    assert text.rstrip(b" ") == json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert header["__metadata__"] == meta
    assert header["sparse/é\n/ids"] == {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}
    _equal(dict(sorted(st_load(payload).items())), dict(sorted(tensors.items())))


def test_tensors_back_to_back_in_memory_encode_to_the_same_bytes(update: Update, env: Envelope) -> None:
    # Prepare: the dense deltas as views of one block in the update's order, as the
    # batched phones lay them out, and the sparse values as a slice of a bigger tensor
    block = torch.cat([update.dense[W].reshape(-1), update.dense[B].reshape(-1)])
    packed = dataclasses.replace(update, dense={W: block[:12].view(4, 3), B: block[12:]})
    rows = update.sparse[AD]
    wider = torch.cat([rows.values, torch.ones(2, 2)])[:3]
    packed = dataclasses.replace(packed, sparse={**update.sparse, AD: SparseRows(rows.ids, wider)})

    flat = dataclasses.replace(packed, dense=FlatDense(block, flat_index([(W, (4, 3)), (B, (4,))])))

    # Execute / Assert: one buffer or several, a FlatDense or a dict, the same payload
    assert encode_update(packed, env) == encode_update(update, env) == encode_update(flat, env)
    assert len(wire._spans([block[:12].view(4, 3), block[12:]])) == 1
