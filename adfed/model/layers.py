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

The diagram is the reference computation (``forward`` of each module, lists of [B, D]
tensors). :meth:`PCVRModel.forward` computes the same values with fewer, larger
operations: :meth:`FieldEmbeddings.pool_block` pools a set of fields straight into one
[B, k, D] block (one lookup for all small dense tables), :meth:`DotInteraction.pairs`
works on blocks, and :meth:`Towers.forward_parts` multiplies each block by its columns
of the bottom layer instead of concatenating the input.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, cast, get_args

import numpy as np
import torch
from torch import nn

from adfed.data.examples import Batch
from adfed.data.schema import Entity, FieldKind, FieldSpec, ParamGroup
from adfed.errors import DataError
from adfed.model.pooling import lookup, mean_bag, pool_dense_bag

logger = logging.getLogger(__name__)

#: Standard deviation of the initial embedding rows.
EMBEDDING_INIT_STD = 0.05
#: Dense-gradient CATEGORICAL tables up to this many rows are read together by
#: :meth:`FieldEmbeddings.pool_block` (their concatenation is copied once per batch).
JOINT_MAX_ROWS = 4096
BagPooling = Literal["sum", "mean", "sqrtn"]
#: How a MULTI_HOT / SEQUENCE field's embeddings are combined: their sum (the default),
#: their mean, or their sum over sqrt(length) (TensorFlow's "sqrtn" combiner).
BAG_POOLINGS: tuple[str, ...] = get_args(BagPooling)


def is_sparse_group(group: ParamGroup) -> bool:
    """True when tables of ``group`` produce sparse gradients (touched rows only)."""
    return group is not ParamGroup.DENSE_SHARED


def _table_key(name: str) -> str:
    # A field named like a ModuleDict attribute ("keys", "type", ...) cannot be a key.
    return f"{name}_field" if hasattr(nn.ModuleDict, name) else name


class _Segment(NamedTuple):
    """Fields of a block read together: one table alone, or several small dense tables
    concatenated (``rows`` and ``starts`` of each, int64 [k]) and read by one lookup."""

    fields: tuple[FieldSpec, ...]
    joint: bool
    rows: torch.Tensor
    starts: torch.Tensor


class FieldEmbeddings(nn.Module):
    """One embedding table per non-DENSE field; DENSE fields and bag sizes as scalars.

    Parameters
    ----------
    fields : the schema fields to read, in order; their order fixes the F axis.
    dim : embedding dimension D, shared by every table (dot products need it).
    rows_override : table sizes that replace a field's ``vocab_size`` (e.g. ``user_id``
        with a single row on a phone).
    bag_pooling : how a bag's embeddings combine (:data:`BAG_POOLINGS`). ``"sum"`` keeps
        membership and count: ``<sum of intent embeddings, e_category>`` is a sum of one
        term per intent, where a mean divides it by the number of intents. Measured on
        worlds other than the demo's (seeds 1 and 2): +0.055 and +0.013 CVR AUC over
        ``"mean"`` (docs/results/2026-11-26-centralized-training.md). Sum and sqrtn are the mean times the length (or its root).
    share_vocab : a field whose schema ``vocab_of`` names another field read here, both
        DENSE_SHARED, reads that field's table instead of having its own (see
        :attr:`shared`). ``intent`` then reads ``ad_category``'s rows, so
        ``<sum of intent embeddings, e_category>`` holds ``|e_category|²`` exactly when
        the ad's category is among the intents: membership, which two separate rank-D
        tables can only approximate. Measured on worlds other than the demo's
        (docs/results/2026-11-26-centralized-training.md).

    Notes
    -----
    CATEGORICAL fields use ``nn.Embedding``; MULTI_HOT / SEQUENCE fields use
    ``nn.EmbeddingBag(mode="mean")`` (an empty bag pools to zeros), rescaled for
    ``bag_pooling``. Tables of LOCAL and
    SPARSE_SHARED fields have sparse gradients; DENSE_SHARED tables have dense ones.
    The modules hold the tables; lookups go through :mod:`adfed.model.pooling` (same
    values, faster backward, coalesced sparse gradients).
    """

    def __init__(
        self,
        fields: Sequence[FieldSpec],
        dim: int,
        *,
        rows_override: dict[str, int] | None = None,
        bag_pooling: BagPooling = "sum",
        share_vocab: bool = False,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"model.embedding_dim must be an int >= 1; got {dim}")
        if bag_pooling not in BAG_POOLINGS:
            raise ValueError(f"model.bag_pooling must be one of {BAG_POOLINGS}; got {bag_pooling!r}")
        self.bag_pooling = bag_pooling
        rows_override = rows_override or {}
        self.dim = dim
        self.embedded: tuple[FieldSpec, ...] = tuple(f for f in fields if f.kind is not FieldKind.DENSE)
        self.dense_names: tuple[str, ...] = tuple(f.name for f in fields if f.kind is FieldKind.DENSE)
        self.tables = nn.ModuleDict()
        self._key: dict[str, str] = {}
        self._rows: dict[str, int] = {}
        self._segment_cache: dict[tuple[int, ...], list[_Segment]] = {}
        #: field -> the field whose table it reads (share_vocab); such a field has none
        self.shared: dict[str, str] = self._shared_fields(rows_override) if share_vocab else {}
        for f in self.embedded:
            rows = rows_override.get(f.name, f.vocab_size)
            self._rows[f.name] = rows
            if rows < 1:
                raise ValueError(f"table size of field {f.name} must be >= 1; got {rows}")
            if f.name in self.shared:
                continue
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
        for name, owner in self.shared.items():
            self._key[name] = self._key[owner]
        #: table parameter name (module-relative) -> the fields reading it, owner first
        self._readers: dict[str, list[FieldSpec]] = {}
        for f in sorted(self.embedded, key=lambda f: f.name in self.shared):  # stable: owners first
            self._readers.setdefault(self.param_name(f.name), []).append(f)

    def _shared_fields(self, rows_override: dict[str, int]) -> dict[str, str]:
        by_name = {f.name: f for f in self.embedded}
        out = {}
        for f in self.embedded:
            owner = by_name.get(f.vocab_of)
            if (owner is not None and f.group is owner.group is ParamGroup.DENSE_SHARED
                    and rows_override.get(f.name, f.vocab_size) == rows_override.get(owner.name, owner.vocab_size)):
                out[f.name] = owner.name
        return out

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
        """The field whose table is ``param_name`` (module-relative); for a shared table,
        the field that owns it."""
        return self.fields_of(param_name)[0]

    def fields_of(self, param_name: str) -> list[FieldSpec]:
        """Every field that reads table ``param_name``: its owner, then those sharing it."""
        readers = self._readers.get(param_name)
        if readers is None:
            raise KeyError(f"{param_name!r} is not an embedding table; known: {list(self.param_groups())}")
        return readers

    def _weight(self, f: FieldSpec) -> torch.Tensor:
        return self.tables[self._key[f.name]].weight  # type: ignore[return-value]

    def _pool_one(self, f: FieldSpec, batch: Batch) -> torch.Tensor:
        weight, sparse = self._weight(f), is_sparse_group(f.group)
        if not f.is_bag:
            if sparse:
                # The module's gradient (B rows, one per id) is cheaper to coalesce later
                # than to sort here.
                return self.tables[self._key[f.name]](batch.ids[f.name])
            return lookup(batch.ids[f.name], weight)
        values, offsets = batch.bags[f.name]
        lengths = batch.bag_lengths(f.name)
        if sparse:
            mean = mean_bag(values, offsets, weight, sparse_grad=True, lengths=lengths)
        else:
            mean = pool_dense_bag(values, offsets, weight, lengths=lengths)
        if self.bag_pooling == "mean":
            return mean
        n = lengths.to(mean.dtype).unsqueeze(1)  # [B, 1]; empty bags pool to 0
        return mean * (n if self.bag_pooling == "sum" else n.sqrt())

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
        try:
            pooled = [self._pool_one(f, batch) for f in self.embedded]
            dense = [batch.dense[name].unsqueeze(1) for name in self.dense_names]
        except KeyError as exc:
            raise DataError(f"batch lacks model input field {exc.args[0]!r}") from exc
        dense += [bag_size(batch.bag_lengths(f.name)).unsqueeze(1) for f in self.embedded if f.is_bag]
        return pooled, dense

    def _joinable(self, f: FieldSpec) -> bool:
        return not (f.is_bag or is_sparse_group(f.group)) and self._rows[f.name] <= JOINT_MAX_ROWS

    def block_order(self, fields: Sequence[int]) -> list[int]:
        """``fields`` (indices into ``self.embedded``) reordered for :meth:`pool_block`.

        The small dense CATEGORICAL tables come first (one lookup reads them all), the
        others keep their relative order after them.
        """
        joint = [i for i in fields if self._joinable(self.embedded[i])]
        return joint + [i for i in fields if i not in joint]

    def _segments(self, fields: Sequence[int]) -> list[_Segment]:
        key = tuple(fields)
        if key not in self._segment_cache:
            runs: list[list[FieldSpec]] = []
            for i in key:
                f = self.embedded[i]
                if self._joinable(f) and runs and self._joinable(runs[-1][0]):
                    runs[-1].append(f)
                else:
                    runs.append([f])
            segments = []
            for run in runs:
                # built on first use, not in __init__ (which may run on the meta device)
                rows = torch.tensor([self._rows[f.name] for f in run], device="cpu")
                segments.append(_Segment(tuple(run), self._joinable(run[0]), rows, rows.cumsum(0) - rows))
            self._segment_cache[key] = segments
        return self._segment_cache[key]

    def _pool_joint(self, seg: _Segment, batch: Batch) -> torch.Tensor:
        ids = torch.stack([batch.ids[f.name] for f in seg.fields], dim=1)  # [B, k]
        rows = seg.rows.to(ids.device)
        # An out-of-range id would read a neighbouring table's row instead of failing.
        if ids.shape[0] and bool(((ids < 0) | (ids >= rows)).any()):
            low, high = ids.aminmax(dim=0)
            j = int(((low < 0) | (high >= rows)).nonzero()[0, 0])
            raise IndexError(
                f"ids of field {seg.fields[j].name} must lie in [0, {int(rows[j])}); got [{int(low[j])}, {int(high[j])}]"
            )
        weight = torch.cat([self._weight(f) for f in seg.fields])
        return lookup(ids + seg.starts.to(ids.device), weight)

    def pool_block(self, batch: Batch, fields: Sequence[int]) -> torch.Tensor:
        """Pool the fields ``fields`` (indices into ``self.embedded``) into one block.

        Returns
        -------
        float32 [B, len(fields), D]; ``[:, j]`` equals ``forward(batch)[0][fields[j]]``.
        Fastest in :meth:`block_order`'s order.

        Raises
        ------
        DataError : the batch lacks a field this model reads.
        """
        parts: list[torch.Tensor] = []
        try:
            for seg in self._segments(fields):
                if seg.joint:
                    parts.append(self._pool_joint(seg, batch))
                else:
                    parts.append(self._pool_one(seg.fields[0], batch).unsqueeze(1))
        except KeyError as exc:
            raise DataError(f"batch lacks model input field {exc.args[0]!r}") from exc
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def scalar_block(self, batch: Batch) -> torch.Tensor:
        """The N scalar inputs of ``forward`` side by side, float32 [B, N].

        Raises
        ------
        DataError : the batch lacks a field this model reads.
        """
        try:
            cols = [batch.dense[name] for name in self.dense_names]
            cols += [bag_size(batch.bag_lengths(f.name)) for f in self.embedded if f.is_bag]
        except KeyError as exc:
            raise DataError(f"batch lacks model input field {exc.args[0]!r}") from exc
        return torch.stack(cols, dim=1)

    @property
    def num_scalars(self) -> int:
        """N, the scalar inputs: DENSE fields, then one bag size per bag field."""
        return len(self.dense_names) + sum(f.is_bag for f in self.embedded)


def bag_size(lengths: torch.Tensor) -> torch.Tensor:
    """log1p of each bag's length (int [B], :meth:`Batch.bag_lengths`), float32 [B].

    Mean pooling forgets how many ids a bag holds (how many apps are installed, how many
    purchase intents are active), which is itself a signal; this gives it back.
    """
    return torch.log1p(lengths.to(torch.float32))


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
        ads = torch.stack([pooled[i] for i in self.ad_fields], dim=1)
        others = torch.stack([pooled[i] for i in self.other_fields], dim=1)
        return self.pairs(others, ads)

    @staticmethod
    def pairs(others: torch.Tensor, ads: torch.Tensor) -> torch.Tensor:
        """others float32 [B, O, D], ads [B, A, D] -> [B, O·A], column o·A + a = <o, a>."""
        return cast(torch.Tensor, _Dots.apply(others, ads)).flatten(1)


class _Dots(torch.autograd.Function):
    """``bmm(others, ads^T)``; its backward makes the incoming gradient contiguous first.

    The gradient usually arrives as a column slice of a wider one, and ``bmm`` over
    strided [O, A] matrices is ~3x slower than the copy plus two contiguous ``bmm``s.
    """

    @staticmethod
    def forward(ctx: Any, others: torch.Tensor, ads: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(others, ads)
        return torch.bmm(others, ads.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        others, ads = ctx.saved_tensors
        grad = grad.contiguous()
        grad_others = torch.bmm(grad, ads) if ctx.needs_input_grad[0] else None
        grad_ads = torch.bmm(grad.transpose(1, 2), others) if ctx.needs_input_grad[1] else None
        return grad_others, grad_ads


class VocabMatch(nn.Module):
    """Logit offsets from how many ids of a user's bag equal the ad's id of the same
    vocabulary: an intent that *is* the ad's category.

    A bag field whose schema ``vocab_of`` names an ad-side field (``intent`` holds
    ``ad_category`` ids) gives one count per impression, ``|{i in bag : i = ad's id}|``;
    each count meets a learned weight per head, ``[B, P] @ weight [P, 2]`` -> (CTR, CVR)
    offsets. The dot interaction sees the same pair only through embeddings: with 24
    categories in 16 dimensions the rows cannot be orthogonal, so ``<sum of intents,
    category>`` mixes membership with the other intents' similarity; the count states it
    exactly, for two parameters per pair (+0.005 to +0.006 expected AUC:
    docs/results/2026-11-27-vocab-match.md).
    Weights start at zero, so an untrained match changes nothing.

    Parameters
    ----------
    pairs : (bag field, ad field) names, one per count.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("VocabMatch needs at least one (bag field, ad field) pair")
        self.pairs = list(pairs)
        self.weight = nn.Parameter(torch.zeros(len(self.pairs), 2))

    @staticmethod
    def pairs_of(fields: Sequence[FieldSpec]) -> list[tuple[str, str]]:
        """The (bag, ad field) pairs among ``fields``: a non-ad bag whose ``vocab_of`` is an
        ad-side categorical field that is also read."""
        by_name = {f.name: f for f in fields}
        return [(f.name, f.vocab_of) for f in fields
                if f.is_bag and f.entity is not Entity.AD and f.vocab_of in by_name
                and by_name[f.vocab_of].entity is Entity.AD and not by_name[f.vocab_of].is_bag]

    def counts(self, batch: Batch) -> torch.Tensor:
        """float32 [B, P]: for each pair, how many of the bag's ids equal the ad's id."""
        columns = []
        for bag, ad in self.pairs:
            values, _ = batch.bags[bag]
            lengths, ids = batch.bag_lengths(bag), batch.ids[ad]
            columns.append(_bag_matches(values, lengths, ids))
        return columns[0].unsqueeze(1) if len(columns) == 1 else torch.stack(columns, dim=1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """float32 [B, 2]: the (CTR, CVR) logit offsets of ``batch``."""
        return self.counts(batch) @ self.weight

    def add_to(self, ctr: torch.Tensor, cvr: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ctr, cvr) + forward(batch)`` as one autograd node: the same values with fewer
        small operations per training step than the formula's matmul, slices and adds."""
        return cast(tuple[torch.Tensor, torch.Tensor], _AddMatch.apply(ctr, cvr, self.counts(batch), self.weight))


class _AddMatch(torch.autograd.Function):
    """(ctr [B], cvr [B], counts [B, P], weight [P, 2]) -> (ctr + counts @ weight[:, 0],
    cvr + counts @ weight[:, 1])."""

    @staticmethod
    def forward(ctx: Any, ctr: torch.Tensor, cvr: torch.Tensor, counts: torch.Tensor,
                weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(counts)
        return torch.addmv(ctr, counts, weight[:, 0]), torch.addmv(cvr, counts, weight[:, 1])

    @staticmethod
    def backward(ctx: Any, grad_ctr: torch.Tensor, grad_cvr: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (counts,) = ctx.saved_tensors
        grad_weight = counts.t() @ torch.stack([grad_ctr, grad_cvr], dim=1)
        return grad_ctr, grad_cvr, None, grad_weight  # type: ignore[return-value]


def _bag_matches(values: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 [B]: how many ids of bag b equal ``ids[b]`` (exact integers)."""
    rows = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths, output_size=values.shape[0])
    hits = (values == ids[rows]).to(torch.float32)
    return torch.zeros(lengths.shape[0]).index_add_(0, rows, hits)


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

    def output_bias_names(self, prefix: str) -> tuple[str, str]:
        """The parameter names of the CTR and CVR heads' last biases, under ``prefix``
        (the towers' own name in the model, e.g. ``"towers"``)."""
        return f"{prefix}.ctr.{len(self.ctr) - 1}.bias", f"{prefix}.cvr.{len(self.cvr) - 1}.bias"

    def start_heads_(self, ctr_logit: float | None, cvr_logit: float | None) -> None:
        """Start the heads at fixed logits: each tower's last bias (None: left as it is), and the
        CVR tower's last weights at zero, so the CVR logit is its bias on every input (the
        CTR head keeps its drawn weights)."""
        with torch.no_grad():
            if ctr_logit is not None:
                cast(nn.Linear, self.ctr[-1]).bias.fill_(ctr_logit)
            cvr = cast(nn.Linear, self.cvr[-1])
            if cvr_logit is not None:
                cvr.bias.fill_(cvr_logit)
            cvr.weight.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x float32 [B, in] -> (ctr_logit [B], cvr_logit [B])."""
        h = self.bottom(x)
        return self.ctr(h).squeeze(1), self.cvr(h).squeeze(1)

    def forward_parts(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` of an input given in pieces: ``(x_k [B, n_k], columns_k)``.

        ``columns_k`` (int64 [n_k]) lists the columns of the full input that ``x_k``
        holds; together the pieces must cover each column once. Each piece meets its own
        columns of the bottom layer, so the full input is never concatenated, and no
        GEMM writes rows of an awkward width (307 columns: 2x slower than 192 + 64 + 51).
        Same values as ``forward`` up to float rounding (the sums run in another order).
        """
        linear = cast(nn.Linear, self.bottom[0])
        h: torch.Tensor | None = None
        for x, columns in parts:
            w = linear.weight.index_select(1, columns.to(x.device)).t()
            # in place after the first: no copy of the [B, h0] sum per piece
            h = torch.addmm(linear.bias, x, w) if h is None else h.addmm_(x, w)
        if h is None:
            raise ValueError("Towers.forward_parts needs at least one piece")
        h = torch.relu(h)
        return self.ctr(h).squeeze(1), self.cvr(h).squeeze(1)


#: values drawn at a time by :func:`skip_normal_` (a multiple of 16)
_SKIP_CHUNK = 1 << 20


def untouched_zeros(shape: tuple[int, ...]) -> torch.Tensor:
    """float32 zeros in fresh memory (calloc: large blocks are mapped zero pages, so
    they cost no resident memory until written)."""
    return torch.from_numpy(np.zeros(shape, dtype=np.float32))


def skip_normal_(generator: torch.Generator, n: int) -> None:
    """Advance ``generator`` exactly as ``normal_`` over ``n`` float32 values would, without
    holding them: drawn in chunks of :data:`_SKIP_CHUNK` into a scratch buffer. torch's
    CPU ``normal_`` fills 16 values at a time and treats fewer than 16 otherwise, so every
    chunk is a multiple of 16 and the last one takes the remainder with it (a test checks
    that the values drawn after it are the same)."""
    buf = torch.empty(min(n, _SKIP_CHUNK + 16))
    left = n
    while left:
        k = left if left < _SKIP_CHUNK + 16 else _SKIP_CHUNK
        buf[:k].normal_(0.0, 1.0, generator=generator)
        left -= k


@torch.no_grad()
def init_parameters_(module: nn.Module, generator: torch.Generator, *, zeros: set[int] | frozenset[int] = frozenset()) -> None:
    """Initialise every parameter of ``module`` from ``generator`` (never the global RNG).

    Embedding rows ~ N(0, EMBEDDING_INIT_STD²); ``nn.Linear`` weights ~ U(±1/sqrt(fan_in))
    (PyTorch's default bound), biases 0. Parameters are visited in ``named_modules``
    order, so the same generator state gives the same model. An embedding whose weight's
    ``id`` is in ``zeros`` gets :func:`untouched_zeros` instead, its draws skipped
    (:func:`skip_normal_`), so the other parameters are as without it.
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and id(sub.weight) in zeros:
            skip_normal_(generator, sub.weight.numel())
            sub.weight.data = untouched_zeros(tuple(sub.weight.shape))
        elif isinstance(sub, (nn.Embedding, nn.EmbeddingBag)):
            sub.weight.normal_(0.0, EMBEDDING_INIT_STD, generator=generator)
        elif isinstance(sub, nn.Linear):
            bound = 1.0 / math.sqrt(sub.in_features)
            sub.weight.uniform_(-bound, bound, generator=generator)
            if sub.bias is not None:
                sub.bias.zero_()
        elif isinstance(sub, VocabMatch):
            sub.weight.zero_()
