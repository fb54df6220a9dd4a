"""Building blocks of the pCVR model: field embeddings, the dot interaction, the towers.

Notation (as in TorchRec): B = batch size, F = number of embedded (non-DENSE) fields,
D = embedding dimension, N = number of scalar inputs (DENSE fields plus one bag size per
bag field), P = number of (ad-side field, other field) pairs::

    batch ─► FieldEmbeddings ─┬─► F pooled [B, D] ───────────────┐
                              ├─► N scalars [B, 1] ──────────────┼─► concat [B, F·D + N + P]
                              └─► DotInteraction(pooled) [B, P] ─┘        │
                                                                          ▼
                         ctr_logit [B] ◄── ctr ◄──┬── bottom [B, h0] ◄────┘
                         cvr_logit [B] ◄── cvr ◄──┘

Every component states the :class:`ParamGroup` of each of its parameters, so the model
can decide its decomposition in one place (:meth:`PCVRModel.parameter_groups`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from adfed.data.examples import Batch
from adfed.data.schema import Entity, FieldKind, FieldSpec, ParamGroup
from adfed.errors import DataError
from adfed.model.pooling import pool_dense_bag

logger = logging.getLogger(__name__)

#: Standard deviation of the initial embedding rows.
EMBEDDING_INIT_STD = 0.05


def is_sparse_group(group: ParamGroup) -> bool:
    """True when tables of ``group`` produce sparse gradients (touched rows only)."""
    return group is not ParamGroup.DENSE_SHARED


def _table_key(name: str) -> str:
    # A field named like a ModuleDict attribute ("keys", "type", ...) cannot be a key.
    return f"{name}_field" if hasattr(nn.ModuleDict, name) else name


class FieldEmbeddings(nn.Module):
    """One embedding table per non-DENSE field; DENSE fields and bag sizes as scalars.

    Parameters
    ----------
    fields : the schema fields to read, in order; their order fixes the F axis.
    dim : embedding dimension D, shared by every table (dot products need it).
    rows_override : table sizes that replace a field's ``vocab_size`` (e.g. ``user_id``
        with a single row on a phone).

    Notes
    -----
    CATEGORICAL fields use ``nn.Embedding``; MULTI_HOT / SEQUENCE fields use
    ``nn.EmbeddingBag(mode="mean")`` (an empty bag pools to zeros). Tables of LOCAL and
    SPARSE_SHARED fields have sparse gradients; DENSE_SHARED tables have dense ones.
    Bags over dense-gradient tables are pooled by :func:`pool_dense_bag` (same values,
    faster backward).
    """

    def __init__(
        self,
        fields: Sequence[FieldSpec],
        dim: int,
        *,
        rows_override: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"model.embedding_dim must be an int >= 1; got {dim}")
        rows_override = rows_override or {}
        self.dim = dim
        self.embedded: tuple[FieldSpec, ...] = tuple(f for f in fields if f.kind is not FieldKind.DENSE)
        self.dense_names: tuple[str, ...] = tuple(f.name for f in fields if f.kind is FieldKind.DENSE)
        self.tables = nn.ModuleDict()
        self._key: dict[str, str] = {}
        for f in self.embedded:
            rows = rows_override.get(f.name, f.vocab_size)
            if rows < 1:
                raise ValueError(f"table size of field {f.name} must be >= 1; got {rows}")
            sparse = is_sparse_group(f.group)
            table: nn.Module
            if f.is_bag:
                table = nn.EmbeddingBag(rows, dim, mode="mean", sparse=sparse)
            else:
                table = nn.Embedding(rows, dim, sparse=sparse)
            key = _table_key(f.name)
            if key in self.tables:
                raise DataError(f"schema field {f.name}: table key {key!r} collides with another field")
            self.tables[key] = table
            self._key[f.name] = key

    @property
    def num_fields(self) -> int:
        """F, the number of embedded fields."""
        return len(self.embedded)

    def param_name(self, field: str) -> str:
        """The (module-relative) parameter name of ``field``'s table."""
        return f"tables.{self._key[field]}.weight"

    def param_groups(self) -> dict[str, ParamGroup]:
        """Module-relative parameter name -> ParamGroup, from each field's ``group``."""
        return {self.param_name(f.name): f.group for f in self.embedded}

    def sparse_param_names(self) -> list[str]:
        """Module-relative names of the tables whose gradients are sparse."""
        return [self.param_name(f.name) for f in self.embedded if is_sparse_group(f.group)]

    def field_of(self, param_name: str) -> FieldSpec:
        """The field whose table is ``param_name`` (module-relative)."""
        for f in self.embedded:
            if self.param_name(f.name) == param_name:
                return f
        raise KeyError(f"{param_name!r} is not an embedding table; known: {list(self.param_groups())}")

    def forward(self, batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Pool every field.

        Returns
        -------
        pooled : F tensors float32 [B, D], in ``self.embedded`` order.
        scalars : N tensors float32 [B, 1]: the DENSE fields as they come, then
            :func:`bag_size` of each bag field.

        Raises
        ------
        DataError : the batch lacks a field this model reads.
        """
        pooled: list[torch.Tensor] = []
        try:
            for f in self.embedded:
                table = self.tables[self._key[f.name]]
                if not isinstance(table, nn.EmbeddingBag):
                    pooled.append(table(batch.ids[f.name]))
                elif table.sparse:
                    pooled.append(table(*batch.bags[f.name]))
                else:
                    pooled.append(pool_dense_bag(*batch.bags[f.name], table.weight))
            dense = [batch.dense[name].unsqueeze(1) for name in self.dense_names]
        except KeyError as exc:
            raise DataError(f"batch lacks model input field {exc.args[0]!r}") from exc
        dense += [bag_size(*batch.bags[f.name]) for f in self.embedded if f.is_bag]
        return pooled, dense

    @property
    def num_scalars(self) -> int:
        """N, the scalar inputs: DENSE fields, then one bag size per bag field."""
        return len(self.dense_names) + sum(f.is_bag for f in self.embedded)


def bag_size(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """log1p of each bag's length, float32 [B, 1].

    Mean pooling forgets how many ids a bag holds (how many apps are installed, how many
    purchase intents are active), which is itself a signal; this gives it back.
    """
    lengths = torch.diff(offsets, append=offsets.new_tensor([values.shape[0]]))
    return torch.log1p(lengths.to(torch.float32)).unsqueeze(1)


class DotInteraction(nn.Module):
    """Dot products between every ad-side field and every other field.

    With ad-side fields a (``Entity.AD``: ad_id, advertiser, category, ...) and the other
    fields o (user and context, ``user_id`` and the private fields included), the
    features are ``<e_a, e_o>`` for every pair: the user x ad and context x ad affinities
    (installed apps x ad, intents x ad category, ...) that an MLP over the concatenation
    learns poorly. DLRM's pairwise dot interaction (Naumov et al., 2019) restricted to
    the pairs that involve the ad. No parameters.

    Parameters
    ----------
    entities : the entity of each of the F pooled inputs, in order.
    """

    def __init__(self, entities: Sequence[Entity]) -> None:
        super().__init__()
        self.ad_fields = [i for i, e in enumerate(entities) if e is Entity.AD]
        self.other_fields = [i for i, e in enumerate(entities) if e is not Entity.AD]
        self.out_features = len(self.ad_fields) * len(self.other_fields)

    def forward(self, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        """F tensors float32 [B, D] -> float32 [B, P], P = #ad fields x #other fields."""
        if self.out_features == 0:
            return pooled[0].new_zeros(pooled[0].shape[0], 0)
        ads = torch.stack([pooled[i] for i in self.ad_fields], dim=1)  # [B, A, D]
        others = torch.stack([pooled[i] for i in self.other_fields], dim=1)  # [B, O, D]
        return torch.bmm(others, ads.transpose(1, 2)).flatten(1)


def _mlp(in_features: int, hidden: Sequence[int], out_features: int | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    if out_features is not None:
        layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class Towers(nn.Module):
    """A shared bottom layer, then a CTR tower and a CVR tower with one logit each.

    With ``hidden = (h0, h1, ..., hk)``: ``bottom`` is Linear(in, h0) + ReLU, shared by
    both tasks; each tower is an MLP h0 → h1 → ... → hk → 1 with ReLU in between.
    Sharing the widest layer halves the cost of the towers (the wide input meets the
    first layer once), which is most of a training step on a CPU::

        x [B, in] ─► bottom [B, h0] ─┬─► ctr tower ─► [B]
                                     └─► cvr tower ─► [B]
    """

    def __init__(self, in_features: int, hidden: Sequence[int]) -> None:
        super().__init__()
        if len(hidden) < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"model.tower must be one or more ints >= 1; got {list(hidden)}")
        self.bottom = _mlp(in_features, hidden[:1], None)
        self.ctr = _mlp(hidden[0], hidden[1:], 1)
        self.cvr = _mlp(hidden[0], hidden[1:], 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x float32 [B, in] -> (ctr_logit [B], cvr_logit [B])."""
        h = self.bottom(x)
        return self.ctr(h).squeeze(1), self.cvr(h).squeeze(1)


@torch.no_grad()
def init_parameters_(module: nn.Module, generator: torch.Generator) -> None:
    """Initialise every parameter of ``module`` from ``generator`` (never the global RNG).

    Embedding rows ~ N(0, EMBEDDING_INIT_STD²); ``nn.Linear`` weights ~ U(±1/sqrt(fan_in))
    (PyTorch's default bound), biases 0. Parameters are visited in ``named_modules``
    order, so the same generator state gives the same model.
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)):
            sub.weight.normal_(0.0, EMBEDDING_INIT_STD, generator=generator)
        elif isinstance(sub, nn.Linear):
            bound = 1.0 / math.sqrt(sub.in_features)
            sub.weight.uniform_(-bound, bound, generator=generator)
            if sub.bias is not None:
                sub.bias.zero_()
