"""PCVRModel construction, forward pass, ESMM loss and per-user remapping."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adfed.config import ModelConfig
from adfed.data.examples import Batch, Examples
from adfed.data.schema import Entity, FieldKind, ParamGroup, Schema, Visibility
from adfed.errors import DataError, TrainingError
from adfed.model import (
    Output,
    build_model,
    ensure_finite,
    esmm_loss,
    get_dense,
    make_optimizers,
    remap_user,
    set_dense_inplace,
)
from adfed.model import layers as layers_module


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_one_table_per_embedded_field_with_its_sparsity(schema: Schema) -> None:
    model = build_model(schema, embedding_dim=8)

    for f in schema.fields:
        if f.kind is FieldKind.DENSE:
            continue
        table = dict(model.named_parameters())[model.table_name(f.name)]
        assert tuple(table.shape) == (f.vocab_size, 8)
        assert model.has_sparse_grad(model.table_name(f.name)) == (f.group is not ParamGroup.DENSE_SHARED)
        assert model.table_field(model.table_name(f.name)) == f
    assert model.user_bias is not None and tuple(model.user_bias.weight.shape) == (schema.num_users, 2)


def test_user_rows_resizes_user_table_and_bias(schema: Schema) -> None:
    model = build_model(schema, user_rows=1)

    assert tuple(dict(model.named_parameters())[model.table_name("user_id")].shape) == (1, 16)
    assert model.user_bias is not None and tuple(model.user_bias.weight.shape) == (1, 2)


def test_cloud_only_has_no_private_tables(schema: Schema, make_batch: Callable[..., Batch]) -> None:
    model = build_model(schema, variant="cloud_only")
    batch = make_batch(16)

    private = [f.name for f in schema.fields if f.visibility is Visibility.PRIVATE]
    assert all(f.visibility is Visibility.CLOUD for f in model.schema.fields)
    assert model.user_bias is None
    assert not [n for n in model.parameter_groups() if any(f"tables.{p}." in n for p in private)]
    assert ParamGroup.LOCAL not in set(model.parameter_groups().values())
    out = model(batch)  # the batch still carries private fields; they are ignored
    assert out.ctr_logit.shape == (16,)


def test_same_seed_same_parameters_and_global_rng_untouched(schema: Schema) -> None:
    before = torch.random.get_rng_state()

    a, b, c = build_model(schema, seed=3), build_model(schema, seed=3), build_model(schema, seed=4)

    assert torch.equal(before, torch.random.get_rng_state())
    pa, pb, pc = _params(a), _params(b), _params(c)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not all(torch.equal(pa[n], pc[n]) for n in pa)


def test_building_a_model_imports_neither_dynamo_nor_sympy(modules_loaded_by) -> None:  # noqa: ANN001
    """The default initialisers and ``to_empty`` on meta tensors would (~2 s the first
    time in a process, which a federated run needs nowhere else)."""
    code = ("from adfed.model import build_model\n"
            "from tests.unit.model.conftest import toy_schema\n"
            "build_model(toy_schema(), seed=0)")

    assert modules_loaded_by(code, ("torch._dynamo", "sympy")) == set()


def test_user_bias_starts_at_zero(schema: Schema) -> None:
    model = build_model(schema)

    assert model.user_bias is not None and not model.user_bias.weight.any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "edge"}, "model.variant"),
        ({"embedding_dim": 0}, "model.embedding_dim"),
        ({"tower": ()}, "model.tower"),
        ({"tower": (8, 0)}, "model.tower"),
        ({"user_rows": 0}, "user_rows"),
    ],
)
def test_bad_arguments_are_named(schema: Schema, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(schema, **kwargs)


def test_forward_shapes_and_probabilities(schema: Schema, make_batch: Callable[..., Batch]) -> None:
    model = build_model(schema)
    batch = make_batch(32)

    out = model(batch)

    assert isinstance(out, Output)
    for t in (out.ctr_logit, out.cvr_logit, out.pctr, out.pcvr, out.pctcvr):
        assert t.shape == (32,) and torch.isfinite(t).all()
    assert ((out.pctr > 0) & (out.pctr < 1)).all()
    torch.testing.assert_close(out.pctcvr, out.pctr * out.pcvr)
    torch.testing.assert_close(out.log_pctcvr.exp(), out.pctcvr)
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.ctr_logit = out.cvr_logit  # type: ignore[misc]


def test_empty_bags_pool_to_zeros(schema: Schema, make_batch: Callable[..., Batch]) -> None:
    model = build_model(schema)
    batch = make_batch(8)
    names = [f.name for f in model.embeddings.embedded]
    empty = {k: (v[:0], torch.zeros_like(o)) for k, (v, o) in batch.bags.items()}

    pooled, _ = model.embeddings(dataclasses.replace(batch, bags=empty))

    for name in batch.bags:
        assert not pooled[names.index(name)].any()


def test_missing_field_is_a_data_error(schema: Schema, make_batch: Callable[..., Batch]) -> None:
    model = build_model(schema)
    batch = make_batch(4)
    ids = {k: v for k, v in batch.ids.items() if k != "region"}

    with pytest.raises(DataError, match="region"):
        model(dataclasses.replace(batch, ids=ids))


def test_phone_model_with_remapped_user_matches_the_central_model(
    schema: Schema, make_batch: Callable[..., Batch]
) -> None:
    central = build_model(schema, seed=0)
    with torch.no_grad():
        assert central.user_bias is not None
        central.user_bias.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    phone = build_model(schema, seed=9, user_rows=1)
    user = 7
    batch = make_batch(16)
    batch = dataclasses.replace(batch, ids={**batch.ids, "user_id": torch.full((16,), user)})
    # the phone receives the shared groups and holds its own row of the local group
    shared = get_dense(central, ParamGroup.DENSE_SHARED) | get_dense(central, ParamGroup.SPARSE_SHARED)
    local = {n: t[user : user + 1] for n, t in get_dense(central, ParamGroup.LOCAL).items()}
    set_dense_inplace(phone, shared | local)

    mapped = remap_user(batch)
    want, got = central(batch), phone(mapped)

    assert torch.equal(batch.ids["user_id"], torch.full((16,), user))  # input untouched
    torch.testing.assert_close(got.ctr_logit, want.ctr_logit)
    torch.testing.assert_close(got.cvr_logit, want.cvr_logit)
    with pytest.raises(IndexError):
        phone(batch)  # an unmapped user id is out of the phone's one-row table


def test_remap_user_without_user_field_is_identity(make_batch: Callable[..., Batch]) -> None:
    batch = make_batch(4)
    no_user = dataclasses.replace(batch, ids={k: v for k, v in batch.ids.items() if k != "user_id"})

    assert remap_user(no_user) is no_user


def _naive_esmm(out: Output, batch: Batch) -> torch.Tensor:
    ctr = F.binary_cross_entropy(out.pctr, batch.click)
    obs = batch.label_observed
    if not obs.any():
        return ctr
    target = (batch.click * batch.conversion)[obs]
    return ctr + F.binary_cross_entropy(out.pctcvr[obs], target)


def test_esmm_loss_matches_the_textbook_formula(schema: Schema, make_batch: Callable[..., Batch]) -> None:
    model = build_model(schema)
    batch = make_batch(64)

    out = model(batch)

    torch.testing.assert_close(esmm_loss(out, batch), _naive_esmm(out, batch), rtol=1e-4, atol=1e-5)


def test_ctcvr_term_ignores_unobserved_rows(schema: Schema, make_batch: Callable[..., Batch]) -> None:
    model = build_model(schema)
    batch = make_batch(64)
    out = model(batch)
    flipped = torch.where(batch.label_observed, batch.conversion, 1.0 - batch.conversion)

    loss = esmm_loss(out, batch)
    loss_flipped = esmm_loss(out, dataclasses.replace(batch, conversion=flipped))
    none_observed = esmm_loss(out, dataclasses.replace(batch, label_observed=torch.zeros(64, dtype=torch.bool)))

    torch.testing.assert_close(loss, loss_flipped)
    torch.testing.assert_close(none_observed, F.binary_cross_entropy_with_logits(out.ctr_logit, batch.click))


def test_esmm_loss_is_finite_for_extreme_logits(make_batch: Callable[..., Batch]) -> None:
    batch = make_batch(6)
    logits = torch.tensor([-80.0, -20.0, 0.0, 20.0, 80.0, 1e-4], requires_grad=True)
    out = Output(ctr_logit=logits, cvr_logit=logits.flip(0) * 2)
    batch = dataclasses.replace(
        batch,
        click=torch.tensor([1.0, 0, 1, 1, 0, 1]),
        conversion=torch.tensor([1.0, 0, 0, 1, 0, 0]),
        label_observed=torch.ones(6, dtype=torch.bool),
    )

    loss = esmm_loss(out, batch)
    loss.backward()

    assert torch.isfinite(loss) and logits.grad is not None and torch.isfinite(logits.grad).all()


def test_nan_logits_give_nan_loss_and_ensure_finite_raises(make_batch: Callable[..., Batch]) -> None:
    batch = make_batch(4)
    out = Output(ctr_logit=torch.tensor([0.0, float("nan"), 0.0, 0.0]), cvr_logit=torch.zeros(4))

    loss = esmm_loss(out, batch)

    assert torch.isnan(loss)
    with pytest.raises(TrainingError, match="step 3"):
        ensure_finite(loss, where="step 3")
    assert ensure_finite(torch.tensor(0.5), where="x") == 0.5


def _learnable_batch(ex: Examples, rng: np.random.Generator) -> Batch:
    """Clicks driven by the ad, conversions by user x ad affinity: learnable from ids."""
    n = len(ex)
    ad, user = ex.ids["ad_id"].astype(np.int64), ex.ids["user_id"].astype(np.int64)
    p_click = np.where(ad % 3 == 0, 0.8, 0.1)
    p_cvr = np.where((ad + user) % 2 == 0, 0.9, 0.05)
    click = (rng.random(n) < p_click).astype(np.int8)
    conversion = (click & (rng.random(n) < p_cvr)).astype(np.int8)
    labels = {**ex.labels, "click": click, "conversion": conversion}
    return dataclasses.replace(ex, labels=labels).to_batch()


@pytest.mark.parametrize("dense_opt", ["adam", "sgd"])
def test_loss_decreases_on_a_learnable_toy_problem(
    dense_opt: str, rng: np.random.Generator, toy: Callable[..., Schema], make_examples: Callable[..., Examples]
) -> None:
    schema = toy(num_users=8, num_ads=12)
    model = build_model(schema, embedding_dim=8, tower=(32, 16), seed=1)
    lr = 0.02 if dense_opt == "adam" else 0.2  # sum-pooled bags: larger inputs than mean
    optimizers = make_optimizers(model, lr=lr, dense_opt=dense_opt)  # type: ignore[arg-type]
    batches = [_learnable_batch(make_examples(schema, 512), rng) for _ in range(4)]

    def mean_loss() -> float:
        with torch.no_grad():
            return float(np.mean([esmm_loss(model(b), b).item() for b in batches]))

    start = mean_loss()
    for _ in range(25):
        for b in batches:
            for opt in optimizers:
                opt.zero_grad()
            esmm_loss(model(b), b).backward()
            for opt in optimizers:
                opt.step()
    end = mean_loss()

    assert end < 0.75 * start, (start, end)


def test_interaction_is_the_dot_product_of_each_ad_field_with_each_other_field(
    schema: Schema, make_batch: Callable[..., Batch]
) -> None:
    model = build_model(schema, embedding_dim=4)
    batch = make_batch(8)
    fields = model.embeddings.embedded

    pooled, _ = model.embeddings(batch)
    features = model.interaction(pooled)

    ads = [i for i, f in enumerate(fields) if f.entity is Entity.AD]
    others = [i for i, f in enumerate(fields) if f.entity is not Entity.AD]
    want = torch.stack([(pooled[o] * pooled[a]).sum(1) for o in others for a in ads], dim=1)
    assert features.shape == (8, len(ads) * len(others)) == (8, 3 * 7)
    torch.testing.assert_close(features, want)


def test_scalar_inputs_are_dense_fields_then_log_bag_sizes(
    schema: Schema, make_batch: Callable[..., Batch]
) -> None:
    model = build_model(schema)
    batch = make_batch(8)

    _, scalars = model.embeddings(batch)

    bag_fields = [f.name for f in model.embeddings.embedded if f.is_bag]
    assert len(scalars) == 1 + len(bag_fields) == model.embeddings.num_scalars
    torch.testing.assert_close(scalars[0].squeeze(1), batch.dense["battery"])
    for name, got in zip(bag_fields, scalars[1:], strict=True):
        values, offsets = batch.bags[name]
        lengths = torch.diff(offsets, append=torch.tensor([values.numel()]))
        torch.testing.assert_close(got.squeeze(1), torch.log1p(lengths.float()))


# -- embedding L2 ---------------------------------------------------------------------

def test_embedding_penalty_counts_each_read_row_once_and_keeps_gradients_sparse(
    schema: Schema, make_batch: Callable[..., Batch]
) -> None:
    from adfed.data.schema import USER_KEY
    from adfed.model.pcvr import embedding_penalty

    # Prepare: nonzero user-bias rows, so every table contributes
    model = build_model(schema, seed=0)
    with torch.no_grad():
        model.user_bias.weight.normal_()
    batch = make_batch(64)
    params = dict(model.named_parameters())
    expected = 0.0
    assert model.rows_read("towers.bottom.0.weight", batch) is None
    assert torch.equal(model.rows_read("user_bias.weight", batch), batch.ids[USER_KEY])
    for name, p in params.items():
        ids = model.rows_read(name, batch)
        if ids is not None:
            expected += float(p.detach()[np.unique(ids.numpy())].pow(2).sum())

    # Execute
    penalty = embedding_penalty(model, batch)
    penalty.backward()

    # Assert: the value, and the gradient 2·row on read rows only (sparse where the table is)
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-5)
    for name, p in params.items():
        if not name.startswith("embeddings.tables."):
            continue
        assert p.grad is not None and p.grad.is_sparse == model.has_sparse_grad(name), name
        grad = p.grad.to_dense()
        read = grad.abs().sum(dim=1) > 0
        ids = model.rows_read(name, batch)
        assert set(torch.nonzero(read).flatten().tolist()) <= set(np.unique(ids.numpy()).tolist())
        torch.testing.assert_close(grad[read], 2 * p.detach()[read])


def test_label_counts_count_observed_clicks_and_add_up() -> None:
    from adfed.model.pcvr import LabelCounts

    click = np.array([1, 1, 0, 1, 0, 1], dtype=np.int8)
    conv = np.array([1, 0, 0, 1, 0, 0], dtype=np.int8)
    observed = np.array([True, True, True, False, True, True])
    c = LabelCounts.of(click, conv, observed)
    assert (c.impressions, c.clicks, c.clicks_observed, c.conversions) == (6, 4, 3, 1)
    assert c.click_rate == pytest.approx(4 / 6) and c.conversion_rate == pytest.approx(1 / 3)
    both = c + LabelCounts.of(click[:2], conv[:2], observed[:2])
    assert (both.impressions, both.clicks, both.clicks_observed, both.conversions) == (8, 6, 5, 2)
    assert LabelCounts().click_rate == 0.5 and LabelCounts().conversion_rate == 0.5


def test_output_priors_set_each_heads_last_bias_to_the_logit_of_its_rate(schema: Schema) -> None:
    from adfed.model.pcvr import LabelCounts, set_output_priors_

    model = build_model(schema, tower=(16, 8))
    set_output_priors_(model, LabelCounts(impressions=100, clicks=4, clicks_observed=4, conversions=1))
    assert float(model.towers.ctr[-1].bias.detach()) == pytest.approx(np.log(0.04 / 0.96))
    assert float(model.towers.cvr[-1].bias.detach()) == pytest.approx(np.log(0.25 / 0.75))
    set_output_priors_(model, LabelCounts(impressions=10, clicks=0))  # no clicks: rate 0.5
    assert float(model.towers.cvr[-1].bias.detach()) == pytest.approx(0.0)


def test_output_priors_start_pcvr_at_its_base_rate_on_every_row(schema: Schema,
                                                                make_batch: Callable[..., Batch]) -> None:
    from adfed.model.pcvr import LabelCounts, set_output_priors_

    model = build_model(schema, seed=0)
    ctr_weights = model.towers.ctr[-1].weight.detach().clone()
    set_output_priors_(model, LabelCounts(impressions=100, clicks=4, clicks_observed=4, conversions=1))
    out = model(make_batch(8))
    assert torch.allclose(out.pcvr, torch.full((8,), 0.25))
    assert torch.equal(model.towers.ctr[-1].weight.detach(), ctr_weights)  # the CTR head keeps its draw
    assert out.pctr.std() > 0


def test_output_priors_of_one_head_keep_the_other_heads_drawn_bias(schema: Schema) -> None:
    from adfed.model.pcvr import LabelCounts, set_output_priors_

    counts = LabelCounts(impressions=100, clicks=4, clicks_observed=4, conversions=1)
    model = build_model(schema, tower=(16, 8), seed=0)
    ctr_bias = model.towers.ctr[-1].bias.detach().clone()
    set_output_priors_(model, counts, ("cvr",))
    assert torch.equal(model.towers.ctr[-1].bias.detach(), ctr_bias)
    assert float(model.towers.cvr[-1].bias.detach()) == pytest.approx(np.log(0.25 / 0.75))
    assert not model.towers.cvr[-1].weight.detach().any()
    model = build_model(schema, tower=(16, 8), seed=0)
    cvr_bias = model.towers.cvr[-1].bias.detach().clone()
    set_output_priors_(model, counts, ("ctr",))
    assert float(model.towers.ctr[-1].bias.detach()) == pytest.approx(np.log(0.04 / 0.96))
    assert torch.equal(model.towers.cvr[-1].bias.detach(), cvr_bias)
    assert not model.towers.cvr[-1].weight.detach().any()
    with pytest.raises(ValueError, match="heads"):
        set_output_priors_(model, counts, ("pctr",))


def test_build_model_defaults_are_the_config_defaults() -> None:
    defaults = {k: p.default for k, p in inspect.signature(build_model).parameters.items()}
    cfg = ModelConfig()
    assert (defaults["variant"], defaults["embedding_dim"], defaults["tower"], defaults["bag_pooling"],
            defaults["share_vocab"]) == (cfg.variant, cfg.embedding_dim, cfg.tower, cfg.bag_pooling,
                                         cfg.share_vocab_tables)


@pytest.mark.parametrize("n", [0, 5, 16, 17, 32, 37, 48, 53, 80, 85])
def test_skip_normal_leaves_the_generator_where_one_normal_over_n_values_would(
        n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: chunks of 32, so the chunking and the remainder rules are exercised
    monkeypatch.setattr(layers_module, "_SKIP_CHUNK", 32)
    drawn, skipped = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.empty(n).normal_(0.0, 0.01, generator=drawn)

    # Execute
    layers_module.skip_normal_(skipped, n)

    # Assert: the next values are the same
    assert torch.equal(torch.empty(40).normal_(generator=drawn), torch.empty(40).normal_(generator=skipped))


def test_local_zeros_starts_the_user_rows_at_zero_and_everything_else_as_drawn(schema: Schema) -> None:
    drawn, lazy = build_model(schema, seed=4), build_model(schema, seed=4, local_zeros=True)
    groups = drawn.parameter_groups()
    local = [n for n, g in groups.items() if g is ParamGroup.LOCAL]
    assert local  # the toy schema has a user_id field
    lazy_params = dict(lazy.named_parameters())
    for name, p in drawn.named_parameters():
        if name in local:
            assert not lazy_params[name].any() and lazy_params[name].shape == p.shape
        else:
            assert torch.equal(lazy_params[name], p), name
