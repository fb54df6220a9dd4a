"""The wire format of updates, the broadcast model and downloaded rows.

A payload is safetensors bytes (``safetensors.torch.save``): an 8-byte little-endian
header length, a JSON header (tensor entries and a ``__metadata__`` map of strings) and
the raw tensor data. Keys: ``dense/<TAG>`` (``F32``, ...: a dtype of
:data:`~adfed.fl.wirespec.WIRE_DTYPES`) for the ``dense_shared`` parameters of that dtype,
flattened in C order and back to back in one 1-D tensor, in the order the metadata
``dense`` names them (a JSON list; :class:`~adfed.fl.wirespec.DenseLayout`: the shapes come
from the model, the :class:`WireSpec`); ``sparse/<table>/ids`` (int64 [R], sorted, unique)
and ``sparse/<table>/values`` [R, D] for rows of ``sparse_shared`` tables. Metadata: the
:class:`Envelope` (kind, round, model_version, codec, client_id), for updates and the model
``dense``, and for updates num_examples, metrics (JSON) and groups (the parameter groups
present, comma-joined). The dense part is one tensor, not one per parameter, so that a
payload has a handful of header entries whatever the model (encoding and decoding a phone's
upload cost per entry). Every byte figure adfed reports is the ``len()`` of these payloads.

The decoders never trust a payload: its length is checked against
:attr:`WireSpec.max_bytes` and its header length against its length before anything is
parsed, the header is checked against the spec before a byte of tensor data is read, and
every failure is a one-line :class:`~adfed.errors.DataError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

from adfed.errors import DataError
from adfed.fl.types import FlatDense, SparseRows, Update, c_strides, flat_span
from adfed.fl.wirespec import (
    KNOWN_CODECS,
    WIRE_DTYPES,
    DenseLayout,
    Entry,
    Envelope,
    WireSpec,
    meta_int,
    read_header,
    show,
    wire_tag,
)

__all__ = ["KNOWN_CODECS", "Envelope", "WireSpec", "decode_model", "decode_rows", "decode_update",
           "encode_model", "encode_rows", "encode_update"]

_DENSE, _SPARSE, _IDS, _VALUES = "dense/", "sparse/", "/ids", "/values"
_GROUPS = ("dense_shared", "sparse_shared")


# ---- encoding ---------------------------------------------------------------------------------

def _meta(envelope: Envelope, kind: str) -> dict[str, str]:
    if envelope.kind != kind:
        raise ValueError(f"encode_{kind} needs an envelope of kind {kind!r}; got {envelope.kind!r}")
    return envelope.metadata()


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of ``t``, C order, as a buffer; no copy when it is contiguous."""
    t = t.detach().contiguous() if t.requires_grad or not t.is_contiguous() else t
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().data  # numpy has no bfloat16


def _save(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """The bytes ``safetensors.torch.save(tensors, metadata=meta)`` would write (its header
    layout, its tensor order, padded to 8 bytes), written directly: one copy, without its
    per-tensor numpy/ctypes round trip (~50 us per tensor). Tests check that
    ``safetensors.torch.load`` reads them."""
    flat = sorted((-t.element_size(), key, t) for key, t in tensors.items())  # alignment desc, then name
    # json.dumps(header, separators=(",", ":"), ensure_ascii=False) of {"__metadata__": meta,
    # key: {"dtype", "shape", "data_offsets"}, ...}, written piece by piece (half the time)
    parts = ['{"__metadata__":', json.dumps(meta, separators=(",", ":"), ensure_ascii=False)]
    offset = 0
    for _, key, t in flat:
        size = t.numel() * t.element_size()
        parts.append(f',{_json_key(key)}:{{"dtype":"{wire_tag(t.dtype)}","shape":[{",".join(map(str, t.shape))}],'
                     f'"data_offsets":[{offset},{offset + size}]}}')
        offset += size
    parts.append("}")
    text = "".join(parts).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text, *(_raw(t) for t in _spans([t for *_, t in flat]))])


def _spans(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` with each run of them that lies back to back in one storage merged
    into one view (:func:`~adfed.fl.types.flat_span`): one buffer instead of one per
    tensor (~2 us each) for the dense deltas of a batched phone, laid out in wire order."""
    out = []
    i = 0
    while i < len(tensors):
        j, t = i + 1, tensors[i]
        end = t.data_ptr() + t.numel() * t.element_size()
        while (j < len(tensors) and tensors[j].data_ptr() == end and tensors[j].dtype == t.dtype
               and not tensors[j].requires_grad):
            end += tensors[j].numel() * tensors[j].element_size()
            j += 1
        span = flat_span(tensors[i:j]) if j - i > 1 and not t.requires_grad else None
        if span is None:
            out.append(t)
            i += 1
        else:
            out.append(span)
            i = j
    return out


_KEYS: dict[str, str] = {}


def _json_key(key: str) -> str:
    """``key`` as a JSON string (remembered: a model has few tensor names)."""
    out = _KEYS.get(key)
    if out is None:
        out = json.dumps(key, ensure_ascii=False)
        if len(_KEYS) < 4096:
            _KEYS[key] = out
    return out


_NAMES: dict[tuple[str, ...], str] = {}


def _dense_tensors(dense: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The wire's ``dense/<TAG>`` tensors of ``dense`` and its metadata ``dense``: per
    dtype, the tensors flattened back to back in ``dense``'s order; no copy when they
    already lie so in memory (a batched phone's deltas, :func:`_spans`)."""
    names = tuple(dense)
    text = _NAMES.get(names)
    if text is None:
        text = json.dumps(list(names), ensure_ascii=False)
        if len(_NAMES) < 64:
            _NAMES[names] = text
    if isinstance(dense, FlatDense):
        return {_DENSE + wire_tag(dense.flat.dtype): dense.flat.detach()}, text
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in dense.values():
        by_dtype.setdefault(t.dtype, []).append(t.detach() if t.requires_grad else t)
    out = {}
    for dtype, parts in by_dtype.items():
        flat = flat_span(parts)
        out[_DENSE + wire_tag(dtype)] = flat if flat is not None else torch.cat([t.reshape(-1) for t in parts])
    return out, text


def _rows_tensors(rows: Mapping[str, SparseRows]) -> dict[str, torch.Tensor]:
    out = {}
    for table, r in rows.items():
        out[_SPARSE + table + _IDS] = r.ids
        out[_SPARSE + table + _VALUES] = r.values
    return out


def encode_update(update: Update, envelope: Envelope) -> bytes:
    """One client's upload as bytes.

    ``envelope`` (kind ``"update"``) must name the update's client and base version.
    A metric that is not a finite number (the NaN loss of a client that ran no step) is
    left out: the wire carries measured numbers only.

    Raises
    ------
    ValueError : the envelope disagrees with the update, num_examples < 0, or a tensor
        has a dtype the wire does not carry.
    """
    meta = _meta(envelope, "update")
    if (update.client_id, update.base_version) != (envelope.client_id, envelope.model_version):
        raise ValueError(f"update of client {update.client_id}, version {update.base_version}: the envelope "
                         f"says client {envelope.client_id}, version {envelope.model_version}")
    if update.num_examples < 0:
        raise ValueError(f"update of client {update.client_id}: num_examples must be >= 0; got {update.num_examples}")
    metrics = {k: float(v) for k, v in update.metrics.items() if math.isfinite(v)}
    groups = [g for g, part in zip(_GROUPS, (update.dense, update.sparse), strict=True) if part]
    dense, names = _dense_tensors(update.dense)
    meta |= {"num_examples": str(update.num_examples), "metrics": json.dumps(metrics), "groups": ",".join(groups),
             "dense": names}
    return _save(dense | _rows_tensors(update.sparse), meta)


def encode_model(dense: Mapping[str, torch.Tensor], envelope: Envelope) -> bytes:
    """The broadcast ``dense_shared`` tensors as bytes (envelope kind ``"model"``)."""
    tensors, names = _dense_tensors(dense)
    return _save(tensors, _meta(envelope, "model") | {"dense": names})


def encode_rows(rows: Mapping[str, SparseRows], envelope: Envelope) -> bytes:
    """Rows of ``sparse_shared`` tables one phone downloads, as bytes (kind ``"rows"``)."""
    return _save(_rows_tensors(rows), _meta(envelope, "rows"))


# ---- decoding: the metadata -------------------------------------------------------------------

def _where(env: Envelope) -> str:
    if env.client_id >= 0:
        return f"{env.kind} payload from client {env.client_id}"
    return f"{env.kind} payload of round {env.round}"


def _metrics(where: str, meta: dict[str, str]) -> dict[str, float]:
    text = meta.get("metrics")
    if text is None:
        raise DataError(f"{where}: metadata metrics is missing; send a JSON object, '{{}}' for none")
    try:
        obj = json.loads(text)
        ok = isinstance(obj, dict) and all(type(v) in (int, float) and math.isfinite(float(v)) for v in obj.values())
    except (ValueError, RecursionError, OverflowError):
        ok = False
    if not ok:
        raise DataError(f"{where}: metadata metrics must be a JSON object of finite numbers; got {show(text)}")
    return {k: float(v) for k, v in obj.items()}


def _groups(where: str, meta: dict[str, str], present: list[str]) -> None:
    text = meta.get("groups")
    if text is None:
        raise DataError(f"{where}: metadata groups is missing; encode updates with adfed.fl.wire")
    if text.split(",") != present and not (text == "" and not present):
        raise DataError(f"{where}: metadata groups is {show(text)} but the payload carries {','.join(present) or 'none'}"
                        f"; list the groups present, in the order {','.join(_GROUPS)}")


# ---- decoding: the tensors ----------------------------------------------------------------------

def _split(where: str, entries: dict[str, Entry]) -> tuple[dict[str, Entry], dict[str, tuple[Entry, Entry]]]:
    """``dense/<TAG>`` entries by TAG, and (ids, values) entries by table."""
    dense, ids, values = {}, {}, {}
    for key, e in entries.items():
        if key.startswith(_DENSE) and key[len(_DENSE) :] in WIRE_DTYPES:
            dense[key[len(_DENSE) :]] = e
        elif key.startswith(_SPARSE) and key.endswith(_IDS):
            ids[key[len(_SPARSE) : -len(_IDS)]] = e
        elif key.startswith(_SPARSE) and key.endswith(_VALUES):
            values[key[len(_SPARSE) : -len(_VALUES)]] = e
        else:
            raise DataError(f"{where}: tensor {show(key)} is neither dense/<dtype tag> nor sparse/<table>/ids|values")
    for table in sorted(ids.keys() ^ values.keys()):
        raise DataError(f"{where}: table {show(table)} has only one of its ids and values; send both")
    return dense, {t: (ids[t], values[t]) for t in ids}


def _check_dense(where: str, dense: dict[str, Entry], layout: DenseLayout | None) -> None:
    """The ``dense/<TAG>`` entries against the layout the metadata names (None: a rows
    payload, which has no dense part)."""
    if layout is None:
        if dense:
            raise DataError(f"{where}: carries dense/{next(iter(dense))}; a rows payload holds sparse rows only")
        return
    for tag, (dtype, shape, _, _) in dense.items():
        want = layout.sizes.get(tag)
        if want is None:
            raise DataError(f"{where}: carries dense/{tag}; the model's dense_shared parameters are "
                            f"{'/'.join(layout.sizes) or 'none'}: send those dtypes")
        if dtype != WIRE_DTYPES[tag] or shape != (want,):
            raise DataError(f"{where}: dense/{tag} is {dtype} of shape {show(shape)}; the model's {tag} "
                            f"dense_shared parameters make {WIRE_DTYPES[tag]} of shape ({want},)")
    for tag in layout.sizes:
        if tag not in dense:
            raise DataError(f"{where}: misses dense/{tag} (the model's {tag} dense_shared parameters); send all of them")


def _check_tables(where: str, tables: dict[str, tuple[Entry, Entry]], spec: WireSpec, kind: str) -> None:
    if kind == "model" and tables:
        raise DataError(f"{where}: carries rows of {show(next(iter(tables)))}; a model payload holds dense tensors only")
    for table, ((id_dtype, id_shape, _, _), (dtype, shape, _, _)) in tables.items():
        if table not in spec.tables:
            raise DataError(f"{where}: {show(table)} is not one of the model's sparse_shared tables "
                            f"{show(sorted(spec.tables), 200)}")
        rows, dim, want_dtype = spec.tables[table]
        if id_dtype != torch.int64 or len(id_shape) != 1:
            raise DataError(f"{where}: sparse/{table}/ids is {id_dtype} of shape {show(id_shape)}; "
                            "ids are int64 [R]")
        if id_shape[0] > rows:
            raise DataError(f"{where}: sparse/{table}/ids has {id_shape[0]} ids; the table has {rows} rows")
        if shape != (id_shape[0], dim):
            raise DataError(f"{where}: sparse/{table}/values has shape {show(shape)}; with {id_shape[0]} ids "
                            f"it must be {(id_shape[0], dim)}")
        if dtype != want_dtype:
            raise DataError(f"{where}: sparse/{table}/values has dtype {dtype}; the table's is {want_dtype}")


def _check_ids(where: str, table: str, ids_t: torch.Tensor, rows: int) -> None:
    if not len(ids_t):
        return
    ids = ids_t.numpy()  # numpy: a few microseconds less than torch per call on a phone's few ids
    sorted_unique = bool((ids[1:] > ids[:-1]).all())
    # sorted: the range is the first and the last id
    lo, hi = (int(ids[0]), int(ids[-1])) if sorted_unique else (int(ids.min()), int(ids.max()))
    if lo < 0 or hi >= rows:
        raise DataError(f"{where}: sparse/{table}/ids has ids in [{lo}, {hi}]; the table's rows are [0, {rows})")
    if not sorted_unique:
        raise DataError(f"{where}: sparse/{table}/ids are not sorted and unique; send torch.unique(ids)")


def _culprit(key: str, t: torch.Tensor, layout: DenseLayout | None) -> str:
    """The name of what holds a non-finite value of the tensor ``key``: a ``dense/<TAG>``
    tensor's first parameter that does (``dense/<param>``), the key itself otherwise."""
    if layout is not None and key.startswith(_DENSE):
        for name, view in FlatDense(t, layout.indexes[key[len(_DENSE) :]]).items():
            if not bool(torch.isfinite(view).all()):
                return _DENSE + name
    return key


def _check_finite(where: str, entries: dict[str, Entry], buf: bytearray, layout: DenseLayout | None) -> None:
    """DataError naming the first tensor (the first parameter, for the dense part) with a
    NaN or an infinity.

    The entries are in data order; each run of adjacent ones of one float dtype (all of
    an update's, usually) costs one sum over the raw bytes: a NaN or an infinity makes
    the sum non-finite. Finite values can overflow it, so only then is each tensor of
    the run checked exactly.
    """
    runs: list[tuple[torch.dtype, int, list[str]]] = []  # dtype, begin, keys; a run ends where its last key does
    for key, (dtype, _, begin, end) in entries.items():
        if not dtype.is_floating_point or begin == end:
            continue
        if runs and runs[-1][0] == dtype and entries[runs[-1][2][-1]][3] == begin:
            runs[-1][2].append(key)
        else:
            runs.append((dtype, begin, [key]))
    for dtype, begin, keys in runs:
        end = entries[keys[-1]][3]
        span = torch.frombuffer(buf, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin)
        if math.isfinite(float(span.sum(dtype=torch.float32 if dtype.itemsize < 4 else dtype))):
            continue
        for key in keys:
            _, _, b, e = entries[key]
            t = torch.frombuffer(buf, dtype=dtype, count=(e - b) // dtype.itemsize, offset=b)
            if not bool(torch.isfinite(t).all()):
                raise DataError(f"{where}: {_culprit(key, t, layout)} holds NaN or infinite values; send finite values")


def _body(where: str, entries: dict[str, Entry], data: memoryview, spec: WireSpec,
          kind: str, meta: dict[str, str]) -> tuple[Mapping[str, torch.Tensor], dict[str, SparseRows]]:
    """Check the header's tensors against ``spec`` (the dense part against the layout its
    metadata names), then read and check their values."""
    layout = None
    if kind != "rows":
        text = meta.get("dense")
        if text is None:
            raise DataError(f"{where}: metadata dense is missing; encode {kind} payloads with adfed.fl.wire")
        layout = spec.layout(where, text)
    dense_entries, table_entries = _split(where, entries)
    _check_dense(where, dense_entries, layout)
    _check_tables(where, table_entries, spec, kind)
    buf = bytearray(data)  # one copy: writable tensors, aligned (offsets are multiples of the itemsize)
    _check_finite(where, entries, buf, layout)
    whole: dict[torch.dtype, torch.Tensor] = {}  # the data as one tensor per dtype; each entry a view of it

    def view(dtype: torch.dtype, shape: tuple[int, ...], strides: tuple[int, ...], begin: int) -> torch.Tensor:
        if not buf or not math.prod(shape):  # frombuffer refuses empty buffers
            return torch.empty(shape, dtype=dtype)
        flat = whole.get(dtype)
        if flat is None:
            flat = whole[dtype] = torch.frombuffer(buf, dtype=dtype, count=len(buf) // dtype.itemsize)
        return flat.as_strided(shape, strides, begin)

    flats = {tag: view(dtype, shape, (1,), begin // dtype.itemsize)
             for tag, (dtype, shape, begin, _) in dense_entries.items()}
    dense: Mapping[str, torch.Tensor] = {}
    if layout is not None:  # per dtype, the views made when asked for
        parts = {tag: FlatDense(flats[tag], index) for tag, index in layout.indexes.items()}
        dense = next(iter(parts.values())) if len(parts) == 1 else {n: parts[t][n] for n, t in layout.tags.items()}
    sparse = {}
    for table in (t for t in spec.tables if t in table_entries):  # the spec's order, not the payload's
        (id_dtype, id_shape, id_begin, _), (dtype, shape, begin, _) = table_entries[table]
        rows = SparseRows(view(id_dtype, id_shape, (1,), id_begin // id_dtype.itemsize),
                          view(dtype, shape, c_strides(shape), begin // dtype.itemsize))
        _check_ids(where, table, rows.ids, spec.tables[table][0])
        sparse[table] = rows
    return dense, sparse


def decode_update(payload: bytes, spec: WireSpec) -> tuple[Envelope, Update]:
    """Inverse of :func:`encode_update`, validated against ``spec``.

    The update must carry exactly the spec's dense names, with its shapes and dtypes,
    and rows of known tables; ``Update.client_id`` and ``base_version`` come from the
    envelope.

    Raises
    ------
    DataError : the payload is too long, not safetensors, or breaks the spec (the message
        names what and how).
    """
    meta, entries, data = read_header(payload, spec.max_bytes, "update payload")
    env = Envelope.from_metadata(meta, "update")
    where = _where(env)
    num_examples = meta_int(where, meta, "num_examples", 0)
    metrics = _metrics(where, meta)
    dense, sparse = _body(where, entries, data, spec, "update", meta)
    _groups(where, meta, [g for g, part in zip(_GROUPS, (dense, sparse), strict=True) if part])
    return env, Update(client_id=env.client_id, dense=dense, sparse=sparse, num_examples=num_examples,
                       base_version=env.model_version, metrics=metrics)


def decode_model(payload: bytes, spec: WireSpec) -> tuple[Envelope, dict[str, torch.Tensor]]:
    """Inverse of :func:`encode_model`: exactly the spec's dense tensors; DataError otherwise."""
    meta, entries, data = read_header(payload, spec.max_bytes, "model payload")
    env = Envelope.from_metadata(meta, "model")
    dense, _ = _body(_where(env), entries, data, spec, "model", meta)
    return env, dict(dense.items())  # read once a round, by name, many times: plain views


def decode_rows(payload: bytes, spec: WireSpec) -> tuple[Envelope, dict[str, SparseRows]]:
    """Inverse of :func:`encode_rows`: rows of known tables; DataError otherwise."""
    meta, entries, data = read_header(payload, spec.max_bytes, "rows payload")
    env = Envelope.from_metadata(meta, "rows")
    _, rows = _body(_where(env), entries, data, spec, "rows", meta)
    return env, rows
