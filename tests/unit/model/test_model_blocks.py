"""PCVRModel.forward in blocks equals the reference computation, values and gradients.

The reference is written here from the modules' weights with plain torch ops
(``F.embedding``, ``F.embedding_bag``, explicit dot products, one concatenated input
into ``Towers.forward``), independent of the model's own lookup and pooling code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from adfed.data.examples import Batch, Examples
from adfed.data.schema import USER_KEY, Entity, Schema
from adfed.model import build_model, esmm_loss, make_optimizers
from adfed.model.layers import DotInteraction, Towers, init_parameters_
from adfed.model.pcvr import BLOCK_MIN_ROWS, PCVRModel
from adfed.model.pooling import LOOKUP_MIN_READS, SORTED_MIN_READS

# Large enough for the sorted backward of the joint lookups and of the sparse bag.
BIG = 4096


def _reference_towers(towers: Towers, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The towers from their weights: ReLU(bottom(x)), then each head's linear layers with
    ReLU between them (the architecture ``Towers`` documents), not ``Towers.forward``."""
    bottom = towers.bottom[0]
    assert isinstance(bottom, torch.nn.Linear)
    h = torch.relu(F.linear(x, bottom.weight, bottom.bias))
    logits = []
    for head in (towers.ctr, towers.cvr):
        layers = [m for m in head if isinstance(m, torch.nn.Linear)]
        z = h
        for i, layer in enumerate(layers):
            z = F.linear(z, layer.weight, layer.bias)
            z = torch.relu(z) if i < len(layers) - 1 else z
        logits.append(z.squeeze(1))
    return logits[0], logits[1]


def _reference_logits(model: PCVRModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    emb = model.embeddings
    pooled, scalars = [], []
    for f in emb.embedded:
        weight = dict(emb.named_parameters())[emb.param_name(f.name)]
        if f.is_bag:
            values, offsets = batch.bags[f.name]
            if emb.bag_pooling == "mean":
                pooled.append(F.embedding_bag(values, weight, offsets, mode="mean"))
            else:
                total = F.embedding_bag(values, weight, offsets, mode="sum")
                n = torch.diff(offsets, append=torch.tensor([values.numel()])).float().unsqueeze(1)
                pooled.append(total if emb.bag_pooling == "sum" else total / n.clamp(min=1).sqrt())
        else:
            pooled.append(F.embedding(batch.ids[f.name], weight))
    scalars = [batch.dense[name] for name in emb.dense_names]
    for f in emb.embedded:
        if f.is_bag:
            values, offsets = batch.bags[f.name]
            lengths = torch.diff(offsets, append=torch.tensor([values.numel()]))
            scalars.append(torch.log1p(lengths.float()))
    inter = model.interaction
    dots = [(pooled[o] * pooled[a]).sum(1) for o in inter.other_fields for a in inter.ad_fields]
    x = torch.cat([*pooled, torch.stack(scalars + dots, dim=1)], dim=1)
    ctr, cvr = _reference_towers(model.towers, x)
    if model.user_bias is not None:
        bias = F.embedding(batch.ids[USER_KEY], model.user_bias.weight)
        ctr, cvr = ctr + bias[:, 0], cvr + bias[:, 1]
    return ctr, cvr


def _grads(model: PCVRModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: (g.to_dense() if g.is_sparse else g) for n, g in zip(names, grads, strict=True) if g is not None}


def _assert_matches_reference(model: PCVRModel, batch: Batch) -> None:
    out = model(batch)
    want_ctr, want_cvr = _reference_logits(model, batch)

    torch.testing.assert_close(out.ctr_logit, want_ctr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.cvr_logit, want_cvr, rtol=1e-4, atol=1e-5)
    upstream = torch.randn(2, len(batch), generator=torch.Generator().manual_seed(0))
    got = _grads(model, (out.ctr_logit * upstream[0] + out.cvr_logit * upstream[1]).sum())
    want = _grads(model, (want_ctr * upstream[0] + want_cvr * upstream[1]).sum())
    assert got.keys() == want.keys() == {n for n, _ in model.named_parameters()}
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("rows", [64, BIG])
@pytest.mark.parametrize("variant", ["full", "cloud_only"])
def test_forward_matches_the_reference(
    schema: Schema, make_examples: Callable[..., Examples], rows: int, variant: str
) -> None:
    model = build_model(schema, variant=variant, embedding_dim=8, tower=(16, 8))  # type: ignore[arg-type]
    batch = make_examples(schema, rows).to_batch()
    joint_reads = rows * sum(1 for f in model.embeddings.embedded if f.name in ("age_bucket", "region", "hour"))
    assert rows < BLOCK_MIN_ROWS or joint_reads >= LOOKUP_MIN_READS  # lookup's own backward runs

    _assert_matches_reference(model, batch)


@pytest.mark.parametrize("pooling", ["sum", "mean", "sqrtn"])
def test_every_bag_pooling_matches_the_reference(
    schema: Schema, make_examples: Callable[..., Examples], pooling: str
) -> None:
    model = build_model(schema, embedding_dim=8, tower=(16, 8), bag_pooling=pooling)  # type: ignore[arg-type]
    assert model.embeddings.bag_pooling == pooling
    _assert_matches_reference(model, make_examples(schema, 64).to_batch())


def test_unknown_bag_pooling_is_refused(schema: Schema) -> None:
    with pytest.raises(ValueError, match="model.bag_pooling must be one of"):
        build_model(schema, bag_pooling="max")  # type: ignore[arg-type]


def test_forward_without_interaction_matches_the_reference(
    schema: Schema, make_examples: Callable[..., Examples]
) -> None:
    base = build_model(schema, embedding_dim=8)
    emb = base.embeddings
    no_pairs = DotInteraction([Entity.USER] * emb.num_fields)
    towers = Towers(emb.num_fields * emb.dim + emb.num_scalars, (16,))
    init_parameters_(towers, torch.Generator().manual_seed(0))
    model = PCVRModel(base.schema, emb, no_pairs, towers, base.user_bias)

    _assert_matches_reference(model, make_examples(schema, BIG).to_batch())


def test_sparse_tables_still_get_sparse_gradients(schema: Schema, make_examples: Callable[..., Examples]) -> None:
    model = build_model(schema)
    batch = make_examples(schema, BIG).to_batch()

    esmm_loss(model(batch), batch).backward()

    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.is_sparse == model.has_sparse_grad(name), name


def test_bag_gradient_over_many_ids_needs_no_coalescing(
    schema: Schema, make_examples: Callable[..., Examples]
) -> None:
    model = build_model(schema)
    batch = make_examples(schema, BIG).to_batch()
    values = batch.bags["installed_apps"][0]  # a sparse_shared bag
    assert values.numel() >= SORTED_MIN_READS
    weight = dict(model.named_parameters())[model.table_name("installed_apps")]

    (grad,) = torch.autograd.grad(esmm_loss(model(batch), batch), weight)

    assert grad.is_coalesced() and torch.equal(grad.indices()[0], torch.unique(values))


@pytest.mark.parametrize("rows", [8, BIG])
def test_an_id_beyond_its_own_table_raises(
    schema: Schema, make_examples: Callable[..., Examples], rows: int
) -> None:
    model = build_model(schema)
    batch = make_examples(schema, rows).to_batch()
    region = batch.ids["region"].clone()
    region[-1] = schema.field("region").vocab_size  # in range of the concatenated tables
    bad = dataclasses.replace(batch, ids={**batch.ids, "region": region})

    with pytest.raises(IndexError):
        model(bad)


def test_joint_lookup_error_names_the_field(schema: Schema, make_examples: Callable[..., Examples]) -> None:
    model = build_model(schema)
    batch = make_examples(schema, BLOCK_MIN_ROWS).to_batch()
    hour = batch.ids["hour"].clone()
    hour[3] = -1

    with pytest.raises(IndexError, match=r"hour must lie in \[0, 24\); got \[-1,"):
        model(dataclasses.replace(batch, ids={**batch.ids, "hour": hour}))


def test_forward_parts_equals_forward_on_the_concatenated_input() -> None:
    gen = torch.Generator().manual_seed(0)
    towers = Towers(10, (6, 3))
    init_parameters_(towers, gen)
    x = torch.randn(5, 10, generator=gen)
    order = torch.randperm(10, generator=gen)
    pieces = [order[:4], order[4:9], order[9:]]

    got = towers.forward_parts([(x[:, cols], cols) for cols in pieces])
    want = _reference_towers(towers, x)

    torch.testing.assert_close(got, want)
    torch.testing.assert_close(towers(x), want)


def test_the_bottom_layer_is_rectified() -> None:
    # a bottom unit whose pre-activation is negative for every row contributes nothing
    gen = torch.Generator().manual_seed(1)
    towers = Towers(4, (3,))
    init_parameters_(towers, gen)
    x = torch.rand(6, 4, generator=gen)
    base = towers(x)
    with torch.no_grad():
        towers.bottom[0].bias[1] = -100.0  # unit 1 off on every row
        towers.ctr[-1].weight[0, 1] += 5.0  # so the heads' weights on it no longer matter
        towers.cvr[-1].weight[0, 1] -= 5.0
        off = towers(x)
        towers.ctr[-1].weight[0, 1] -= 5.0
        towers.cvr[-1].weight[0, 1] += 5.0
        assert not torch.allclose(towers(x)[0], base[0])  # unit 1 did contribute before
    torch.testing.assert_close(off, towers(x))


def test_block_training_is_deterministic(schema: Schema, make_examples: Callable[..., Examples]) -> None:
    batches = [make_examples(schema, BIG).to_batch() for _ in range(2)]

    def train() -> dict[str, torch.Tensor]:
        model = build_model(schema, seed=5)
        optimizers = make_optimizers(model, lr=0.01)
        for batch in batches * 2:
            for opt in optimizers:
                opt.zero_grad()
            esmm_loss(model(batch), batch).backward()
            for opt in optimizers:
                opt.step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    first, second = train(), train()

    assert all(torch.equal(first[n], second[n]) for n in first)
