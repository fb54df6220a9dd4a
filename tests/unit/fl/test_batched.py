"""Batched client training equals the per-phone reference (client_update) on every phone."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from adfed.config import Config
from adfed.data.schema import ParamGroup
from adfed.data.store import Dataset
from adfed.fl import batched, strategies
from adfed.fl.backends import InProcessBackend, Job, run_job
from adfed.fl.client import ClientTask, client_update, needed_rows
from adfed.fl.population import Population
from adfed.fl.rounds import client_settings, make_offer
from adfed.fl.simulation import build_engine, initial_server_state
from adfed.fl.types import FlatDense, SparseRows, Update
from adfed.fl.wire import decode_update
from adfed.fl.wirespec import read_header
from adfed.model.assembly import model_from_config
from adfed.model.groups import get_dense, group_names, sparse_tables
from adfed.privacy import setup as privacy_setup
from adfed.trainer import Trainer

TOL = 1e-5


def _phones(cfg: Config, small_world, n: int = 40):  # noqa: ANN001, ANN202
    """A perturbed round model, ``n`` phones' tasks (half with a local state) and their rows."""
    dataset = Dataset.open(small_world)
    population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    model = model_from_config(cfg, dataset, user_rows=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from the initial zeros (CVR head, match weights)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    dense = get_dense(model, ParamGroup.DENSE_SHARED)
    tables = {t: model.get_parameter(t).detach().clone() for t in sparse_tables(model)}
    users = np.random.default_rng(0).choice(population.clients, n, replace=False)
    data, offsets = population.train_data_joined(users)
    settings = client_settings(cfg)
    tasks = []
    for i, u in enumerate(users.tolist()):
        rows = needed_rows(model, data.slice(int(offsets[i]), int(offsets[i + 1])))
        local = None if i % 2 else {n: 0.1 * torch.randn(model.get_parameter(n).shape, generator=g)
                                    for n in group_names(model, ParamGroup.LOCAL)}
        tasks.append(ClientTask(client_id=u, version=0, settings=settings, dense=dense,
                                rows={t: SparseRows(v, tables[t][v]) for t, v in rows.items()},
                                local=local, seed=(0, u), checked=True))
    return dataset, tasks, data, offsets


def _assert_close(a: tuple[Update, dict], b: tuple[Update, dict]) -> None:
    (ua, la), (ub, lb) = a, b
    assert (ua.client_id, ua.num_examples, ua.base_version) == (ub.client_id, ub.num_examples, ub.base_version)
    assert list(ua.dense) == list(ub.dense) and list(ua.sparse) == list(ub.sparse) and list(la) == list(lb)
    for k in ua.dense:
        torch.testing.assert_close(ua.dense[k], ub.dense[k], atol=TOL, rtol=0)
    for k in ua.sparse:
        assert torch.equal(ua.sparse[k].ids, ub.sparse[k].ids)
        torch.testing.assert_close(ua.sparse[k].values, ub.sparse[k].values, atol=TOL, rtol=0)
    for k in la:
        torch.testing.assert_close(la[k], lb[k], atol=TOL, rtol=0)
    assert ua.metrics.keys() == ub.metrics.keys()  # with DP on, the clip's bits instead of the loss
    assert ua.metrics == pytest.approx(ub.metrics, abs=TOL)


@pytest.mark.parametrize("overrides", [
    (),  # the defaults: FedAvg, one full-batch SGD step, table lr 100
    ("fl.local_user_lr=0.2",),  # the phone's own rows at their own lr
    ("train.embedding_l2=0.001",),
    ('fl.strategy="fedprox"', "fl.prox_mu=0.5"),  # the proximal gradient is zero at the first step
    ('model.bag_pooling="mean"', "model.vocab_match=false"),
    ('model.bag_pooling="sqrtn"', "model.tower=[16]"),
])
def test_batched_equals_client_update_on_every_phone(small_world, fl_config, overrides) -> None:  # noqa: ANN001
    # Prepare
    cfg = fl_config(small_world, *overrides)
    dataset, tasks, data, offsets = _phones(cfg, small_world)
    scratch = model_from_config(cfg, dataset, user_rows=1)

    # Execute
    want = [client_update(scratch, t, data.slice(int(a), int(b)))
            for t, a, b in zip(tasks, offsets[:-1], offsets[1:], strict=True)]
    got = batched.client_updates(model_from_config(cfg, dataset, user_rows=1), tasks, data, offsets)

    # Assert: and each phone's dense deltas are one row of one block (its upload's one buffer)
    assert len(got) == len(want)
    for a, b in zip(want, got, strict=True):
        _assert_close(a, b)
    flats = [u.dense.flat for u, _ in got if isinstance(u.dense, FlatDense)]
    assert len(flats) == len(got) and len({f.untyped_storage().data_ptr() for f in flats}) == 1


def test_chunks_give_the_same_updates(small_world, fl_config, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    cfg = fl_config(small_world)
    dataset, tasks, data, offsets = _phones(cfg, small_world, n=20)
    whole = batched.client_updates(model_from_config(cfg, dataset, user_rows=1), tasks, data, offsets)
    monkeypatch.setattr(batched, "CHUNK_PHONES", 6)

    parts = batched.client_updates(model_from_config(cfg, dataset, user_rows=1), tasks, data, offsets)

    for a, b in zip(whole, parts, strict=True):
        _assert_close(a, b)


@pytest.mark.parametrize("width", [64, 307])
def test_per_phone_outer_products_by_mm_and_by_padded_bmm_agree(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    counts = np.array([1, 14, 3, 60, 2, 9, 1, 33])  # heavy-tailed: three buckets
    offsets = np.concatenate([[0], np.cumsum(counts)])
    g, a = torch.randn(int(counts.sum()), 64, generator=gen), torch.randn(int(counts.sum()), width, generator=gen)
    reference = torch.stack([g[lo:hi].T @ a[lo:hi] for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)])
    buckets = batched._buckets(offsets)

    by_mm = batched._segment_outer(g, a, buckets, offsets)
    monkeypatch.setattr(batched, "_MM_PER_PHONE", 10**9)
    by_bmm = batched._segment_outer(g, a, buckets, offsets)

    torch.testing.assert_close(by_mm, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_bmm, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("overrides", "reason"), [
    (('fl.local_optimizer="adam"',), "fl.local_optimizer = 'adam'"),
    (("fl.local_epochs=2",), "fl.local_epochs = 2"),
])
def test_settings_it_cannot_express_are_refused_with_the_reason(small_world, fl_config, overrides,  # noqa: ANN001
                                                                 reason) -> None:
    cfg = fl_config(small_world, *overrides)
    dataset, tasks, data, offsets = _phones(cfg, small_world, n=4)
    scratch = model_from_config(cfg, dataset, user_rows=1)

    assert reason in (batched.unsupported(client_settings(cfg), scratch) or "")
    with pytest.raises(ValueError, match="batched client training cannot run this round"):
        batched.client_updates(scratch, tasks, data, offsets)


def test_a_phone_with_several_steps_is_refused(small_world, fl_config) -> None:  # noqa: ANN001
    cfg = fl_config(small_world, "fl.local_batch_size=2")
    dataset, tasks, data, offsets = _phones(cfg, small_world, n=6)
    assert not all(batched.one_step(int(n), client_settings(cfg)) for n in np.diff(offsets))
    with pytest.raises(ValueError, match="one local step"):
        batched.client_updates(model_from_config(cfg, dataset, user_rows=1), tasks, data, offsets)


def _backend_round(cfg: Config, small_world, n: int = 30):  # noqa: ANN001, ANN202
    dataset = Dataset.open(small_world)
    backend = InProcessBackend(small_world, cfg)
    server_opt = strategies.create(cfg.fl.strategy, cfg.fl.server_lr)
    population = backend.ctx.population
    plan = vocabulary = None
    if cfg.privacy.dp:  # the run's plan and round vocabulary, as fit_federated makes them
        cfg, plan, vocabulary = privacy_setup.setup(cfg, dataset, population)
    state = initial_server_state(cfg, model_from_config(cfg, dataset), server_opt)
    engine = build_engine(cfg, dataset, population, state, backend, server_opt, plan=plan, vocabulary=vocabulary)
    users = np.random.default_rng(1).choice(population.clients, n, replace=False)
    jobs = [Job(client_id=int(u), phone=None, seed=(0, 1, int(u))) for u in users]
    return backend, make_offer(state, engine, 1), jobs


@pytest.mark.parametrize("overrides", [
    (),
    ("fl.local_batch_size=16",),  # the phones with more rows run several steps, one by one
    ('fl.local_optimizer="adam"',),  # all one by one
    ('fl.strategy="fedprox"',),
    ("fl.ctcvr_warmup_rounds=5",),  # round 1 trains the CTR term only
    ("privacy.dp=true",),  # a vocabulary round: phones train on blocks, each update clipped after
    ("privacy.dp=true", 'privacy.clip_mode="per_tensor"', "privacy.adaptive_clip=true",
     "privacy.noise_multiplier=0.1", "privacy.clip_count_noise=5"),
])
def test_in_process_map_batched_equals_one_by_one(small_world, fl_config, overrides,  # noqa: ANN001
                                                  caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: each reason is logged once per process; forget what earlier tests logged
    from adfed.fl import backends as backends_mod

    monkeypatch.setattr(backends_mod, "_LOGGED", set())
    cfg = fl_config(small_world, *overrides)
    backend, offer, jobs = _backend_round(cfg, small_world)

    # Execute
    with caplog.at_level(logging.INFO, logger="adfed.fl.backends"):
        got = backend.map(offer, jobs)
    want = [run_job(backend.ctx, offer, j) for j in jobs]

    # Assert: the same uploads (decoded) within 1e-5, bytes down and local state alike
    assert [r.client_id for r in got] == [j.client_id for j in jobs]
    for a, b in zip(want, got, strict=True):
        assert (a.bytes_down, a.num_examples, a.phone.keys()) == (b.bytes_down, b.num_examples, b.phone.keys())
        ua, ub = decode_update(a.payload, offer.spec)[1], decode_update(b.payload, offer.spec)[1]
        _assert_close((ua, a.phone), (ub, b.phone))
        layout = [{k: (e[0], e[1]) for k, e in read_header(r.payload, offer.spec.max_bytes, "upload")[1].items()}
                  for r in (a, b)]
        assert layout[0] == layout[1], f"client {a.client_id}: only float bits may differ, never the layout"
    if cfg.fl.local_optimizer == "adam":
        assert [r.payload for r in got] == [r.payload for r in want]  # the reference path itself
        assert "clients train one by one: fl.local_optimizer = 'adam'" in caplog.text
    else:
        assert "clients train one by one" not in caplog.text
    if cfg.privacy.dp:  # each upload is a dense block over the round's vocabulary
        assert offer.vocabulary is not None
        for r in got:
            sparse = decode_update(r.payload, offer.spec)[1].sparse
            assert {t: torch.equal(rows.ids, offer.vocabulary[t]) for t, rows in sparse.items()} == \
                dict.fromkeys(offer.vocabulary, True)


def test_a_full_run_ends_at_the_per_phone_model(small_world, fl_config,  # noqa: ANN001
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = fl_config(small_world, "fl.rounds=3")
    batched_run = Trainer(cfg).fit()
    monkeypatch.setattr(InProcessBackend, "batched", False)
    reference = Trainer(cfg).fit()

    a, b = batched_run.model.state_dict(), reference.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=TOL, rtol=0, msg=k)


def test_a_local_setting_it_does_not_know_is_a_reason(small_world, fl_config) -> None:  # noqa: ANN001
    import dataclasses

    from adfed.fl.types import ClientSettings

    @dataclasses.dataclass(frozen=True)
    class Later(ClientSettings):
        noise: float = 0.0

    cfg = fl_config(small_world)
    scratch = model_from_config(cfg, Dataset.open(small_world), user_rows=1)
    s = client_settings(cfg)
    fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    assert batched.unsupported(Later(**fields), scratch) is None
    assert "local setting noise = 0.5 is unknown" in (batched.unsupported(Later(**fields, noise=0.5), scratch) or "")


def test_a_non_finite_loss_raises_as_client_update_does(small_world, fl_config) -> None:  # noqa: ANN001
    # Prepare: a finite round model whose CTR logits overflow to inf on every row
    from adfed.errors import TrainingError

    cfg = fl_config(small_world)
    dataset, tasks, data, offsets = _phones(cfg, small_world, n=4)
    head = "towers.ctr.2"
    dense = dict(tasks[0].dense)
    dense[f"{head}.weight"] = torch.full_like(dense[f"{head}.weight"], 3e38)
    dense[f"{head}.bias"] = torch.full_like(dense[f"{head}.bias"], 3e38)
    tasks = [dataclasses.replace(t, dense=dense) for t in tasks]
    first = data.slice(int(offsets[0]), int(offsets[1]))
    with pytest.raises(TrainingError, match=f"at client {tasks[0].client_id}, version 0, step 0"):
        client_update(model_from_config(cfg, dataset, user_rows=1), tasks[0], first)

    # Execute / Assert: the batched path stops too, naming the same phone and step
    with pytest.raises(TrainingError, match=f"at client {tasks[0].client_id}, version 0, step 0"):
        batched.client_updates(model_from_config(cfg, dataset, user_rows=1), tasks, data, offsets)


def test_in_process_map_is_bitwise_what_the_process_workers_return(small_world, fl_config,  # noqa: ANN001
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the process backend's workers, run here on the same context (one part each)
    from adfed.fl import backends as backends_mod

    cfg = fl_config(small_world)
    assert cfg.fl.workers == 2
    backend, offer, jobs = _backend_round(cfg, small_world, n=100)
    monkeypatch.setattr(backends_mod, "_WORKER", backend.ctx)
    bounds = np.linspace(0, len(jobs), cfg.fl.workers + 1).round().astype(int).tolist()
    first = backend.map(offer, jobs)  # then jobs whose phones hold local state, as returning phones
    jobs = [dataclasses.replace(j, phone=r.phone) for j, r in zip(jobs, first, strict=True)]
    assert all(r.phone and all(isinstance(v, torch.Tensor) for v in r.phone.values()) for r in first)

    # Execute: each part as the process backend sends it to a worker
    got = backend.map(offer, jobs)
    sent = [[(j.client_id, backends_mod._plain(j.phone), j.seed) for j in jobs[a:b]]  # noqa: SLF001
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as _init_worker
    try:
        want = [r for part in sent for r in backends_mod._run_in_worker(offer, part)]  # noqa: SLF001
    finally:
        torch.set_num_threads(threads)

    # Assert: the same bits, whichever backend (a phone's batched update must not depend on
    # which other phones shared its forward pass); and no tensor crosses to or from a worker
    # (torch passes each through a file descriptor of its own: a 1000-phone round's local
    # rows ran a 1M-user run out of descriptors within 8 rounds), arrays only
    assert [r.payload for r in got] == [payload for _, payload, *_ in want]
    for a, (_, _, phone, _, _) in zip(got, want, strict=True):
        back = backends_mod._tensors(phone)  # noqa: SLF001
        assert back is not None and back.keys() == a.phone.keys()
        assert all(torch.equal(a.phone[k], back[k]) for k in a.phone)
    crossing = [v for part in sent for _, phone, _ in part for v in (phone or {}).values()]
    crossing += [v for _, _, phone, _, _ in want for v in (phone or {}).values()]
    assert crossing and all(isinstance(v, np.ndarray) for v in crossing)
