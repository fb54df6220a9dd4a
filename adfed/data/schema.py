"""The dataset schema as data.

A :class:`Schema` lists every model input field with its kind, vocabulary size, who can
see it (cloud or device only), which entity carries it (user, ad or the impression's
context) and which :class:`ParamGroup` its embedding table belongs to. The synthetic
world (``data_gen/``) and the real-data importers both describe their datasets with a
``Schema``; it is stored in ``manifest.json`` and the model is built from it.

Table layout shared by every dataset (see docs/data.md):

- ``users.parquet``: ``user_id`` + every USER field (row ``i`` holds ``user_id == i``).
- ``ads.parquet``: ``ad_id`` + every AD field + ``bid`` (row ``i`` holds ``ad_id == i``).
- ``impressions/part-NNNNN.parquet``: ``user_id``, ``ad_id``, every CONTEXT field and the
  label columns ``LABEL_COLUMNS``, sorted by ``(user_id, timestamp)``.
- ``truth/part-NNNNN.parquet``: ``p_click``, ``p_cvr`` aligned row by row with impressions.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from adfed.errors import DataError

USER_KEY = "user_id"
AD_KEY = "ad_id"
#: Per-impression label and bookkeeping columns, name -> numpy dtype.
LABEL_COLUMNS: dict[str, str] = {
    "timestamp": "int64",
    "click": "int8",
    "conversion": "int8",
    "label_observed": "bool",
}
TRUTH_COLUMNS: dict[str, str] = {"p_click": "float32", "p_cvr": "float32"}
#: Vocabulary size above which an ID table is ``sparse_shared`` by default.
SPARSE_VOCAB_THRESHOLD = 1_000


class FieldKind(str, enum.Enum):
    """How a field is stored and embedded."""

    CATEGORICAL = "categorical"  # one id per row; int32 column
    MULTI_HOT = "multi_hot"  # a set of ids; list<int32> column, mean-pooled
    SEQUENCE = "sequence"  # an ordered list of ids; list<int32> column, mean-pooled
    DENSE = "dense"  # one float per row; float32 column


class Visibility(str, enum.Enum):
    """Who may see a field: the cloud, or only the phone that holds it."""

    CLOUD = "cloud"
    PRIVATE = "private"


class Entity(str, enum.Enum):
    """Which table carries the field."""

    USER = "user"
    AD = "ad"
    CONTEXT = "context"


class ParamGroup(str, enum.Enum):
    """The parameter decomposition of DESIGN.md."""

    LOCAL = "local"  # never leaves the device
    SPARSE_SHARED = "sparse_shared"  # large ID tables; touched rows only
    DENSE_SHARED = "dense_shared"  # towers and small tables; dense updates


@dataclasses.dataclass(frozen=True, kw_only=True)
class FieldSpec:
    """One model input field.

    Parameters
    ----------
    name : column name in its table.
    kind : storage / pooling kind.
    vocab_size : number of distinct ids (ids are ``0 .. vocab_size-1``); 0 for DENSE.
    visibility : CLOUD fields may be uploaded; PRIVATE fields never leave the phone.
    entity : the table that carries the column.
    group : the ParamGroup of this field's embedding table.
    max_len : maximum list length for MULTI_HOT / SEQUENCE, 1 otherwise.
    description : one line for docs/data.md and ``adfed data describe``.
    vocab_of : the name of another field whose ids this field's ids are (the same
        vocabulary: a user's ``intent`` bag holds ``ad_category`` ids), or ``""``. A model
        may then read both fields from one table (``model.share_vocab_tables``).
    """

    name: str
    kind: FieldKind
    vocab_size: int
    visibility: Visibility
    entity: Entity
    group: ParamGroup
    max_len: int = 1
    description: str = ""
    vocab_of: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise DataError(f"schema field name must be an identifier; got {self.name!r}")
        if self.kind is FieldKind.DENSE:
            if self.vocab_size != 0:
                raise DataError(f"schema field {self.name}: DENSE fields take vocab_size=0")
        elif self.vocab_size < 1:
            raise DataError(
                f"schema field {self.name}: vocab_size must be >= 1; got {self.vocab_size}"
            )
        if self.max_len < 1:
            raise DataError(f"schema field {self.name}: max_len must be >= 1; got {self.max_len}")

    @property
    def is_bag(self) -> bool:
        """True for list-valued fields (MULTI_HOT, SEQUENCE)."""
        return self.kind in (FieldKind.MULTI_HOT, FieldKind.SEQUENCE)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("kind", "visibility", "entity", "group"):
            d[key] = d[key].value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FieldSpec:
        try:
            return cls(
                name=d["name"],
                kind=FieldKind(d["kind"]),
                vocab_size=int(d["vocab_size"]),
                visibility=Visibility(d["visibility"]),
                entity=Entity(d["entity"]),
                group=ParamGroup(d["group"]),
                max_len=int(d.get("max_len", 1)),
                description=str(d.get("description", "")),
                vocab_of=str(d.get("vocab_of", "")),
            )
        except KeyError as exc:
            raise DataError(f"schema field {_name_of(d)!r} has no {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise DataError(f"schema field {_name_of(d)!r} is malformed ({exc})") from exc


def _name_of(d: Any) -> str:
    return str(d.get("name", "?")) if isinstance(d, dict) else "?"


def default_group(vocab_size: int, *, is_user_key: bool = False) -> ParamGroup:
    """The ParamGroup a field's table gets unless a dataset says otherwise."""
    if is_user_key:
        return ParamGroup.LOCAL
    if vocab_size > SPARSE_VOCAB_THRESHOLD:
        return ParamGroup.SPARSE_SHARED
    return ParamGroup.DENSE_SHARED


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schema:
    """All model input fields of a dataset, plus its population sizes.

    ``num_users`` and ``num_ads`` size the ``user_id`` (LOCAL) and ``ad_id`` tables.
    """

    fields: tuple[FieldSpec, ...]
    num_users: int
    num_ads: int

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"schema has duplicate field names: {dupes}")
        if AD_KEY not in names:
            raise DataError(f"schema must contain the {AD_KEY!r} field")
        if self.num_users < 1 or self.num_ads < 1:
            raise DataError("schema num_users and num_ads must be >= 1")
        by_name = {f.name: f for f in self.fields}
        for f in self.fields:
            if not f.vocab_of:
                continue
            target = by_name.get(f.vocab_of)
            if target is None or target is f or target.vocab_of:
                raise DataError(f"schema field {f.name}: vocab_of must name another field that has no vocab_of "
                                f"itself; got {f.vocab_of!r}")
            if FieldKind.DENSE in (f.kind, target.kind) or f.vocab_size != target.vocab_size:
                raise DataError(f"schema field {f.name}: vocab_of={f.vocab_of!r} needs two id fields of one "
                                f"vocab_size; got {f.vocab_size} and {target.vocab_size}")

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise DataError(f"schema has no field {name!r}; known: {[f.name for f in self.fields]}")

    def by_entity(self, entity: Entity) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.entity is entity)

    def cloud_only(self) -> Schema:
        """The same schema without device-private fields (the cloud's view)."""
        kept = tuple(f for f in self.fields if f.visibility is Visibility.CLOUD)
        return self.with_fields(kept)

    def with_fields(self, fields: tuple[FieldSpec, ...]) -> Schema:
        """The same schema with ``fields`` only; a ``vocab_of`` naming a dropped field is
        cleared."""
        names = {f.name for f in fields}
        kept = tuple(f if not f.vocab_of or f.vocab_of in names else dataclasses.replace(f, vocab_of="")
                     for f in fields)
        return dataclasses.replace(self, fields=kept)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_users": self.num_users,
            "num_ads": self.num_ads,
            "fields": [f.to_dict() for f in self.fields],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schema:
        try:
            if not isinstance(d["fields"], list):
                raise TypeError(f"'fields' is a {type(d['fields']).__name__}, not a list of fields")
            fields = tuple(FieldSpec.from_dict(x) for x in d["fields"])
            counts = {k: d[k] for k in ("num_users", "num_ads")}
            for k, v in counts.items():
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"{k} is {v!r}, not a count")
            return cls(fields=fields, num_users=counts["num_users"], num_ads=counts["num_ads"])
        except KeyError as exc:
            raise DataError(f"schema has no {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise DataError(f"schema is malformed ({exc})") from exc
