"""The client update: a pure function of (global params, the phone's data, settings, seed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from adfed.data.schema import ParamGroup
from adfed.data.store import Dataset
from adfed.fl.client import ClientTask, client_update, needed_rows
from adfed.fl.population import Population
from adfed.fl.rounds import client_settings
from adfed.fl.types import SparseRows
from adfed.model.assembly import model_from_config
from adfed.model.groups import get_dense, group_names


@pytest.fixture
def phone(small_world, fl_config):  # noqa: ANN001, ANN201
    cfg = fl_config(small_world, "fl.local_epochs=2", "fl.local_batch_size=8", "fl.local_lr=0.1",
                    "fl.local_sparse_lr=0.1", "fl.local_table_lr=0.5")
    dataset = Dataset.open(small_world)
    population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    clients = population.clients[np.argsort(-population.num_train(population.clients), kind="stable")[:2]]
    server = model_from_config(cfg, dataset)
    dense = get_dense(server, ParamGroup.DENSE_SHARED)
    tables = get_dense(server, ParamGroup.SPARSE_SHARED)

    def task(scratch, client: int, *, local=None, seed=(0, 1), lr=None):  # noqa: ANN001, ANN202
        data = population.train_data(client)
        rows = {t: SparseRows(i, tables[t][i]) for t, i in needed_rows(scratch, data).items()}
        settings = client_settings(cfg)
        if lr is not None:
            settings = type(settings)(**{**settings.__dict__, "lr": lr, "sparse_lr": lr, "table_lr": lr})
        return ClientTask(client_id=client, version=3, settings=settings, dense=dense, rows=rows,
                          local=local, seed=(*seed, client)), data

    return cfg, dataset, [int(c) for c in clients], task


def _scratch(cfg, dataset):  # noqa: ANN001, ANN202
    return model_from_config(cfg, dataset, user_rows=1)


def test_same_task_same_update_whatever_the_scratch_model_held(phone) -> None:  # noqa: ANN001
    # Prepare: one scratch model that trained another phone first, one fresh
    cfg, dataset, (a, b), task = phone
    used, fresh = _scratch(cfg, dataset), _scratch(cfg, dataset)
    client_update(used, *task(used, b))

    # Execute
    u1, local1 = client_update(used, *task(used, a))
    u2, local2 = client_update(fresh, *task(fresh, a))

    # Assert
    for k in u1.dense:
        assert torch.equal(u1.dense[k], u2.dense[k]), k
    for t in u1.sparse:
        assert torch.equal(u1.sparse[t].values, u2.sparse[t].values), t
    for k in local1:
        assert torch.equal(local1[k], local2[k])


def test_the_update_is_the_trained_delta_and_local_stays_out(phone) -> None:  # noqa: ANN001
    cfg, dataset, (a, _), task = phone
    scratch = _scratch(cfg, dataset)
    t, data = task(scratch, a)

    update, local = client_update(scratch, t, data)

    params = dict(scratch.named_parameters())
    for k, d in update.dense.items():
        assert torch.equal(d, params[k].detach() - t.dense[k]), k
    assert set(local) == set(group_names(scratch, ParamGroup.LOCAL))
    assert not set(local) & (set(update.dense) | set(update.sparse))
    assert update.num_examples == len(data) and update.base_version == 3 and update.client_id == a
    assert any(float(d.abs().max()) > 0 for d in update.dense.values())
    assert np.isfinite(update.metrics["loss"])


def test_the_seed_orders_the_batches_and_local_state_carries_over(phone) -> None:  # noqa: ANN001
    cfg, dataset, (a, _), task = phone
    scratch = _scratch(cfg, dataset)
    first, local = client_update(scratch, *task(scratch, a, seed=(0, 1)))
    other_seed, _ = client_update(scratch, *task(scratch, a, seed=(0, 2)))
    second, _ = client_update(scratch, *task(scratch, a, seed=(0, 1), local=local))

    name = next(iter(first.dense))
    assert not torch.equal(first.dense[name], other_seed.dense[name])  # batches of 8, another order
    assert not torch.equal(first.dense[name], second.dense[name])  # the phone's own rows moved on


def test_zero_learning_rates_send_zero_deltas(phone) -> None:  # noqa: ANN001
    cfg, dataset, (a, _), task = phone
    scratch = _scratch(cfg, dataset)
    update, _ = client_update(scratch, *task(scratch, a, lr=0.0))
    assert all(float(d.abs().max()) == 0 for d in update.dense.values())
    assert all(float(r.values.abs().max()) == 0 for r in update.sparse.values())


def test_the_ctcvr_warm_up_keeps_the_cvr_tower_still(phone) -> None:  # noqa: ANN001
    # Prepare: the settings of round 1 and of round 3 with fl.ctcvr_warmup_rounds = 2
    cfg, dataset, (a, _), task = phone
    scratch = _scratch(cfg, dataset)
    t, data = task(scratch, a)
    warm = dataclasses.replace(cfg, fl=dataclasses.replace(cfg.fl, ctcvr_warmup_rounds=2))
    assert (client_settings(warm, 1).ctcvr_weight, client_settings(warm, 2).ctcvr_weight) == (0.0, 1.0)

    # Execute: the CTR term alone, then the whole loss
    ctr_only, _ = client_update(scratch, dataclasses.replace(t, settings=client_settings(warm, 1)), data)
    whole, _ = client_update(scratch, dataclasses.replace(t, settings=client_settings(warm, 2)), data)

    # Assert: the CVR tower learns nothing from the CTR term; the towers below it do
    cvr = [k for k in whole.dense if k.startswith("towers.cvr.")]
    assert cvr and all(float(ctr_only.dense[k].abs().max()) == 0 for k in cvr)
    assert all(float(whole.dense[k].abs().max()) > 0 for k in cvr)
    assert float(ctr_only.dense["towers.bottom.0.weight"].abs().max()) > 0
