"""The ESMM-style pCVR model over the entire impression space.

pCTR and pCVR come from two towers over one shared representation; the model is trained
on click (pCTR) and on click ∧ conversion (pCTCVR = pCTR × pCVR), so the CVR tower learns
from every impression, not only from clicked ones (Ma et al., "Entire Space Multi-Task
Model", SIGIR 2018).

Per-user parameters. When the schema has a ``user_id`` field its table (one row per user)
and a per-user scalar bias per tower are LOCAL: they never leave the phone. A phone
builds its model with ``user_rows=1`` and feeds it batches whose ``user_id`` column has
been mapped to row 0 with :func:`remap_user`; a centralized model keeps one row per user
and reads ``user_id`` as is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from adfed.data.examples import Batch, Examples
from adfed.data.schema import USER_KEY, FieldSpec, ParamGroup, Schema
from adfed.errors import TrainingError
from adfed.model.layers import (
    BagPooling,
    DotInteraction,
    FieldEmbeddings,
    Towers,
    VocabMatch,
    init_parameters_,
    is_sparse_group,
)

logger = logging.getLogger(__name__)

Variant = Literal["full", "cloud_only"]
#: log(pCTCVR) is clamped below this so that log(1 - pCTCVR) stays finite.
_LOG_P_MAX = -1e-6
#: Batches of at least this many rows go through the blocks of :meth:`PCVRModel.forward`
#: (measured, training steps: the blocks save ~10% at 2k-4k rows with 2 threads and
#: ~18% with 1, break even near 512 and cost 5-15% more below 256, where the extra small
#: operations they start outweigh what they save).
BLOCK_MIN_ROWS = 512


@dataclasses.dataclass(frozen=True, eq=False)
class Output:
    """Model output for a batch: two logits, float32 [B] each."""

    ctr_logit: torch.Tensor
    cvr_logit: torch.Tensor

    @property
    def pctr(self) -> torch.Tensor:
        """P(click | impression), [B]."""
        return torch.sigmoid(self.ctr_logit)

    @property
    def pcvr(self) -> torch.Tensor:
        """P(conversion | click, impression), [B]."""
        return torch.sigmoid(self.cvr_logit)

    @property
    def pctcvr(self) -> torch.Tensor:
        """P(click ∧ conversion | impression) = pCTR × pCVR, [B]."""
        return self.pctr * self.pcvr

    @property
    def log_pctcvr(self) -> torch.Tensor:
        """log pCTCVR computed in log space (finite for any logits), [B]."""
        return F.logsigmoid(self.ctr_logit) + F.logsigmoid(self.cvr_logit)


@dataclasses.dataclass(frozen=True)
class _BlockPlan:
    """How :meth:`PCVRModel.forward` lays out the tower input (see ``_plan_blocks``).

    sides : the field indices of each embedding block: (others, ads), or (all,) when
        there is no interaction.
    columns : for each block, the tower input columns its flattened [B, k·D] view holds.
    has_pairs, has_scalars : whether there are interaction / scalar inputs.
    extra : the tower input columns of ``cat([pairs, scalars])``.
    """

    sides: list[list[int]]
    columns: list[torch.Tensor]
    has_pairs: bool
    has_scalars: bool
    extra: torch.Tensor


class PCVRModel(nn.Module):
    """Shared field embeddings + ad x (user, context) dots → shared bottom → CTR and CVR towers.

    Parameters
    ----------
    schema : the fields this model reads (already reduced for the cloud-only variant).
    embeddings : one table per embedded field (see :class:`FieldEmbeddings`).
    interaction : dot products between ad-side and other field embeddings.
    towers : the shared bottom layer and the two towers, [B, in] -> two [B] logits.
    user_bias : a ``[user_rows, 2]`` table of per-user logit offsets (CTR, CVR), LOCAL;
        ``None`` when the schema has no ``user_id`` field.
    match : logit offsets from bag ids equal to the ad's (see :class:`VocabMatch`),
        ``dense_shared``; ``None`` when off or when no bag shares an ad field's vocabulary.

    Use :func:`build_model` rather than this constructor.
    """

    def __init__(
        self,
        schema: Schema,
        embeddings: FieldEmbeddings,
        interaction: DotInteraction,
        towers: Towers,
        user_bias: nn.Embedding | None,
        match: VocabMatch | None = None,
    ) -> None:
        super().__init__()
        self.schema = schema
        self.embeddings = embeddings
        self.interaction = interaction
        self.towers = towers
        self.user_bias = user_bias
        self.match = match
        self._groups = self._decide_groups()
        self._sparse = frozenset(self._sparse_names())
        self._blocks = self._plan_blocks()

    # ---- the parameter decomposition: decided here and nowhere else ----------------

    def _decide_groups(self) -> dict[str, ParamGroup]:
        groups = {f"embeddings.{k}": g for k, g in self.embeddings.param_groups().items()}
        if self.user_bias is not None:
            groups.update({f"user_bias.{k}": ParamGroup.LOCAL for k, _ in self.user_bias.named_parameters()})
        for part in ("interaction", "towers", "match"):
            module = getattr(self, part)
            if module is None:
                continue
            groups.update({f"{part}.{k}": ParamGroup.DENSE_SHARED for k, _ in module.named_parameters()})
        names = {n for n, _ in self.named_parameters()}
        if names != set(groups):
            raise RuntimeError(f"parameters without a ParamGroup: {sorted(names ^ set(groups))}")
        return groups

    def _sparse_names(self) -> list[str]:
        names = [f"embeddings.{k}" for k in self.embeddings.sparse_param_names()]
        if self.user_bias is not None and self.user_bias.sparse:
            names.append("user_bias.weight")
        return names

    def parameter_groups(self) -> dict[str, ParamGroup]:
        """Parameter name -> its ParamGroup, for every parameter (a copy)."""
        return dict(self._groups)

    def has_sparse_grad(self, name: str) -> bool:
        """True when parameter ``name`` gets sparse gradients (touched rows only)."""
        return name in self._sparse

    def is_dense_table(self, name: str) -> bool:
        """True when parameter ``name`` is an embedding table with dense gradients (a
        small ``dense_shared`` table such as ``hour`` or ``advertiser_id``)."""
        return name.startswith("embeddings.") and name not in self._sparse

    def table_name(self, field: str) -> str:
        """The parameter name of ``field``'s embedding table."""
        return "embeddings." + self.embeddings.param_name(field)

    def table_field(self, name: str) -> FieldSpec:
        """The schema field whose embedding table is parameter ``name``."""
        prefix = "embeddings."
        if not name.startswith(prefix):
            raise KeyError(f"{name!r} is not an embedding table")
        return self.embeddings.field_of(name[len(prefix) :])

    def rows_read(self, name: str, batch: Batch | Examples) -> torch.Tensor | np.ndarray | None:
        """The row ids ``batch`` reads from table parameter ``name`` (repeats included):
        an embedding table or the user bias; None for a parameter that is not a table.
        A Batch gives a tensor, Examples the numpy column itself; a table several fields
        read (``share_vocab``) gives their reads concatenated."""
        if name == "user_bias.weight" and self.user_bias is not None:
            return batch.ids[USER_KEY]
        if not name.startswith("embeddings.tables."):
            return None
        reads = [batch.bags[f.name][0] if f.is_bag else batch.ids[f.name]
                 for f in self.embeddings.fields_of(name[len("embeddings."):])]
        if len(reads) == 1:
            return reads[0]
        if isinstance(reads[0], torch.Tensor):  # a Batch: every read is a tensor
            return torch.cat(cast(list[torch.Tensor], reads))
        return np.concatenate(reads)

    def read_positions(self, name: str, data: Examples) -> np.ndarray:
        """The example (row of ``data``) of each read :meth:`rows_read` gives for the
        embedding table ``name``, in the same order: int64 [reads]."""
        n = len(data)
        parts = [np.repeat(np.arange(n, dtype=np.int64), np.diff(data.bags[f.name][1])) if f.is_bag
                 else np.arange(n, dtype=np.int64) for f in self.embeddings.fields_of(name[len("embeddings."):])]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # ---- forward -------------------------------------------------------------------

    def _plan_blocks(self) -> _BlockPlan:
        """Which fields go in which block, and which tower input columns each block is.

        The reference input is ``cat([*pooled, *scalars, interaction(pooled)])`` (F·D,
        then N, then P columns); the blocks hold the same numbers in another order.
        """
        emb, inter = self.embeddings, self.interaction
        d, n_ads = emb.dim, len(inter.ad_fields)
        if inter.out_features == 0:
            sides = [emb.block_order(range(emb.num_fields))]
        else:
            sides = [emb.block_order(inter.other_fields), emb.block_order(inter.ad_fields)]
        columns = [[i * d + k for i in side for k in range(d)] for side in sides]
        first = emb.num_fields * d
        scalars = list(range(first, first + emb.num_scalars))
        first += emb.num_scalars
        pairs = [
            first + inter.other_fields.index(o) * n_ads + inter.ad_fields.index(a)
            for o in sides[0]
            for a in (sides[1] if len(sides) > 1 else [])
        ]
        # Explicit device: __init__ may run under build_model's meta device.
        columns_t = [torch.tensor(c, dtype=torch.int64, device="cpu") for c in columns]
        extra = torch.tensor(pairs + scalars, dtype=torch.int64, device="cpu")
        return _BlockPlan(
            sides=sides, columns=columns_t, has_pairs=bool(pairs), has_scalars=bool(scalars), extra=extra
        )

    def forward(self, batch: Batch) -> Output:
        """Score a batch; returns both logits, float32 [B] each.

        Computes ``towers(cat([*pooled, *scalars, interaction(pooled)]))`` from the
        modules' ``forward`` methods; from :data:`BLOCK_MIN_ROWS` rows on, in blocks
        (same values up to float rounding, see :mod:`adfed.model.layers`).
        """
        if len(batch) >= BLOCK_MIN_ROWS:
            ctr, cvr = self._towers_by_blocks(batch)
        else:
            pooled, scalars = self.embeddings(batch)
            ctr, cvr = self.towers(torch.cat([*pooled, *scalars, self.interaction(pooled)], dim=1))
        if self.match is not None:
            ctr, cvr = self.match.add_to(ctr, cvr, batch)
        if self.user_bias is not None:
            bias = self.user_bias(batch.ids[USER_KEY])
            ctr = ctr + bias[:, 0]
            cvr = cvr + bias[:, 1]
        return Output(ctr_logit=ctr, cvr_logit=cvr)

    def _towers_by_blocks(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self._blocks
        blocks = [self.embeddings.pool_block(batch, side) for side in plan.sides]
        parts = [(b.flatten(1), cols) for b, cols in zip(blocks, plan.columns, strict=True)]
        # scalars and pairs as one piece: a GEMM with 3 columns is as slow as with 50
        extra = [self.interaction.pairs(blocks[0], blocks[1])] if plan.has_pairs else []
        if plan.has_scalars:
            extra.append(self.embeddings.scalar_block(batch))
        if extra:
            parts.append((torch.cat(extra, dim=1) if len(extra) > 1 else extra[0], plan.extra))
        return self.towers.forward_parts(parts)


#: what the modules' constructors call to initialise their parameters
_INITIALISERS = frozenset({nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_, nn.init.kaiming_normal_,
                           nn.init.xavier_uniform_, nn.init.xavier_normal_, nn.init.trunc_normal_,
                           nn.init.zeros_, nn.init.ones_, nn.init.constant_})


class _SkipInitialisers(TorchFunctionMode):
    """Inside ``torch.device("meta")``: ``torch.nn.init``'s initialisers leave a meta
    tensor as it is. Their values would be thrown away (:func:`init_parameters_` draws
    every parameter), and running them on meta tensors imports torch's dynamo compiler
    (their meta kernels are Python decompositions): ~1.8 s the first time in a process,
    which a federated run needs nowhere else."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            tensor = args[0] if args else kwargs.get("tensor")  # nn.init passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def _materialise(model: nn.Module) -> None:
    """Give ``model``'s meta parameters and buffers uninitialised CPU storage (a parameter
    shared by two modules stays shared). ``model.to_empty(device="cpu")`` does the same,
    but its ``empty_like`` of a meta tensor runs a Python decomposition that imports sympy
    (~1 s the first time in a process)."""
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in new:
                new[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
            setattr(module, name, new[id(p)])
        own = module.state_dict(keep_vars=True)
        for name, b in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, torch.empty(b.shape, dtype=b.dtype), persistent=name in own)


def build_model(
    schema: Schema,
    *,
    variant: Variant = "full",
    embedding_dim: int = 16,
    tower: tuple[int, ...] = (64,),
    user_rows: int | None = None,
    seed: int = 0,
    bag_pooling: BagPooling = "sum",
    share_vocab: bool = True,
    vocab_match: bool = True,
    local_zeros: bool = False,
) -> PCVRModel:
    """Build a freshly initialised :class:`PCVRModel` for ``schema``.

    Parameters
    ----------
    schema : the dataset schema.
    variant : ``"full"`` reads every field; ``"cloud_only"`` reads ``schema.cloud_only()``
        (no PRIVATE fields, hence no ``user_id`` row or bias in our schemas).
    embedding_dim : D, the width of every embedding table.
    tower : hidden sizes ``(h0, h1, ...)``: ``h0`` is the shared bottom layer, the rest
        are each tower's own hidden layers (see :class:`Towers`).
    user_rows : size of the ``user_id`` table and the user bias; ``None`` keeps the
        field's vocabulary size. A phone uses ``1`` together with :func:`remap_user`.
    seed : initialisation seed (a local ``torch.Generator``; the global RNG is untouched).
    bag_pooling : how bag fields' embeddings combine (see :class:`FieldEmbeddings`).
    share_vocab : fields of one vocabulary (schema ``vocab_of``) read one table (see
        :class:`FieldEmbeddings`).
    vocab_match : add :class:`VocabMatch` when a bag shares an ad field's vocabulary.
    local_zeros : the LOCAL tables (the ``user_id`` table, the user bias) start at zero
        in memory the process has not touched (:func:`untouched_zeros`), instead of drawn:
        for a federated server's full-size model, whose user rows only ever hold the
        phones' own (10M users: 720 MB never resident). Every other parameter gets the
        same initial values as without it (the generator still draws the skipped values).

    Raises
    ------
    ValueError : on a bad ``variant``, ``embedding_dim``, ``tower`` or ``user_rows``.
    """
    if variant not in ("full", "cloud_only"):
        raise ValueError(f"model.variant must be 'full' or 'cloud_only'; got {variant!r}")
    if user_rows is not None and user_rows < 1:
        raise ValueError(f"user_rows must be None or an int >= 1; got {user_rows}")
    used = schema.cloud_only() if variant == "cloud_only" else schema
    names = {f.name for f in used.fields}
    has_user = USER_KEY in names
    rows = {USER_KEY: user_rows} if (has_user and user_rows is not None) else {}
    # Built on the meta device: the default initialisers would draw from the global RNG.
    with torch.device("meta"), _SkipInitialisers():
        embeddings = FieldEmbeddings(used.fields, embedding_dim, rows_override=rows,
                                     bag_pooling=bag_pooling, share_vocab=share_vocab)
        interaction = DotInteraction([f.entity for f in embeddings.embedded])
        in_features = embeddings.num_fields * embedding_dim + embeddings.num_scalars
        in_features += interaction.out_features
        towers = Towers(in_features, tower)
        user_bias = None
        if has_user:
            spec = used.field(USER_KEY)
            bias_rows = user_rows if user_rows is not None else spec.vocab_size
            user_bias = nn.Embedding(bias_rows, 2, sparse=is_sparse_group(spec.group))
        pairs = VocabMatch.pairs_of(used.fields) if vocab_match else []
        match = VocabMatch(pairs) if pairs else None
        model = PCVRModel(used, embeddings, interaction, towers, user_bias, match)
    _materialise(model)
    generator = torch.Generator().manual_seed(seed)
    groups = model.parameter_groups()
    local = {id(p) for n, p in model.named_parameters() if local_zeros and groups[n] is ParamGroup.LOCAL}
    init_parameters_(model, generator, zeros=local)
    if model.user_bias is not None and id(model.user_bias.weight) not in local:
        with torch.no_grad():
            model.user_bias.weight.zero_()
    logger.debug("built %s model with %d parameters", variant, sum(p.numel() for p in model.parameters()))
    return model


def remap_user(batch: Batch, row: int = 0) -> Batch:
    """The same batch with every ``user_id`` replaced by ``row`` (a phone's own row).

    A phone's model holds only its user's row (``build_model(..., user_rows=1)``); the
    data it reads still carries the global ``user_id``. Returns a new Batch; ``batch``
    is not modified. A batch without ``user_id`` is returned unchanged.
    """
    if USER_KEY not in batch.ids:
        return batch
    ids = dict(batch.ids)
    ids[USER_KEY] = torch.full_like(ids[USER_KEY], row)
    return dataclasses.replace(batch, ids=ids)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Mächler 2012)."""
    x = x.clamp(max=_LOG_P_MAX)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def esmm_loss(out: Output, batch: Batch, ctcvr_weight: float = 1.0) -> torch.Tensor:
    """ESMM loss: BCE(click, pCTR) + ``ctcvr_weight`` * BCE(click ∧ conversion, pCTCVR).

    The CTR term averages over every row. The CTCVR term averages over rows whose
    conversion label is observed (``batch.label_observed``) and is 0 when there are none.
    pCTCVR's BCE is computed in log space, so it is finite for any finite logits.

    Returns
    -------
    A scalar tensor. It is NaN when the logits are; see :func:`ensure_finite`.
    """
    ctr = F.binary_cross_entropy_with_logits(out.ctr_logit, batch.click)
    nll = ctcvr_nll(out, batch)
    mask = batch.label_observed.to(nll.dtype)
    ctcvr = (nll * mask).sum() / mask.sum().clamp(min=1.0)
    return ctr + ctcvr_weight * ctcvr  # x 1.0 is exact: the default loss's bits are unchanged


def ctcvr_nll(out: Output, batch: Batch) -> torch.Tensor:
    """Each row's BCE(click ∧ conversion, pCTCVR) in log space, float32 [B] (every row;
    :func:`esmm_loss` averages it over the rows whose label is observed)."""
    target = batch.click * batch.conversion
    log_p = out.log_pctcvr
    return -(target * log_p + (1.0 - target) * _log1mexp(log_p))


def embedding_penalty(model: PCVRModel, batch: Batch) -> torch.Tensor:
    """Sum of squared norms of the embedding rows (and user-bias rows) ``batch`` reads.

    Each row counts once per batch however often the batch reads it, so a row's decay
    follows how often it is trained (the usual L2 for sparse embedding tables; an
    optimizer's weight decay would touch every row every step). Gradients stay sparse
    for the sparse tables. Multiply by ``train.embedding_l2`` and add it to the loss.
    """
    total = torch.zeros(())
    for name, param in model.named_parameters():
        ids = model.rows_read(name, batch)
        if ids is None:
            continue
        assert isinstance(ids, torch.Tensor)  # a Batch gives tensors
        rows = torch.unique(ids.to(torch.int64))
        total = total + F.embedding(rows, param, sparse=model.has_sparse_grad(name)).pow(2).sum()
    return total


@dataclasses.dataclass(frozen=True)
class LabelCounts:
    """Label counts of a training set; sums of per-client counts merge with ``+``."""

    impressions: int = 0
    clicks: int = 0
    clicks_observed: int = 0  # clicks whose conversion label is known
    conversions: int = 0  # among those

    @staticmethod
    def of(click: np.ndarray, conversion: np.ndarray, observed: np.ndarray) -> LabelCounts:
        """Counts of label columns (int8 / bool arrays of one length)."""
        click, conversion, observed = (np.asarray(a).astype(bool) for a in (click, conversion, observed))
        seen = click & observed
        return LabelCounts(impressions=len(click), clicks=int(click.sum()), clicks_observed=int(seen.sum()),
                           conversions=int((conversion & seen).sum()))

    @staticmethod
    def of_labels(labels: Mapping[str, np.ndarray]) -> LabelCounts:
        """Counts of an :class:`~adfed.data.examples.Examples`' ``labels``."""
        return LabelCounts.of(labels["click"], labels["conversion"], labels["label_observed"])

    def __add__(self, other: LabelCounts) -> LabelCounts:
        return LabelCounts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other),
                                                    strict=True)))

    @property
    def click_rate(self) -> float:
        return self.clicks / self.impressions if self.impressions else 0.5

    @property
    def conversion_rate(self) -> float:
        """P(conversion | click), over clicks with an observed label."""
        return self.conversions / self.clicks_observed if self.clicks_observed else 0.5


def set_output_priors_(model: PCVRModel, counts: LabelCounts, heads: tuple[str, ...] = ("ctr", "cvr")) -> None:
    """Start the ``heads`` (``model.output_bias``: both, or ``("cvr",)`` / ``("ctr",)``) at
    their base rates, the other's bias left as it is (zero from :func:`build_model`): each
    tower's last bias = logit(rate), and the CVR tower's last weights at zero, so pCVR starts
    at one value on every impression (its base rate when ``"cvr"`` is among the heads).

    With zero biases the model starts at pCTR = pCVR = 0.5 against rates of ~0.03 and
    ~0.1; its first updates then mostly push pCVR down, hardest where pCTR is high, which
    teaches the CVR tower the click signal with the wrong sign (CVR AUC < 0.5 for the
    first rounds of federated training). The random last CVR weights did the same at some
    seeds: with the single hidden layer both heads read the same units, and where their
    draws point apart (seed 0: cosine -0.12) pCVR starts anti-aligned with the click signal
    those units learn; at zero, the first gradients set its direction. The CTR head keeps
    its draw. Rates are clipped to [1e-4, 1 - 1e-4].
    """
    def logit(p: float) -> float:
        p = min(max(p, 1e-4), 1 - 1e-4)
        return math.log(p / (1 - p))

    unknown = set(heads) - {"ctr", "cvr"}
    if unknown or not heads:
        raise ValueError(f"set_output_priors_: heads are 'ctr' and/or 'cvr'; got {heads!r}")
    model.towers.start_heads_(logit(counts.click_rate) if "ctr" in heads else None,
                              logit(counts.conversion_rate) if "cvr" in heads else None)


def ensure_finite(loss: torch.Tensor, *, where: str) -> torch.Tensor:
    """Return ``loss`` unchanged, or raise TrainingError if it is NaN or infinite.

    ``where`` names the step (e.g. ``"client 12, round 3, step 7"``) for the message.
    """
    if not bool(torch.isfinite(loss).all()):
        raise TrainingError(f"loss is {loss.item()} at {where}; lower train.lr or check the data")
    return loss
