"""What a wire payload says about itself (:class:`Envelope`), what the server knows
about the model to check it against (:class:`WireSpec`), and the bounded reader of a
payload's safetensors header (:func:`read_header`); see :mod:`adfed.fl.wire`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

import torch

from adfed.errors import DataError
from adfed.fl.types import FlatIndex, flat_index

#: Payload kinds: a client's upload, the broadcast ``dense_shared`` model, the rows of
#: ``sparse_shared`` tables that one phone downloads.
KINDS: Final = frozenset({"update", "model", "rows"})

#: Update codecs the server can decode; an envelope's codec is the client pipeline's
#: transform names joined by ``+``, each of which must be known. A codec that puts
#: other dtypes on the wire (fp16 or int8 values) adds its name here and its tags to
#: :data:`WIRE_DTYPES`.
KNOWN_CODECS: set[str] = {"identity"}


def register_codec(name: str) -> None:
    """Make ``name`` a known codec part (the update pipeline registers each transform's
    name here: :func:`adfed.fl.pipeline.register`)."""
    if not name or "+" in name:
        raise ValueError(f"a codec name is a non-empty word without '+'; got {name!r}")
    KNOWN_CODECS.add(name)

#: safetensors dtype tag -> torch dtype, for the dtypes a payload may carry. Anything
#: else (bool, complex, float8, ...) is refused before a byte of tensor data is read.
WIRE_DTYPES: Final[Mapping[str, torch.dtype]] = MappingProxyType({
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
})
_TAGS: Final = {dtype: tag for tag, dtype in WIRE_DTYPES.items()}
_DTYPE_OF: Final = dict(WIRE_DTYPES)  # a plain dict: the header reader's lookup

#: The default :attr:`WireSpec.max_bytes` is twice the largest honest payload plus this
#: room for the header (names, offsets, metadata, metrics).
HEADER_ROOM: Final = 1 << 20

_INT: Final = re.compile(r"-?[0-9]{1,18}")  # fits int64; no "+", "_", spaces or non-ASCII digits


def wire_tag(dtype: torch.dtype) -> str:
    """safetensors' tag of ``dtype``; ValueError if the wire does not carry it."""
    try:
        return _TAGS[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not a wire dtype; use one of {sorted(map(str, _TAGS))}") from None


def codec_is_known(codec: str) -> bool:
    """True when every ``+``-joined part of ``codec`` is in :data:`KNOWN_CODECS`."""
    return all(part in KNOWN_CODECS for part in codec.split("+"))


@dataclasses.dataclass(frozen=True)
class Envelope:
    """The small metadata header of every payload.

    Attributes
    ----------
    kind : ``"update"``, ``"model"`` or ``"rows"``.
    round : server round (sync) or server step (async) the payload belongs to, >= 0.
    model_version : version of the global model it was made from (an update, the rows a
        phone trains on) or is (the model), >= 0.
    codec : the client update pipeline's transform names joined by ``+``
        (``"identity"`` for now); each must be in :data:`KNOWN_CODECS`.
    client_id : the phone, for uploads and per-client rows; -1 for the broadcast model.
    """

    kind: str
    round: int
    model_version: int
    codec: str
    client_id: int = -1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"envelope kind must be one of {sorted(KINDS)}; got {self.kind!r}")
        for name, low in (("round", 0), ("model_version", 0), ("client_id", -1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"envelope {name} must be an int >= {low}; got {value!r}")
        if not isinstance(self.codec, str) or not codec_is_known(self.codec):
            raise ValueError(f"envelope codec must be '+'-joined names of {sorted(KNOWN_CODECS)}; got {self.codec!r}")

    def metadata(self) -> dict[str, str]:
        """The envelope as safetensors metadata (strings)."""
        return {"kind": self.kind, "round": str(self.round), "model_version": str(self.model_version),
                "codec": self.codec, "client_id": str(self.client_id)}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], kind: str) -> Envelope:
        """The envelope of a payload's metadata, which must be of ``kind``; an update's
        client_id must be >= 0.

        Raises
        ------
        DataError : a field is missing or malformed, the kind differs, the codec is unknown.
        """
        where = f"{kind} payload"
        got = meta.get("kind")
        if got != kind:
            fix = f"decode it with decode_{got}" if got in KINDS else "encode it with adfed.fl.wire"
            raise DataError(f"{where}: metadata kind is {show(got)}, not {kind!r}; {fix}")
        codec = meta.get("codec")
        if codec is None or not codec_is_known(codec):
            raise DataError(f"{where}: codec {show(codec)} is not '+'-joined names of {sorted(KNOWN_CODECS)}; "
                            "the server cannot decode it")
        return cls(kind=kind, round=meta_int(where, meta, "round", 0),
                   model_version=meta_int(where, meta, "model_version", 0), codec=codec,
                   client_id=meta_int(where, meta, "client_id", 0 if kind == "update" else -1))


@dataclasses.dataclass(frozen=True)
class WireSpec:
    """What the server knows about the model, to validate payloads against.

    Attributes
    ----------
    dense : ``dense_shared`` parameter name -> (shape, dtype); an update and the model
        carry exactly these.
    tables : ``sparse_shared`` table name -> (rows, dim, dtype); payloads carry rows of
        some of them.
    max_bytes : payloads longer than this are refused before any parsing.
    """

    dense: dict[str, tuple[tuple[int, ...], torch.dtype]]
    tables: dict[str, tuple[int, int, torch.dtype]]
    max_bytes: int
    #: dense layouts already checked, by the metadata text that names them (bounded)
    _layouts: dict[str, DenseLayout] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 8:
            raise ValueError(f"WireSpec.max_bytes must be an int >= 8; got {self.max_bytes!r}")
        for name, (_, dtype) in self.dense.items():
            if dtype not in _TAGS:
                raise ValueError(f"WireSpec dense {name}: dtype {dtype} is not a wire dtype")
        for name, (rows, dim, dtype) in self.tables.items():
            if rows < 0 or dim < 0 or dtype not in _TAGS:
                raise ValueError(f"WireSpec table {name}: ({rows}, {dim}, {dtype}) needs rows, dim >= 0 "
                                 "and a wire dtype")

    @classmethod
    def of(cls, dense: Mapping[str, torch.Tensor], tables: Mapping[str, torch.Tensor], *,
           max_bytes: int | None = None) -> WireSpec:
        """The spec of a model's ``dense_shared`` tensors and full ``sparse_shared`` tables.

        Parameters
        ----------
        dense : name -> tensor of any shape (only shapes and dtypes are read).
        tables : name -> tensor [rows, dim].
        max_bytes : payload limit; default twice the bytes of all dense tensors, all
            tables and all their row ids (int64), plus :data:`HEADER_ROOM`.

        Raises
        ------
        ValueError : a table is not 2-D, or a dtype is not a wire dtype.
        """
        for name, t in tables.items():
            if t.dim() != 2:
                raise ValueError(f"sparse table {name} must be 2-D [rows, dim]; got shape {tuple(t.shape)}")
        if max_bytes is None:
            honest = sum(t.numel() * t.element_size() for t in dense.values())
            honest += sum(t.numel() * t.element_size() + 8 * t.shape[0] for t in tables.values())
            max_bytes = 2 * honest + HEADER_ROOM
        return cls(
            dense={k: (tuple(v.shape), v.dtype) for k, v in dense.items()},
            tables={k: (int(v.shape[0]), int(v.shape[1]), v.dtype) for k, v in tables.items()},
            max_bytes=max_bytes,
        )


    def layout(self, where: str, text: str) -> DenseLayout:
        """The layout of a payload's dense part whose metadata ``dense`` is ``text`` (the
        JSON list of the parameter names in wire order): every one of the spec's
        ``dense_shared`` names exactly once, in any order (the encoder's).

        Raises
        ------
        DataError : naming ``where``: not a JSON list of strings, a name the model does
            not have, one twice, or one missing.
        """
        known = self._layouts.get(text)
        if known is not None:
            return known
        try:
            names = json.loads(text)
        except (ValueError, RecursionError):
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{where}: metadata dense must be a JSON list of parameter names; got {show(text)}")
        for name in names:
            if name not in self.dense:
                raise DataError(f"{where}: metadata dense names {show(name)}, not one of the model's "
                                f"{len(self.dense)} dense_shared parameters; drop it")
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise DataError(f"{where}: metadata dense names {show(twice)} twice; name each parameter once")
        given = set(names)
        missing = [n for n in self.dense if n not in given]
        if missing:
            raise DataError(f"{where}: misses dense/{missing[0]} ({len(missing)} of the model's {len(self.dense)} "
                            "dense_shared parameters missing); send all of them")
        out = DenseLayout.of([(n, *self.dense[n]) for n in names])
        if len(self._layouts) < 16:  # a few orders at most; the encoders' is one
            self._layouts[text] = out
        return out


@dataclasses.dataclass(frozen=True)
class DenseLayout:
    """Where a payload's ``dense_shared`` parameters lie: those of one dtype are one flat
    tensor ``dense/<TAG>`` (``TAG`` as in :data:`WIRE_DTYPES`), their values back to back
    in C order, in the order of the payload's metadata ``dense`` (a JSON list of the names).

    Attributes
    ----------
    tags : parameter name -> its TAG, in wire order.
    indexes : TAG -> the :data:`~adfed.fl.types.FlatIndex` of its flat tensor (decoded, one
        :class:`~adfed.fl.types.FlatDense` each), in the order of first appearance.
    sizes : TAG -> elements of its flat tensor.
    """

    tags: dict[str, str]
    indexes: dict[str, FlatIndex]
    sizes: dict[str, int]

    @classmethod
    def of(cls, params: list[tuple[str, tuple[int, ...], torch.dtype]]) -> DenseLayout:
        """The layout of ``(name, shape, dtype)`` in this order."""
        tags = {name: wire_tag(dtype) for name, _, dtype in params}
        indexes = {tag: flat_index([(n, shape) for n, shape, _ in params if tags[n] == tag])
                   for tag in dict.fromkeys(tags.values())}
        sizes = {tag: sum(math.prod(shape) for shape, _, _ in index.values()) for tag, index in indexes.items()}
        return cls(tags=tags, indexes=indexes, sizes=sizes)


# ---- reading a payload's header, under limits ---------------------------------------------------

#: One tensor of a parsed header: dtype, shape, start and end of its bytes in the data.
Entry = tuple[torch.dtype, tuple[int, ...], int, int]

_MAX_RANK: Final = 8


def show(value: object, limit: int = 60) -> str:
    """``value`` for a one-line message: a string repr'd (quoted, no newlines), anything
    else as ``str`` (the strings in it repr'd); long ones cut."""
    r = repr(value) if isinstance(value, str) else str(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def meta_int(where: str, meta: Mapping[str, str], key: str, low: int) -> int:
    """``meta[key]`` as an int >= ``low``; DataError naming ``where`` otherwise."""
    text = meta.get(key)
    if text is None:
        raise DataError(f"{where}: metadata {key} is missing; encode payloads with adfed.fl.wire")
    if not _INT.fullmatch(text) or int(text) < low:
        raise DataError(f"{where}: metadata {key} must be an integer >= {low}; got {show(text)}")
    return int(text)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(where: str, name: str, info: object) -> Entry:
    # the common case in one pass of exact type tests; anything else goes the long way
    # round, which accepts exactly the same entries and names what is wrong
    if type(info) is dict:
        tag, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        dtype = _DTYPE_OF.get(tag) if type(tag) is str else None
        if (dtype is not None and type(shape) is list and len(shape) <= _MAX_RANK and type(offsets) is list
                and len(offsets) == 2):
            begin, end = offsets
            if (type(begin) is int and type(end) is int and 0 <= begin <= end
                    and all(type(d) is int and d >= 0 for d in shape)):
                size = dtype.itemsize
                if math.prod(shape) * size == end - begin and not begin % size:
                    return dtype, tuple(shape), begin, end
    return _entry_checked(where, name, info)


def _entry_checked(where: str, name: str, info: object) -> Entry:
    bad = f"{where}: header entry {show(name)}"
    if not isinstance(info, dict):
        raise DataError(f"{bad} is not an object: not safetensors")
    tag, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(tag, str) or tag not in WIRE_DTYPES:
        raise DataError(f"{bad} has dtype {show(tag)}; the wire carries {sorted(WIRE_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > _MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape):
        raise DataError(f"{bad} has shape {show(shape)}; a shape is a list of at most {_MAX_RANK} ints >= 0")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise DataError(f"{bad} has data_offsets {show(offsets)}; they are [begin, end], 0 <= begin <= end")
    dtype = WIRE_DTYPES[tag]
    size = dtype.itemsize
    if math.prod(shape) * size != offsets[1] - offsets[0] or offsets[0] % size:
        raise DataError(f"{bad}: shape {show(shape)} of {tag} does not fit data_offsets "
                        f"{show(offsets)} (wrong size or unaligned)")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_header(payload: bytes, max_bytes: int, where: str) -> tuple[dict[str, str], dict[str, Entry], memoryview]:
    """The metadata, the tensor entries (in data order) and the data region of a
    safetensors ``payload``. Its length is checked against ``max_bytes`` and the
    declared header length against its length before anything is parsed; the entries
    must be wire dtypes that tile the data exactly. No tensor data is read.

    Raises
    ------
    DataError : naming ``where`` (e.g. ``"update payload"``), on any malformed payload.
    """
    n = len(payload)
    if n > max_bytes:
        raise DataError(f"{where} is {n} bytes, over the limit of {max_bytes} (WireSpec.max_bytes); refused unread")
    if n < 8:
        raise DataError(f"{where} is {n} bytes, shorter than safetensors' 8-byte header length: "
                        "truncated or not safetensors")
    hlen = int.from_bytes(payload[:8], "little")
    if hlen > n - 8:
        raise DataError(f"{where} declares a {hlen}-byte header but {n - 8} bytes follow: truncated or not safetensors")
    try:
        header = json.loads(bytes(payload[8 : 8 + hlen]))
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, 4300-digit ints, deep nesting
        raise DataError(f"{where}: its header is not JSON: truncated or not safetensors") from None
    if not isinstance(header, dict):
        raise DataError(f"{where}: its header is not a JSON object: not safetensors")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise DataError(f"{where}: its __metadata__ is not a map of strings: not safetensors")
    entries = sorted(((name, _entry(where, name, info)) for name, info in header.items()), key=lambda e: e[1][2:])
    end = 0
    for _, (_, _, begin, stop) in entries:
        if begin != end:
            end = -1
            break
        end = stop
    if end != n - 8 - hlen:
        raise DataError(f"{where}: its tensors do not tile its {n - 8 - hlen} data bytes (gaps, overlaps or "
                        "trailing bytes): damaged or not safetensors")
    return meta, dict(entries), memoryview(payload)[8 + hlen :]
