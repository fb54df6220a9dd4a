"""The exported device model scores like the torch model; bad requests are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from adfed.data.schema import Visibility
from adfed.data.store import Dataset
from adfed.model.pcvr import build_model, remap_user
from adfed.rerank import export
from adfed.rerank.requests import (
    RequestError,
    one_request,
    read_requests,
    request_examples,
    user_table,
)


@pytest.fixture(scope="module")
def world(small_world: Path) -> tuple[Dataset, object, object]:
    dataset = Dataset.open(small_world)
    return dataset, read_requests(dataset), user_table(dataset)


def _trained_like(schema, seed: int, *, user_rows: int | None = None):  # noqa: ANN001, ANN202
    """A model with random non-zero weights everywhere (the user bias and the match
    weights too, which start at zero), so that every term of the graph is exercised."""
    model = build_model(schema, embedding_dim=8, tower=(16, 8), user_rows=user_rows, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("pooling", ["sum", "mean", "sqrtn"])
def test_onnx_scores_equal_torch_on_every_candidate(world, pooling: str) -> None:  # noqa: ANN001
    # Prepare: a full-size model (one local row per user) and 12 requests
    dataset, req, users = world
    model = _trained_like(dataset.schema, 3)
    model.embeddings.bag_pooling = pooling
    inputs = export.graph_inputs(model)
    rows = range(0, len(req), max(1, len(req) // 12))
    examples = [request_examples(req.take(np.array([r])), users, dataset.ads) for r in rows]
    local = [export.local_rows(model, int(req.user_id[r])) for r in rows]
    feed0 = export.request_inputs(inputs, examples[0], local=local[0])
    # Execute
    scorer = export.OnnxScorer(export.export_onnx(model, export.available_fields(examples[0]), feed0))
    # Assert: every candidate's pCTR, pCVR and pCTCVR within 1e-5 of the torch model's
    for ex, loc in zip(examples, local, strict=True):
        pctr, pcvr, pctcvr = scorer.score(export.request_inputs(inputs, ex, local=loc))
        with torch.no_grad():
            out = model(ex.to_batch())
        assert np.abs(pctr - out.pctr.numpy()).max() < 1e-5
        assert np.abs(pcvr - out.pcvr.numpy()).max() < 1e-5
        assert np.abs(pctcvr - out.pctcvr.numpy()).max() < 1e-5


def test_phone_model_and_longer_requests(world) -> None:  # noqa: ANN001
    dataset, req, users = world
    phone = _trained_like(dataset.schema, 5, user_rows=1)
    one = req.take(np.array([1]))
    big = dataclasses.replace(one, candidates=np.arange(150)[None, :], bid=np.ones((1, 150), np.float32))
    ex_small, ex_big = (request_examples(r, users, dataset.ads) for r in (one, big))
    inputs = export.graph_inputs(phone)
    local = export.local_rows(phone, 0)
    scorer = export.OnnxScorer(export.export_onnx(phone, export.available_fields(ex_small),
                                                  export.request_inputs(inputs, ex_small, local=local)))
    _, _, got = scorer.score(export.request_inputs(inputs, ex_big, local=local))
    with torch.no_grad():
        want = phone(remap_user(ex_big.to_batch())).pctcvr.numpy()
    assert got.shape == (150,) and np.abs(got - want).max() < 1e-5


def test_export_refuses_a_model_whose_private_fields_the_request_lacks(world) -> None:  # noqa: ANN001
    dataset, req, users = world
    model = _trained_like(dataset.schema, 1)
    ex = request_examples(req.take(np.array([0])), users, dataset.ads)
    private = sorted(f.name for f in dataset.schema.fields if f.visibility is Visibility.PRIVATE and f.name != "user_id")
    lacking = export.available_fields(ex) - {private[0]}
    with pytest.raises(export.ExportError, match=f"private field\\(s\\) {private[0]} that the requests lack"):
        export.export_onnx(model, lacking, {})


def test_scoring_a_request_without_a_field_is_one_line(world) -> None:  # noqa: ANN001
    dataset, req, users = world
    model = _trained_like(dataset.schema, 1)
    ex = request_examples(req.take(np.array([0])), users, dataset.ads)
    ex = dataclasses.replace(ex, bags={k: v for k, v in ex.bags.items() if k != "intent"})
    with pytest.raises(RequestError, match="lacks field 'intent'"):
        export.request_inputs(export.graph_inputs(model), ex, local=export.local_rows(model, 0))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"user_id": 10**6}, r"user_id 1000000 is not a user of the dataset; it must lie in \[0, 3000\)"),
    ({"candidates": [], "bids": []}, "the candidate list is empty"),
    ({"context": {"hour": 3, "slot": 1}}, "the context lacks 'network'"),
    ({"context": {"hour": 99, "slot": 1, "network": 0}}, r"context field hour 99 is out of range"),
    ({"context": "noon"}, "the context must be a mapping"),
    ({"candidates": ["x"], "bids": [1.0]}, "malformed field"),
    ({"candidates": [10**7], "bids": [1.0]}, "ad_id 10000000 is out of range"),
])
def test_bad_requests_get_one_line_errors(world, kwargs: dict, message: str) -> None:  # noqa: ANN001
    dataset = world[0]
    good = {"user_id": 3, "context": {"hour": 3, "slot": 1, "network": 0}, "candidates": [1, 2], "bids": [1.0, 2.0]}
    with pytest.raises(RequestError, match=message) as err:
        one_request(dataset.schema, **{**good, **kwargs})
    assert "\n" not in str(err.value)
    assert len(one_request(dataset.schema, **good)) == 1
