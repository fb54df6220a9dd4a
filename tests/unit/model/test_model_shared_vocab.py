"""Fields of one vocabulary (schema ``vocab_of``) reading one table, and the schema's checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import torch

from adfed.data.examples import Examples
from adfed.data.schema import FieldKind, ParamGroup, Schema, Visibility
from adfed.errors import DataError
from adfed.model import build_model, esmm_loss


@pytest.fixture
def shared_schema(schema: Schema) -> Schema:
    """The toy schema with ``intent`` a bag of ``category`` ids (as in the synthetic world)."""
    base = schema
    fields = tuple(
        dataclasses.replace(f, kind=FieldKind.MULTI_HOT, vocab_size=12, max_len=4, vocab_of="category")
        if f.name == "intent" else f
        for f in base.fields
    )
    return dataclasses.replace(base, fields=fields)


def test_a_field_with_vocab_of_reads_its_owners_table(shared_schema: Schema) -> None:
    schema = shared_schema
    shared, separate = build_model(schema), build_model(schema, share_vocab=False)
    names = {n for n, _ in shared.named_parameters()}

    assert shared.table_name("intent") == shared.table_name("category") == "embeddings.tables.category.weight"
    assert "embeddings.tables.intent.weight" not in names
    assert "embeddings.tables.intent.weight" in {n for n, _ in separate.named_parameters()}
    assert set(shared.parameter_groups()) == names  # still a partition of the parameters
    assert shared.table_field("embeddings.tables.category.weight").name == "category"


def test_the_shared_table_learns_from_both_fields(shared_schema: Schema, make_examples: Callable[..., Examples]) -> None:
    model = build_model(shared_schema)
    ex = make_examples(model.schema, 64, empty_bags=False)
    ex.ids["category"][:] = 0  # the ad side reads row 0 only; intent reads rows 0..11
    batch = ex.to_batch()

    esmm_loss(model(batch), batch).backward()

    grad = dict(model.named_parameters())["embeddings.tables.category.weight"].grad
    assert grad is not None
    intents = set(batch.bags["intent"][0].tolist()) - {0}
    touched = set(torch.nonzero(grad.abs().sum(1)).flatten().tolist())
    assert intents and intents <= touched  # rows only the intent bags read get gradient
    read = model.rows_read("embeddings.tables.category.weight", batch)
    assert isinstance(read, torch.Tensor)
    assert sorted(read.tolist()) == sorted(batch.ids["category"].tolist() + batch.bags["intent"][0].tolist())


def test_cloud_only_drops_the_private_field_and_keeps_the_owner(shared_schema: Schema) -> None:
    cloud = build_model(shared_schema, variant="cloud_only")
    assert "intent" not in {f.name for f in cloud.schema.fields}
    assert "embeddings.tables.category.weight" in {n for n, _ in cloud.named_parameters()}


def test_sparse_tables_are_not_shared(shared_schema: Schema) -> None:
    base = shared_schema
    fields = tuple(dataclasses.replace(f, group=ParamGroup.SPARSE_SHARED) if f.name in ("intent", "category") else f
                   for f in base.fields)
    model = build_model(dataclasses.replace(base, fields=fields))
    assert model.table_name("intent") != model.table_name("category")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"vocab_of": "nope"}, "vocab_of must name another field"),
        ({"vocab_of": "intent"}, "vocab_of must name another field"),
        ({"vocab_size": 13}, "one vocab_size; got 13 and 12"),
    ],
)
def test_schema_rejects_a_bad_vocab_of(shared_schema: Schema, change: dict[str, object], match: str) -> None:
    base = shared_schema
    fields = tuple(dataclasses.replace(f, **change) if f.name == "intent" else f for f in base.fields)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=match):
        dataclasses.replace(base, fields=fields)


def test_vocab_of_survives_the_manifest_round_trip_and_is_cleared_with_its_owner(shared_schema: Schema) -> None:
    schema = shared_schema
    assert Schema.from_dict(schema.to_dict()) == schema
    private_owner = tuple(dataclasses.replace(f, visibility=Visibility.PRIVATE) if f.name == "category" else
                          dataclasses.replace(f, visibility=Visibility.CLOUD) if f.name == "intent" else f
                          for f in schema.fields)
    cloud = dataclasses.replace(schema, fields=private_owner).cloud_only()
    assert cloud.field("intent").vocab_of == ""


def test_vocab_match_counts_bag_ids_equal_to_the_ads(shared_schema: Schema,
                                                     make_examples: Callable[..., Examples]) -> None:
    model = build_model(shared_schema)
    assert model.match is not None and model.match.pairs == [("intent", "category")]
    ex = make_examples(model.schema, 4, empty_bags=False)
    ex.ids["category"][:] = [3, 5, 7, 0]
    ex.bags["intent"] = (np.array([3, 1, 3, 5, 2, 0]), np.array([0, 3, 5, 5, 6]))  # 4 bags: 3 | 2 | - | 1
    batch = ex.to_batch()
    assert model.match.counts(batch)[:, 0].tolist() == [2.0, 1.0, 0.0, 1.0]


def test_vocab_match_adds_count_times_weight_to_each_logit(shared_schema: Schema,
                                                           make_examples: Callable[..., Examples]) -> None:
    model = build_model(shared_schema)
    assert model.match is not None
    assert model.parameter_groups()["match.weight"] is ParamGroup.DENSE_SHARED
    assert torch.count_nonzero(model.match.weight) == 0  # starts as a no-op
    batch = make_examples(model.schema, 64, empty_bags=False).to_batch()
    before = model(batch)
    with torch.no_grad():
        model.match.weight.copy_(torch.tensor([[0.5, -2.0]]))
    after = model(batch)
    counts = model.match.counts(batch)[:, 0]
    assert counts.max() > 0
    torch.testing.assert_close(after.ctr_logit - before.ctr_logit, 0.5 * counts)
    torch.testing.assert_close(after.cvr_logit - before.cvr_logit, -2.0 * counts)


def test_vocab_match_gradient_is_the_formulas(shared_schema: Schema, make_examples: Callable[..., Examples]) -> None:
    """The one-node add_to has the gradient autograd gives ``logits + counts @ weight``."""
    model = build_model(shared_schema)
    assert model.match is not None
    batch = make_examples(model.schema, 64, empty_bags=False).to_batch()
    ctr, cvr = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    up = torch.randn(64, 2)
    out = model.match.add_to(ctr, cvr, batch)
    ((out[0] * up[:, 0]).sum() + (out[1] * up[:, 1]).sum()).backward()
    fast = (ctr.grad.clone(), cvr.grad.clone(), model.match.weight.grad.clone())
    ctr.grad = cvr.grad = model.match.weight.grad = None
    offsets = model.match(batch)
    ((ctr + offsets[:, 0]) * up[:, 0] + (cvr + offsets[:, 1]) * up[:, 1]).sum().backward()
    for a, b in zip(fast, (ctr.grad, cvr.grad, model.match.weight.grad), strict=True):
        torch.testing.assert_close(a, b)
    assert torch.count_nonzero(fast[2]) == 2


def test_vocab_match_is_absent_when_off_or_without_a_shared_vocabulary(shared_schema: Schema, schema: Schema) -> None:
    assert build_model(shared_schema, vocab_match=False).match is None
    assert build_model(shared_schema, variant="cloud_only").match is None  # intent is private
    assert build_model(schema).match is None  # no vocab_of in the plain toy schema
    names = {n for n, _ in build_model(shared_schema, vocab_match=False).named_parameters()}
    assert not any(n.startswith("match.") for n in names)
