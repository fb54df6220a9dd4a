"""Federated engine end to end on a small synthetic world, with real parts."""

from __future__ import annotations

import dataclasses
import gc

import numpy as np
import pytest
import torch

from adfed.config import Config
from adfed.data.schema import ParamGroup
from adfed.data.store import Dataset
from adfed.errors import ConfigError, DataError
from adfed.fl import pipeline, strategies
from adfed.fl.backends import ClientResult, InProcessBackend, Job, Offer
from adfed.fl.rounds import client_settings
from adfed.fl.server import ServerState
from adfed.fl.simulation import CHECKPOINT, initial_server_state
from adfed.fl.types import Update
from adfed.fl.wire import Envelope, WireSpec, decode_update, encode_model
from adfed.model.groups import group_names, sparse_tables
from adfed.trainer import Trainer, model_from_config


def _offer(cfg: Config, state: ServerState, *, dense: dict[str, torch.Tensor] | None = None,
           spec: WireSpec | None = None, **settings: float) -> Offer:
    """The offer of round ``state.round + 1``, as the server encodes it (tests may swap in
    another dense part, spec or settings)."""
    g = state.model
    dense = g.dense if dense is None else dense
    spec = spec or WireSpec.of(g.dense, g.sparse)
    codec = pipeline.build(cfg).codec
    model = encode_model(dense, Envelope("model", state.round + 1, g.version, codec))
    return Offer(round=state.round + 1, version=g.version,
                 settings=dataclasses.replace(client_settings(cfg, state.round), **settings),
                 model=model, tables=g.sparse, spec=spec)


def _update(res: ClientResult, offer: Offer) -> Update:
    return decode_update(res.payload, offer.spec)[1]


def _final_params(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.named_parameters()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k


def test_sync_run_reports_rounds_and_summary(small_world, fl_config):
    # Prepare
    cfg = fl_config(small_world)
    # Execute
    result = Trainer(cfg).fit()
    # Assert
    s = result.summary
    assert s["mode"] == "federated" and s["rounds"] == 4
    assert 0.0 <= s["auc"] <= 1.0 and 0.6 < s["oracle_auc"] <= 1.0
    assert len(result.rows) == 4
    for row in result.rows:
        assert row["arrived"] >= cfg.window.min_clients
        assert row["arrived"] <= cfg.fl.clients_per_round
        assert row["selected"] >= row["arrived"] + row["failed"]
        assert row["sim_time_s"] > 0 and row["bytes_up"] > 0
    # the full embedding tables are never shipped
    assert s["bytes_up_per_client"] < s["model_bytes"]
    assert s["bytes_up_sparse_per_client"] > 0


def test_rounds_run_with_the_collector_settled_and_leave_it_as_they_found_it(small_world, fl_config, monkeypatch):
    # Prepare: record the freeze count each round sees
    import adfed.fl.simulation as simulation
    seen = []
    real = simulation.run_sync_round
    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(gc.get_freeze_count())
        return real(*args, **kwargs)
    monkeypatch.setattr(simulation, "run_sync_round", spy)
    before = gc.get_freeze_count()

    # Execute
    Trainer(fl_config(small_world)).fit()

    # Assert: what was alive before the rounds is frozen during them, and unfrozen after
    assert len(seen) == 4 and min(seen) > before
    assert gc.get_freeze_count() == before


def test_the_in_process_backend_shares_the_simulations_dataset(small_world, fl_config, monkeypatch):
    # Prepare: the dataset opened once, by the test; count any other opening
    dataset = Dataset.open(small_world)
    opened = []
    real = Dataset.open.__func__
    monkeypatch.setattr(Dataset, "open", classmethod(lambda cls, *a, **k: opened.append(a) or real(cls, *a, **k)))

    # Execute
    Trainer(fl_config(small_world)).fit(dataset)

    # Assert: neither the phones' side nor anything else opened it again
    assert opened == []


def test_every_selected_client_is_counted_once_including_retried_attempts(small_world, fl_config):
    # min_clients = clients_per_round, no over-selection: an attempt with one failed or
    # late client is retried, and its on-time clients are counted as discarded
    cfg = fl_config(small_world, "fl.rounds=3", "window.min_clients=12", "fl.over_selection=1.0")
    result = Trainer(cfg).fit()
    for row in result.rows:
        assert row["selected"] == row["failed"] + row["late"] + row["arrived"] + row["discarded"], row
    assert sum(r["retries"] for r in result.rows) > 0
    assert sum(r["discarded"] for r in result.rows) == result.summary["discarded_clients"] > 0
    assert result.summary["dropped_clients"] == sum(r["failed"] + r["late"] + r["discarded"] for r in result.rows)


def test_a_random_take_aggregates_the_target_and_counts_the_rest_as_surplus(small_world, fl_config):
    # a deadline late enough that more than clients_per_round arrive on time
    sets = ("fl.rounds=3", "window.quantile=1.0", "window.deadline_s=600", "fl.over_selection=1.5")
    first = Trainer(fl_config(small_world, *sets)).fit()
    random = Trainer(fl_config(small_world, *sets, 'window.take="random"')).fit()
    for row in random.rows:
        assert row["selected"] == row["failed"] + row["late"] + row["arrived"] + row["discarded"] + row["surplus"], row
        assert row["arrived"] == 12
    assert sum(r["surplus"] for r in random.rows) > 0 == sum(r["surplus"] for r in first.rows)
    # it waits for the stragglers the first-k round leaves: longer rounds, another model
    assert random.rows[0]["round_sim_s"] > first.rows[0]["round_sim_s"]
    assert random.summary["auc"] != first.summary["auc"]


def test_late_uploads_come_in_the_next_round_and_resume_keeps_them(small_world, fl_config, tmp_path):
    from adfed.fl import checkpoint

    sets = ("fl.rounds=4", "window.deadline_s=0.5", "window.quantile=0.5", 'window.late="next"')
    result = Trainer(fl_config(small_world, *sets)).fit(checkpoint_dir=tmp_path / "a")
    drop = Trainer(fl_config(small_world, *sets[:-1])).fit()
    rows = result.rows
    for row in rows:  # the carried ones are not this round's offers
        assert row["selected"] == row["failed"] + row["late"] + row["arrived"] + row["discarded"], row
    assert rows[0]["carried"] == 0 and sum(r["carried"] for r in rows) > 0
    assert all(r["carried"] <= prev["late"] for prev, r in zip(rows, rows[1:], strict=False))
    assert sum(r["carried"] for r in drop.rows) == 0 and drop.summary["auc"] != result.summary["auc"]
    # the last round's late uploads are part of the server's state: a checkpoint keeps them
    ck = checkpoint.load(tmp_path / "a" / CHECKPOINT)
    assert ck.state.late and ck.state.late == checkpoint.decode(checkpoint.encode(ck), tmp_path).state.late


def test_late_uploads_into_the_next_round_are_refused_with_privacy(small_world, fl_config):
    with pytest.raises(ConfigError, match="window.late"):
        fl_config(small_world, "privacy.dp=true", 'window.late="next"')


def test_over_selection_rounds_the_product_before_its_ceiling(small_world, fl_config):
    from adfed.fl.population import Population
    from adfed.fl.rounds import select

    pop = Population(Dataset.open(small_world), test_fraction=0.2, seed=0)
    pop.profiles.online_prob[:] = 1.0  # every client online: the sample is exactly k
    for cpr, factor, want in ((100, 1.1, 110), (50, 1.1, 55), (12, 1.3, 16), (10, 1.0, 10)):
        cfg = fl_config(small_world, f"fl.clients_per_round={cpr}", f"fl.over_selection={factor}")
        assert len(select(pop, cfg, np.random.default_rng(0))) == want, (cpr, factor)


def test_same_seed_same_model_and_seed_matters(small_world, fl_config):
    a = _final_params(Trainer(fl_config(small_world, "fl.rounds=2")).fit())
    b = _final_params(Trainer(fl_config(small_world, "fl.rounds=2")).fit())
    c = _final_params(Trainer(fl_config(small_world, "fl.rounds=2", "seed=5")).fit())
    _assert_same(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_process_backend_is_bitwise_identical(small_world, fl_config):
    a = _final_params(Trainer(fl_config(small_world, "fl.rounds=2")).fit())
    b = _final_params(Trainer(fl_config(small_world, "fl.rounds=2", 'fl.backend="process"')).fit())
    _assert_same(a, b)


def test_ray_backend_matches(small_world, fl_config):
    pytest.importorskip("ray")
    a = _final_params(Trainer(fl_config(small_world, "fl.rounds=2")).fit())
    b = _final_params(Trainer(fl_config(small_world, "fl.rounds=2", 'fl.backend="ray"')).fit())
    _assert_same(a, b, atol=1e-6)


@pytest.mark.parametrize("overrides", [(), ('fl.strategy="fedadam"', "fl.server_lr=0.01", "fl.server_lr_decay_start=1"),
                                       ("fl.server_ema=0.9",), ('fl.sampling="passes"', "fl.clients_per_round=400")])
def test_resume_continues_to_the_same_result(small_world, fl_config, tmp_path, overrides):
    # FedAdam: its step count and the sparse rows' lazy moments travel in the checkpoint;
    # server_ema: the released average does; passes: the pass, its cursor, the deferred
    full = _final_params(Trainer(fl_config(small_world, *overrides)).fit())
    Trainer(fl_config(small_world, "fl.rounds=2", *overrides)).fit(checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT).exists()
    resumed = Trainer(fl_config(small_world, *overrides)).fit(checkpoint_dir=tmp_path, resume=True)
    assert len(resumed.rows) == 4
    _assert_same(full, _final_params(resumed))


def test_the_checkpoint_is_written_on_its_schedule(small_world, fl_config, tmp_path, monkeypatch):
    # after the first and the last rounds, and between them once fl.checkpoint_every_s has passed
    from adfed.fl import checkpoint

    written: list[int] = []
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda d, ck: (written.append(ck.state.round), real_save(d, ck)))
    for every, expected in (("1e9", [1, 4]), ("0", [1, 2, 3, 4])):
        written.clear()
        Trainer(fl_config(small_world, "fl.rounds=4", f"fl.checkpoint_every_s={every}")).fit(
            checkpoint_dir=tmp_path / every)
        assert written == expected, every
        assert checkpoint.load(tmp_path / every / CHECKPOINT).state.round == 4


def test_ctrl_c_ends_the_run_after_the_round_in_progress_and_checkpoints_it(small_world, fl_config, tmp_path):
    import os
    import signal

    from adfed.fl import checkpoint

    # Prepare: checkpoints only after the first and last rounds; Ctrl-C arrives during round 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    full = _final_params(Trainer(fl_config(small_world, "fl.rounds=4")).fit())

    def ctrl_c(row):
        if row["round"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    # Execute
    with pytest.raises(KeyboardInterrupt):
        Trainer(fl_config(small_world, "fl.rounds=4", "fl.checkpoint_every_s=1e9")).fit(
            checkpoint_dir=tmp_path, on_step=ctrl_c)

    # Assert: round 2 is kept (not round 1, the last scheduled write), Python's handler is
    # back, and the resumed run ends where the uninterrupted one does
    assert checkpoint.load(tmp_path / CHECKPOINT).state.round == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = Trainer(fl_config(small_world, "fl.rounds=4")).fit(checkpoint_dir=tmp_path, resume=True)
    _assert_same(full, _final_params(resumed))


@pytest.mark.parametrize("schedule", ["sync", "async"])
def test_server_ema_releases_an_average_and_trains_the_same(small_world, fl_config, schedule):
    # Prepare
    args = ("fl.rounds=3", f'fl.schedule="{schedule}"', "fl.async_concurrency=4", "fl.async_buffer=2")

    # Execute
    last = Trainer(fl_config(small_world, *args, "fl.server_ema=0")).fit()
    average = Trainer(fl_config(small_world, *args, "fl.server_ema=0.9")).fit()

    # Assert: the phones trained the same models; what was released differs in the shared
    # parameters only (the phones' own rows are theirs either way)
    assert [r["train_loss"] for r in last.rows] == [r["train_loss"] for r in average.rows]
    a, b = _final_params(last), _final_params(average)
    differ = {k for k in a if not torch.equal(a[k], b[k])}
    assert differ and not any(k.startswith(("user_emb", "user_bias")) for k in differ)
    assert average.summary["logloss"] != last.summary["logloss"]  # and it is what was scored


def test_resume_with_another_model_is_a_config_error(small_world, fl_config, tmp_path):
    from adfed.errors import ConfigError

    Trainer(fl_config(small_world, "fl.rounds=2", "model.vocab_match=false")).fit(checkpoint_dir=tmp_path)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(ConfigError, match=r"holds another model \(parameters differ: match.weight\)"):
        Trainer(fl_config(small_world)).fit(checkpoint_dir=tmp_path, resume=True)
    assert (tmp_path / CHECKPOINT).read_bytes() == before  # nothing written over


@pytest.mark.parametrize(("first", "then", "match"), [
    ("fl.strategy=\"fedavg\"", "fl.strategy=\"fedadam\"", r'written with fl\.strategy="fedavg", not "fedadam"'),
    ("seed=0", "seed=3", r"written with seed=0, not 3; resume with --set seed=0"),
    ("privacy.dp=false", "privacy.dp=true", r"written with privacy\.dp=false, not true; resume with --set privacy\.dp=false"),
    ('fl.output_bias_step="average"', 'fl.output_bias_step="adaptive"',
     r'written with fl\.output_bias_step="average", not "adaptive"; resume with --set fl\.output_bias_step="average"'),
])
def test_resume_with_another_strategy_or_seed_is_a_config_error(small_world, fl_config, tmp_path,
                                                                first, then, match):
    from adfed.errors import ConfigError

    Trainer(fl_config(small_world, "fl.rounds=1", first)).fit(checkpoint_dir=tmp_path)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(ConfigError, match=match):
        Trainer(fl_config(small_world, then)).fit(checkpoint_dir=tmp_path, resume=True)
    assert (tmp_path / CHECKPOINT).read_bytes() == before  # nothing written over


def test_resume_on_another_dataset_is_a_config_error(small_world, tiny_world, fl_config, tmp_path):
    from adfed.errors import ConfigError

    Trainer(fl_config(small_world, "fl.rounds=1")).fit(checkpoint_dir=tmp_path)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(ConfigError, match=r"was trained on another dataset than data\.path .*; resume with the "
                                          r"data\.path of that run's config\.toml"):
        Trainer(fl_config(tiny_world, "fl.clients_per_round=20", "window.min_clients=5")).fit(
            checkpoint_dir=tmp_path, resume=True)
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_async_fedbuff_applies_buffers_with_staleness(small_world, fl_config):
    cfg = fl_config(small_world, 'fl.schedule="async"', "fl.async_concurrency=20",
                    "fl.async_buffer=5", "fl.rounds=6")
    result = Trainer(cfg).fit()
    rows = result.rows
    assert len(rows) == 6
    assert all(r["arrived"] == 5 for r in rows)
    times = [r["sim_time_s"] for r in rows]
    assert times == sorted(times)
    assert max(r["mean_staleness"] for r in rows) > 0  # clients trained on older versions
    assert np.isfinite(result.summary["auc"])


@pytest.mark.parametrize("strategy", strategies.names())
def test_every_strategy_runs(small_world, fl_config, strategy):
    lr = 1.0 if strategy in ("fedavg", "fedprox") else 0.01
    result = Trainer(fl_config(small_world, f'fl.strategy="{strategy}"', f"fl.server_lr={lr}",
                               "fl.rounds=2")).fit()
    assert np.isfinite(result.summary["auc"])


def test_uploads_hold_shared_groups_only(small_world, fl_config):
    # Prepare: one client's update, straight from the backend
    cfg = fl_config(small_world)
    ds = Dataset.open(small_world)
    backend = InProcessBackend(small_world, cfg)
    model = model_from_config(cfg, ds)
    state = initial_server_state(cfg, model, strategies.create("fedavg", 1.0))
    client = int(backend.ctx.population.clients[0])
    offer = _offer(cfg, state)
    # Execute
    (res,) = backend.map(offer, [Job(client_id=client, phone=None, seed=(0,))])
    update = _update(res, offer)
    # Assert: LOCAL parameters never leave; sparse rows are exactly the touched ones
    local_names = set(group_names(backend.ctx.scratch, ParamGroup.LOCAL))
    assert local_names and not local_names & set(update.dense)
    assert not local_names & set(update.sparse)
    assert set(res.phone) == local_names  # the identity pipeline keeps no state
    assert all(name.encode() not in res.payload for name in local_names)
    assert update.client_id == client and update.base_version == state.model.version
    data = backend.ctx.population.train_data(client)
    assert update.num_examples == res.num_examples == len(data)
    for table in sparse_tables(backend.ctx.scratch):
        spec = backend.ctx.scratch.table_field(table)
        ids = data.bags[spec.name][0] if spec.is_bag else data.ids[spec.name]
        assert torch.equal(update.sparse[table].ids, torch.from_numpy(np.unique(ids)))


def test_a_round_model_listing_a_local_parameter_is_refused(small_world, fl_config):
    # a server (or an HTTP peer) that sends a LOCAL name among the dense part would get
    # that parameter's trained value back as its "delta": the phone refuses the round
    from adfed.errors import TrainingError

    cfg = fl_config(small_world)
    backend = InProcessBackend(small_world, cfg)
    state = initial_server_state(cfg, model_from_config(cfg, Dataset.open(small_world)),
                                 strategies.create("fedavg", 1.0))
    scratch = backend.ctx.scratch
    local = {n: p.detach().clone() for n, p in scratch.named_parameters() if n == "user_bias.weight"}
    assert local
    dense = {**state.model.dense, **local}
    hostile = _offer(cfg, state, dense=dense, spec=WireSpec.of(dense, state.model.sparse))
    client = int(backend.ctx.population.clients[0])
    with pytest.raises(TrainingError, match=r"lists user_bias\.weight, which are not dense_shared"):
        backend.map(hostile, [Job(client_id=client, phone=None, seed=(0,))])


def test_local_adam_takes_sign_sized_first_steps(small_world, fl_config):
    # Prepare: one local step (one epoch, one batch) with Adam from fresh state
    cfg = fl_config(small_world, 'fl.local_optimizer="adam"', "fl.local_lr=0.001",
                    "fl.local_sparse_lr=0.001", "fl.local_epochs=1", "fl.local_batch_size=100000")
    ds = Dataset.open(small_world)
    backend = InProcessBackend(small_world, cfg)
    state = initial_server_state(cfg, model_from_config(cfg, ds), strategies.create("fedavg", 1.0))
    client = int(backend.ctx.population.clients[0])
    offer = _offer(cfg, state)
    # Execute
    (res,) = backend.map(offer, [Job(client_id=client, phone=None, seed=(0,))])
    update = _update(res, offer)
    # Assert: Adam's first step moves a parameter by lr * g / (|g| + eps), at most lr;
    # plain SGD at lr 0.001 would move most of them by far less (parameters with a zero
    # gradient, such as rows of small tables the batch does not read, stay put)
    moved = torch.cat([d.flatten() for d in update.dense.values()]).abs()
    assert float(moved.max()) <= 0.001 * (1 + 1e-4)
    assert float((moved[moved > 0] > 0.0009).float().mean()) > 0.9
    rows = torch.cat([r.values.flatten() for r in update.sparse.values()]).abs()
    assert float(rows.max()) <= 0.001 * (1 + 1e-4) and float(rows.max()) > 0.0009


def test_local_table_lr_scales_only_the_small_dense_tables(small_world, fl_config):
    # Prepare: the same client's single full-batch SGD step at table lr 1 and 10
    def one_update(table_lr: float):
        cfg = fl_config(small_world, "fl.local_lr=0.1", "fl.local_sparse_lr=0.1",
                        f"fl.local_table_lr={table_lr}", "fl.local_epochs=1",
                        "fl.local_batch_size=100000")
        ds = Dataset.open(small_world)
        backend = InProcessBackend(small_world, cfg)
        state = initial_server_state(cfg, model_from_config(cfg, ds), strategies.create("fedavg", 1.0))
        client = int(backend.ctx.population.clients[0])
        offer = _offer(cfg, state)
        (res,) = backend.map(offer, [Job(client_id=client, phone=None, seed=(0,))])
        return _update(res, offer), backend.ctx.scratch

    # Execute
    (slow, scratch), (fast, _) = one_update(0.1), one_update(1.0)
    # Assert: a first SGD step is lr x gradient, so the dense tables move exactly 10x
    # as far and every other dense parameter and every sparse row the same
    tables = [n for n in slow.dense if scratch.is_dense_table(n)]
    assert tables and len(tables) < len(slow.dense)
    for name, delta in slow.dense.items():
        expected = delta * 10 if name in tables else delta
        assert torch.allclose(fast.dense[name], expected, rtol=1e-4, atol=1e-7), name
    assert any(float(slow.dense[n].abs().max()) > 0 for n in tables)
    for table, rows in slow.sparse.items():
        assert torch.equal(fast.sparse[table].values, rows.values), table


def test_local_user_lr_scales_only_the_phones_own_rows(small_world, fl_config):
    # the same client's single step with its own rows at lr 0.1 and 1 (sparse rows at 0.1)
    def one_step(user_lr: float):
        cfg = fl_config(small_world, "fl.local_lr=0.1", "fl.local_sparse_lr=0.1", f"fl.local_user_lr={user_lr}",
                        "fl.local_batch_size=100000")
        backend = InProcessBackend(small_world, cfg)
        state = initial_server_state(cfg, model_from_config(cfg, Dataset.open(small_world)),
                                     strategies.create("fedavg", 1.0))
        client = int(backend.ctx.population.clients[0])
        offer = _offer(cfg, state)
        (res,) = backend.map(offer, [Job(client_id=client, phone=None, seed=(0,))])
        return _update(res, offer), res.phone

    (slow, slow_rows), (fast, fast_rows) = one_step(0.1), one_step(1.0)
    # the phone's rows start at zero, so they move exactly 10x; what it uploads is the same
    assert slow_rows and slow_rows.keys() == fast_rows.keys()
    for name, row in slow_rows.items():
        assert float(row.abs().max()) > 0 and torch.allclose(fast_rows[name], 10 * row, rtol=1e-5, atol=1e-8), name
    for name, delta in slow.dense.items():
        assert torch.equal(fast.dense[name], delta), name
    for table, rows in slow.sparse.items():
        assert torch.equal(fast.sparse[table].values, rows.values), table


def test_a_non_finite_round_model_is_refused_before_any_client_trains(small_world, fl_config):
    # Prepare: a round model whose dense part holds a NaN (the phone decodes and checks
    # the model payload once per version, not per client)
    cfg = fl_config(small_world)
    backend = InProcessBackend(small_world, cfg)
    state = initial_server_state(cfg, model_from_config(cfg, Dataset.open(small_world)),
                                 strategies.create("fedavg", 1.0))
    name = next(iter(state.model.dense))
    bad = _offer(cfg, state, dense={**state.model.dense,
                                    name: torch.full_like(state.model.dense[name], float("nan"))})
    client = int(backend.ctx.population.clients[0])
    # Execute / Assert
    with pytest.raises(DataError, match=f"model payload.*{name} holds NaN or infinite values"):
        backend.map(bad, [Job(client_id=client, phone=None, seed=(0,))])


def test_local_state_persists_between_rounds(small_world, fl_config):
    cfg = fl_config(small_world, "fl.rounds=3", "fl.clients_per_round=200")
    result = Trainer(cfg).fit()
    assert result.summary["local_state_evictions"] == 0
    user_rows = dict(result.model.named_parameters())[
        group_names(result.model, ParamGroup.LOCAL)[0]]
    assert int((user_rows.abs().sum(dim=1) > 0).sum()) > 0


@pytest.mark.parametrize("setting", ["auto", "zero", "auto_cvr"])
def test_federated_heads_start_at_the_sampled_phones_base_rates(small_world, fl_config, setting):
    import math

    from adfed.fl.population import Population
    from adfed.fl.simulation import prior_sample

    # a server lr of 1e-12 keeps the global model at its initial state, which then shows
    cfg = fl_config(small_world, "fl.rounds=1", "fl.server_lr=1e-12", f'model.output_bias="{setting}"')
    model = Trainer(cfg).fit().model
    ctr_bias = float(model.towers.ctr[-1].bias.detach())
    cvr_bias = float(model.towers.cvr[-1].bias.detach())
    if setting == "zero":
        assert ctr_bias == pytest.approx(0.0, abs=1e-6) and cvr_bias == pytest.approx(0.0, abs=1e-6)
        return
    pop = Population(Dataset.open(small_world), test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    counts = pop.label_counts(prior_sample(pop, cfg.seed))
    assert cvr_bias == pytest.approx(math.log(counts.conversion_rate / (1 - counts.conversion_rate)), abs=1e-6)
    assert float(model.towers.cvr[-1].weight.detach().abs().max()) < 1e-9  # zero, after one step of lr 1e-12
    if setting == "auto_cvr":  # the CTR head's bias stays at its start, zero
        assert ctr_bias == pytest.approx(0.0, abs=1e-6)
        return
    assert ctr_bias == pytest.approx(math.log(counts.click_rate / (1 - counts.click_rate)), abs=1e-6)
    assert ctr_bias < -1.0  # a click rate of a few percent


def _engine(cfg, dataset, population, state, backend):  # noqa: ANN001, ANN202
    from adfed.fl.simulation import build_engine

    return build_engine(cfg, dataset, population, state, backend,
                        strategies.create(cfg.fl.strategy, cfg.fl.server_lr))


def test_a_failing_async_client_frees_its_slot_within_its_own_work(small_world, fl_config):
    from adfed.fl.fedbuff import AsyncState, _lower_bound, dispatch, flush
    from adfed.fl.population import LocalStore, Population

    cfg = fl_config(small_world, 'fl.schedule="async"', "fl.async_concurrency=15")
    dataset = Dataset.open(small_world)
    population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    population.profiles.dropout_prob[:] = 1.0  # every client fails
    backend = InProcessBackend(dataset.path, cfg)
    state = initial_server_state(cfg, model_from_config(cfg, dataset),
                                 strategies.create(cfg.fl.strategy, cfg.fl.server_lr))
    engine = _engine(cfg, dataset, population, state, backend)
    st = dispatch(AsyncState(clock_s=100.0), engine, cfg.fl.async_concurrency)
    assert not st.pending  # drop-outs are drawn at the start: nothing to train
    st = flush(st, state, engine, LocalStore(capacity=10))
    assert len(st.events) == cfg.fl.async_concurrency
    for e in st.events:
        assert e.payload is None  # a failure event
        assert 100.0 <= e.at_s <= _lower_bound(population, engine, 100.0, e.client)


def test_the_async_clock_never_runs_backwards(small_world, fl_config, monkeypatch):
    """A drop-out drawn late (at the flush) could land before the clock; drawn at the
    client's start it cannot."""
    from adfed.fl import fedbuff
    from adfed.fl.fedbuff import AsyncState, run_async_step
    from adfed.fl.population import LocalStore, Population

    popped: list[float] = []
    pop = fedbuff._pop

    def recording_pop(*args):  # noqa: ANN002, ANN202 - the engine's, recording each time the clock moves to
        st, event = pop(*args)
        popped.append(event.at_s)
        return st, event

    monkeypatch.setattr(fedbuff, "_pop", recording_pop)
    cfg = fl_config(small_world, 'fl.schedule="async"', "fl.async_concurrency=20", "fl.async_buffer=5",
                    "fl.rounds=12")
    dataset = Dataset.open(small_world)
    population = Population(dataset, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    population.profiles.dropout_prob[:] = 0.3
    backend = InProcessBackend(dataset.path, cfg)
    state = initial_server_state(cfg, model_from_config(cfg, dataset),
                                 strategies.create(cfg.fl.strategy, cfg.fl.server_lr))
    engine = _engine(cfg, dataset, population, state, backend)
    st, store = AsyncState(), LocalStore(capacity=100)
    failed = 0
    for _ in range(cfg.fl.rounds):
        state, st, row = run_async_step(state, st, engine, store)
        failed += row["failed"]
        assert row["round_sim_s"] >= 0
    assert failed > 0 and len(popped) > 50
    assert all(b >= a for a, b in zip(popped, popped[1:], strict=False))


def test_fl_lr_decay_start_scales_the_phones_lrs_after_start(small_world, fl_config):
    cfg = fl_config(small_world, "fl.lr_decay_start=2", "fl.local_lr=1.5", "fl.local_sparse_lr=0.5",
                    "fl.local_table_lr=40")
    for done, f in ((0, 1.0), (2, 1.0), (4, 0.5), (8, 0.25)):
        s = client_settings(cfg, done)
        assert (s.lr, s.sparse_lr, s.table_lr) == pytest.approx((1.5 * f, 0.5 * f, 40 * f)), done
    assert client_settings(fl_config(small_world, "fl.local_lr=1.5", "fl.lr_decay_start=0"), 1000).lr == 1.5  # 0: constant
    assert client_settings(fl_config(small_world, "fl.local_lr=1.5"), 1000).lr == pytest.approx(1.5 * 200 / 1000)  # default 200
    # wired into the rounds: a start past the last round trains exactly as constant lrs
    constant = _final_params(Trainer(fl_config(small_world, "fl.rounds=3", "fl.lr_decay_start=0")).fit())
    late = _final_params(Trainer(fl_config(small_world, "fl.rounds=3", "fl.lr_decay_start=3")).fit())
    early = _final_params(Trainer(fl_config(small_world, "fl.rounds=3", "fl.lr_decay_start=1")).fit())
    _assert_same(constant, late)
    assert any(not torch.equal(constant[k], early[k]) for k in constant)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_fl_server_lr_decay_start_scales_the_server_step_after_start(small_world, fl_config, strategy):
    # a start past the last round steps exactly as a constant server lr; an early one moves
    # the dense part and the sparse rows less (the sparse rows: server_lr now steps them too)
    lr = "0.5" if strategy == "fedavg" else "0.01"
    base = ("fl.rounds=3", f'fl.strategy="{strategy}"', f"fl.server_lr={lr}", 'fl.server_adaptive_scope="all"')
    constant = _final_params(Trainer(fl_config(small_world, *base)).fit())
    late = _final_params(Trainer(fl_config(small_world, *base, "fl.server_lr_decay_start=3")).fit())
    early = _final_params(Trainer(fl_config(small_world, *base, "fl.server_lr_decay_start=1")).fit())
    _assert_same(constant, late)
    model = model_from_config(fl_config(small_world, *base), Dataset.open(small_world))
    for group in (ParamGroup.DENSE_SHARED, ParamGroup.SPARSE_SHARED):
        names = group_names(model, group)
        assert names and any(not torch.equal(constant[k], early[k]) for k in names), group


def test_a_negative_fl_lr_decay_start_is_a_one_line_config_error():
    from adfed.config import Config, with_overrides
    from adfed.errors import ConfigError

    with pytest.raises(ConfigError, match=r"fl.lr_decay_start must be an int >= 0"):
        with_overrides(Config(), ["fl.lr_decay_start=-3"])


def test_fedprox_anchors_the_sparse_rows_as_well_as_the_dense_part(small_world, fl_config):
    from adfed.fl.backends import WorkerContext, run_job

    cfg = fl_config(small_world, 'fl.strategy="fedprox"', "fl.local_epochs=3", "fl.local_batch_size=4")
    ctx = WorkerContext(str(small_world), cfg)
    state = initial_server_state(cfg, model_from_config(cfg, Dataset.open(small_world)),
                                 strategies.create("fedavg", 1.0))
    clients = ctx.population.clients
    client = int(clients[np.argmax(ctx.population.num_train(clients))])
    norms = {}
    for mu in (0.0, 50.0):  # lr x mu = 0.5: the pull halves the distance each step
        offer = _offer(cfg, state, prox_mu=mu, lr=0.01, table_lr=0.01, sparse_lr=0.01)
        update = _update(run_job(ctx, offer, Job(client_id=client, phone=None, seed=(0, 1, client))), offer)
        assert update.sparse
        norms[mu] = {k: float(r.values.norm()) for k, r in update.sparse.items()}
    for table, free in norms[0.0].items():
        assert norms[50.0][table] < 0.5 * free, table


@pytest.mark.parametrize(("strategy", "mu"), [("fedprox", 0.05), ("fedavg", 0.0), ("fedadam", 0.0)])
def test_only_fedprox_sends_the_phones_a_proximal_term(small_world, fl_config, strategy, mu):
    cfg = fl_config(small_world, f'fl.strategy="{strategy}"', "fl.prox_mu=0.05")
    assert client_settings(cfg).prox_mu == mu
    assert _offer(cfg, initial_server_state(cfg, model_from_config(cfg, Dataset.open(small_world)),
                                            strategies.create(strategy, 1.0))).settings.prox_mu == mu


def test_the_eval_model_gets_every_stored_phones_local_rows_and_zeros_elsewhere(small_world, fl_config):
    from adfed.fl.population import LocalStore
    from adfed.fl.simulation import load_global_inplace

    cfg = fl_config(small_world)
    model = model_from_config(cfg, Dataset.open(small_world))
    state = initial_server_state(cfg, model, strategies.create("fedavg", 1.0))
    local = group_names(model, ParamGroup.LOCAL)
    params = dict(model.named_parameters())
    store = LocalStore(capacity=2)
    for user in (5, 9, 2):  # 5 is evicted by the third
        store.put_inplace(user, {n: torch.full((1, *params[n].shape[1:]), float(user)) for n in local})
    store.packed()  # a checkpoint packed the store before the last change
    store.put_inplace(9, {n: torch.full((1, *params[n].shape[1:]), 90.0) for n in local})

    load_global_inplace(model, state, store)

    params = dict(model.named_parameters())
    for n in local:
        assert torch.all(params[n][9] == 90.0) and torch.all(params[n][2] == 2.0), n
        assert torch.all(params[n][5] == 0.0) and torch.all(params[n][0] == 0.0), n


def test_fl_output_bias_step_average_moves_the_heads_biases_as_the_tables(small_world, fl_config):
    # under the towers' Adam a head's bias moves at most about server_lr a round; stepped as
    # the tables (the phones' mean delta) it moves towards its base rate in a few rounds
    from adfed.fl.simulation import adaptive_names

    base = ("fl.rounds=3", 'model.output_bias="zero"')
    cfg = fl_config(small_world, *base, 'fl.output_bias_step="average"')
    model = model_from_config(cfg, Dataset.open(small_world))
    ctr_bias, cvr_bias = model.towers.output_bias_names("towers")
    stepped = adaptive_names(cfg, model)
    assert stepped is not None and ctr_bias not in stepped and cvr_bias not in stepped
    assert adaptive_names(fl_config(small_world, *base), model) == stepped | {ctr_bias, cvr_bias}
    moved = {}
    for step in ("adaptive", "average"):
        params = _final_params(Trainer(fl_config(small_world, *base, f'fl.output_bias_step="{step}"')).fit())
        moved[step] = abs(float(params[ctr_bias]))  # from zero
    assert moved["adaptive"] <= 3 * 0.01 * 1.01 < 0.1 < moved["average"]


def test_fl_output_bias_step_average_needs_the_towers_scope():
    from adfed.config import Config, with_overrides
    from adfed.errors import ConfigError

    with pytest.raises(ConfigError, match=r"fl.output_bias_step must be \"adaptive\" unless fl.server_adaptive_scope"):
        with_overrides(Config(), ['fl.output_bias_step="average"', 'fl.server_adaptive_scope="all"'])
