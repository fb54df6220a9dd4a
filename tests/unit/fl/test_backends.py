"""Backends run the phone's side of a round: real bytes down, real bytes up, job order."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adfed.data.store import Dataset
from adfed.fl import strategies
from adfed.fl.backends import InProcessBackend, Job, WorkerContext, create_backend, run_job
from adfed.fl.client import needed_rows
from adfed.fl.population import Population
from adfed.fl.rounds import make_offer
from adfed.fl.simulation import build_engine, initial_server_state
from adfed.fl.types import SparseRows
from adfed.fl.wire import Envelope, decode_update, encode_rows
from adfed.model.assembly import model_from_config


@pytest.fixture
def setup(small_world, fl_config):  # noqa: ANN001, ANN201
    cfg = fl_config(small_world)
    dataset = Dataset.open(small_world)
    backend = InProcessBackend(small_world, cfg)
    state = initial_server_state(cfg, model_from_config(cfg, dataset), strategies.create("fedavg", 1.0))
    population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    engine = build_engine(cfg, dataset, population, state, backend, strategies.create("fedavg", 1.0))
    return cfg, backend, engine, make_offer(state, engine, 1), population


def test_run_job_reports_the_bytes_it_really_moved(setup) -> None:  # noqa: ANN001
    cfg, backend, engine, offer, population = setup
    client = int(population.clients[3])
    ctx: WorkerContext = backend.ctx

    res = run_job(ctx, offer, Job(client_id=client, phone=None, seed=(0, 1, client)))

    # the download: the round's model payload plus this phone's rows, as encoded
    data = population.train_data(client)
    ids = needed_rows(ctx.scratch, data)
    rows = encode_rows({t: SparseRows(i, offer.tables[t][i]) for t, i in ids.items()},
                       Envelope("rows", offer.round, offer.version, "identity", client))
    assert res.bytes_down == len(offer.model) + len(rows)
    envelope, update = decode_update(res.payload, offer.spec)
    assert (envelope.kind, envelope.round, envelope.model_version, envelope.client_id) == ("update", 1, 0, client)
    assert update.num_examples == res.num_examples == len(data)


def test_in_process_map_keeps_job_order_and_equals_one_by_one(setup) -> None:  # noqa: ANN001
    cfg, backend, engine, offer, population = setup
    clients = [int(c) for c in population.clients[[5, 1, 9]]]
    jobs = [Job(client_id=c, phone=None, seed=(0, 1, c)) for c in clients]
    backend.batched = False  # the reference path, bit for bit (batched: tests/unit/fl/test_batched.py)

    results = backend.map(offer, jobs)
    one_by_one = [run_job(backend.ctx, offer, j) for j in jobs]

    assert [r.client_id for r in results] == clients
    assert [r.payload for r in results] == [r.payload for r in one_by_one]
    assert torch.get_num_threads() == 1  # the suite's setting, restored after the round


def test_a_stale_model_payload_is_refused(setup) -> None:  # noqa: ANN001
    from adfed.errors import DataError

    cfg, backend, engine, offer, population = setup
    wrong = dataclasses.replace(offer, round=2)
    with pytest.raises(DataError, match=r"model payload is for round 1 / model 0; the offer is for 2 / 0"):
        backend.map(wrong, [Job(client_id=int(population.clients[0]), phone=None, seed=(0,))])


def test_unknown_backend_lists_the_known(setup) -> None:  # noqa: ANN001
    cfg = setup[0]
    with pytest.raises(ValueError, match=r"fl.backend must be one of \['inprocess', 'process', 'ray'\]"):
        create_backend("gpu", cfg.data.path, cfg)

