"""The experiments runner produces results.json, run directories and a plot."""

from __future__ import annotations

import csv
import json

import pytest

from adfed.config import with_overrides
from adfed.data.schema import ParamGroup
from adfed.data.store import Dataset
from adfed.model.groups import group_names
from adfed.trainer import model_from_config
from experiments import fl_targets, replay


def test_first_reaching_picks_the_first_evaluated_row_at_target():
    rows = [{"round": 1, "sim_time_s": 1.0}, {"round": 2, "auc": 0.6, "sim_time_s": 2.0},
            {"round": 3, "auc": 0.7, "sim_time_s": 3.0}, {"round": 4, "auc": 0.8, "sim_time_s": 4.0}]
    assert fl_targets.first_reaching(rows, 0.7) == {"round": 3, "sim_time_s": 3.0, "auc": 0.7}
    assert fl_targets.first_reaching(rows, 0.9) is None
    rows[2]["auc_expected"] = 0.65
    assert fl_targets.first_reaching(rows, 0.6, "auc_expected") == {"round": 3, "sim_time_s": 3.0, "auc_expected": 0.65}


def test_smoothed_averages_the_last_evaluations_only():
    rows = [{"round": 1, "auc": 0.5}, {"round": 2}, {"round": 3, "auc": 0.7},
            {"round": 4, "auc": 0.9}, {"round": 5, "auc": 0.2}]
    curve = fl_targets.smoothed(rows)
    # full windows only: a first evaluation alone is not a 3-point moving average
    assert [r["round"] for r in curve] == [4, 5]
    assert [r["auc"] for r in curve] == pytest.approx([0.7, 0.6])
    assert [r["auc"] for r in fl_targets.smoothed(rows, 1)] == pytest.approx([0.5, 0.7, 0.9, 0.2])
    assert fl_targets.smoothed(rows[:3]) == []


def test_window_experiment_writes_results(small_world, fl_config, tmp_path):
    cfg = fl_config(small_world, "fl.rounds=2", "fl.clients_per_round=10", "window.min_clients=2")
    results = fl_targets.run("window", cfg, tmp_path)
    saved = json.loads((tmp_path / "window" / "results.json").read_text())
    assert saved["experiment"] == "window"
    assert results["median_round_sim_s_wait_all"] > 0 and results["speedup"] > 0
    for run in ("wait_all", "adaptive"):
        assert (tmp_path / "window" / run / "rounds.csv").exists()
    assert (tmp_path / "window" / "window.png").exists()


def test_fl_vs_central_measures_the_configured_strategy_and_fedavg(small_world, fl_config, tmp_path):
    cfg = fl_config(small_world, "fl.rounds=2", "fl.clients_per_round=10", "window.min_clients=2",
                    'fl.strategy="fedadam"', "fl.server_lr=0.01")
    results = fl_targets.run("fl_vs_central", cfg, tmp_path)
    assert set(results["federated"]) == {"fedadam", "fedavg"}
    assert results["federated"]["fedavg"]["server_lr"] == 1.0
    assert results["target_auc"] == pytest.approx(results["centralized_auc"] - 0.01)
    assert results["target_auc_expected"] == pytest.approx(results["centralized_auc_expected"] - 0.01)
    reached = results["federated"]["fedavg"]["reached_expected"]
    assert reached is None or reached["auc_expected"] >= results["target_auc_expected"]
    for run in ("centralized", "fedadam", "fedavg"):
        assert (tmp_path / "fl_vs_central" / run / "summary.json").exists()
    # one pass is ~3000 users / 10 = ~290 rounds: 2 rounds do not reach it, and say so
    one = results["one_pass"]
    assert one["rounds"] > 200 and one["reached"] is False and one["evaluated_round"] == 2
    assert one["auc_gap"] == pytest.approx(results["centralized_auc"] - one["auc"])
    assert one["auc_expected_gap"] == pytest.approx(results["centralized_auc_expected"] - one["auc_expected"])
    assert one["wall_ratio"] == pytest.approx(one["federated_wall_s"] / one["centralized_train_s"]) and \
        one["wall_ratio"] > 0


def test_experiment_cli_generates_the_world_it_is_asked_for(tmp_path):
    from typer.testing import CliRunner

    from adfed.cli import app

    args = ["experiment", "run", "fl_vs_central", "--users", "400", "--world-seed", "2", "--out", str(tmp_path),
            "--rounds", "2", "--set", "fl.clients_per_round=200", "--set", "window.min_clients=2",
            "--set", "model.tower=[16]", "--set", "fl.eval_every=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "world-400-2" / "manifest.json").exists()
    one = json.loads((tmp_path / "fl_vs_central" / "results.json").read_text())["one_pass"]
    assert one["rounds"] == 2 and one["reached"] is True  # ~390 clients / 200 per round
    both = CliRunner().invoke(app, ["experiment", "run", "fl_vs_central", "--users", "10", "--data", "x"])
    assert both.exit_code == 2 and "either --users or --data" in both.output


def test_unknown_experiment_lists_known_names(small_world, fl_config, tmp_path):
    with pytest.raises(ValueError, match="known: .*fl_vs_central"):
        fl_targets.run("nope", fl_config(small_world), tmp_path)


def test_async_experiment_compares_against_the_smoothed_sync_target(small_world, fl_config, tmp_path):
    cfg = fl_config(small_world, "fl.rounds=3", "fl.clients_per_round=10", "window.min_clients=2",
                    "fl.eval_every=1", "fl.async_buffer=2")
    results = fl_targets.run("async", cfg, tmp_path)
    with open(tmp_path / "async" / "sync" / "rounds.csv") as fh:
        sync_rows = [{"round": int(r["round"]), "auc": float(r["auc"]), "sim_time_s": float(r["sim_time_s"])}
                     for r in csv.DictReader(fh) if r.get("auc")]
    assert results["target_auc"] == pytest.approx(max(r["auc"] for r in fl_targets.smoothed(sync_rows)))
    assert results["sync"] is not None and results["sync"]["sim_time_s"] <= results["sync_sim_time_s"]
    assert results["async_steps"] == 3 * 10 // 2 and results["async_buffer"] == 2
    assert (tmp_path / "async" / "async" / "rounds.csv").exists()
    # the buffer comes from fl.async_buffer (capped at clients_per_round)
    capped = fl_targets.run("async", fl_config(small_world, "fl.rounds=2", "fl.clients_per_round=10",
                                               "window.min_clients=2", "fl.async_buffer=50"), tmp_path / "b")
    assert capped["async_buffer"] == 10 and capped["async_steps"] == 2


def test_ceiling_experiment_scores_oracle_bounds_and_the_model_on_the_same_rows(small_world, fl_config, tmp_path):
    cfg = fl_config(small_world)
    results = fl_targets.run("ceiling", cfg, tmp_path)
    table = results["auc"]
    assert set(table) == {"oracle", "oracle_without_residual", "fields_known_ads_learned", "crosses_learned",
                          "crosses_learned_with_clicks", "centralized"}
    # the trainer scored the same rows: its own summary AUC is the table's
    assert table["centralized"]["auc"] == pytest.approx(results["centralized_summary_auc"], abs=1e-6)
    assert table["oracle"]["gap"] == 0.0
    for row in table.values():
        assert row["low"] <= row["auc"] <= row["high"]
    assert results["test_conversions"] > 0 and results["train_conversions"] > 0
    expected = results["auc_expected"]
    assert set(expected) == set(table)
    # nothing scores the truth's own labels better than the truth
    assert expected["oracle"] == max(expected.values())
    assert (tmp_path / "ceiling" / "ceiling.png").exists()
    assert (tmp_path / "ceiling" / "centralized" / "summary.json").exists()


@pytest.mark.parametrize("name", ["ceiling", "scale"])
def test_truth_experiments_refuse_a_dataset_without_a_generator_world(name, small_world, fl_config, tmp_path):
    import shutil

    from adfed.errors import DataError

    copy = tmp_path / "copy"
    shutil.copytree(small_world, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["generator"] = "import:talkingdata"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"experiment {name} needs a synthetic dataset"):
        fl_targets.run(name, fl_config(copy), tmp_path / "out")


def test_user_batches_hold_each_user_whole_and_once():
    import numpy as np

    from experiments.replay import user_batches

    uid = np.array([3, 3, 5, 7, 7, 7, 9, 11, 11])
    batches = user_batches(uid, 2, np.random.default_rng(0))
    assert [len(set(uid[b])) for b in batches] == [2, 2, 1]
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(uid)))
    for b in batches:
        for u in set(uid[b]):
            assert set(np.flatnonzero(uid == u)) <= set(b.tolist())


def test_replay_experiment_runs_one_pass_with_sgd_and_adam(small_world, fl_config, tmp_path):
    cfg = fl_config(small_world, "fl.clients_per_round=500", "fl.eval_every=3", "fl.local_lr=0.5",
                    "fl.local_table_lr=5.0")
    results = fl_targets.run("replay", cfg, tmp_path)
    assert results["steps"] == 6  # 3,000 users, all with training rows, 500 per step
    # the default strategy is a server Adam: the replay's SGD steps at FedAvg's lr 1
    assert cfg.fl.strategy == "fedadam" and replay.fedavg_server_lr(cfg) == 1.0
    assert results["sgd"]["lr"] == 0.5 * cfg.fl.local_epochs
    assert results["sgd"]["table_lr"] == 5.0 * cfg.fl.local_epochs
    assert results["sgd_one_lr"]["table_lr"] == results["sgd_one_lr"]["lr"] == results["sgd"]["lr"]
    assert results["adam"]["lr"] == cfg.train.lr
    assert results["sgd"]["curve"] != results["sgd_one_lr"]["curve"]  # the tables' lr matters
    for name in ("sgd", "sgd_one_lr", "adam"):
        assert [r["step"] for r in results[name]["curve"]] == [3, 6]
        assert results[name]["best"]["auc_expected"] >= results[name]["final"]["auc_expected"]
    assert results["sgd"]["curve"] != results["adam"]["curve"]
    assert (tmp_path / "replay" / "replay.png").exists()


def test_redrawn_batches_draw_whole_users_again_across_batches():
    import numpy as np

    from experiments.replay import redrawn_batches

    uid = np.repeat(np.arange(6), [2, 1, 3, 1, 2, 1])
    batches = redrawn_batches(uid, 3, 20, np.random.default_rng(0))
    assert len(batches) == 20
    drawn = [sorted(set(uid[b].tolist())) for b in batches]
    assert all(len(d) == 3 for d in drawn)  # distinct users within a batch, each whole
    assert all(len(b) == int(np.isin(uid, d).sum()) for b, d in zip(batches, drawn, strict=True))
    assert len({u for d in drawn for u in d}) == 6 and sum(len(d) for d in drawn) == 60  # users come back


def test_replay_parts_gives_each_part_its_optimizer(small_world, fl_config, tmp_path):
    from experiments.replay import VARIANTS, part_of, part_optimizers

    cfg = fl_config(small_world, "fl.clients_per_round=1000", "fl.eval_every=3", "fl.local_user_lr=0.3")
    model = model_from_config(cfg, Dataset.open(small_world))
    local = set(group_names(model, ParamGroup.LOCAL))
    parts = {part_of(model, n, local) for n, _ in model.named_parameters()}
    assert parts == {"towers", "tables", "rows", "local"}
    opts = part_optimizers(model, cfg, ("towers",))
    kinds = sorted((type(o).__name__, o.param_groups[0]["lr"]) for o in opts)
    assert kinds == sorted([("Adam", cfg.train.lr), ("SGD", cfg.fl.local_table_lr), ("SGD", cfg.fl.local_sparse_lr),
                            ("SGD", 0.3)])

    results = fl_targets.run("replay_parts", cfg, tmp_path)
    assert set(results["curves"]) == {f"{v}/{s}" for v in VARIANTS for s in ("once", "redraw")}
    assert [r["step"] for r in results["curves"]["sgd/once"]["curve"]] == [3]
    assert results["curves"]["sgd/once"]["curve"] != results["curves"]["adam_towers/once"]["curve"]
    assert results["curves"]["sgd/once"]["curve"] != results["curves"]["sgd/redraw"]["curve"]
    assert (tmp_path / "replay_parts" / "replay_parts.png").exists()


def test_crosses_design_lays_out_each_truth_term_as_its_own_block(small_world):
    import numpy as np

    from adfed.data.store import Dataset
    from experiments.ceiling import crosses_design, world_of

    dataset = Dataset.open(small_world)
    world = world_of(dataset)
    examples = dataset.load().slice(0, 500)
    vocab = {f.name: f.vocab_size for f in dataset.schema.fields}
    cats, apps = vocab["ad_category"], world.params.num_app_categories
    x = crosses_design(examples, dataset.schema, world.app_category, apps)
    singles = ("ad_id", "advertiser_id", "creative_type", "region", "hour", "slot", "network")
    cells = vocab["age_bucket"] * vocab["gender"] * cats + vocab["os"] * cats
    crossed = 2 * apps * cats + vocab["intent"] * cats
    assert x.shape == (500, sum(vocab[k] for k in singles) + cells + crossed + 1)
    bag = {k: np.diff(examples.bags[k][1]) for k in ("installed_apps", "app_usage", "intent")}
    # one 1 per single field and per cell; one 1 per installed category and intent; the
    # usage histogram sums to one; the last column is the standardised intent count
    totals = np.asarray(x[:, :-1].sum(axis=1)).ravel()
    np.testing.assert_allclose(totals, len(singles) + 2 + bag["installed_apps"] + 1 + bag["intent"])
    counts = x[:, -1].toarray().ravel()
    assert np.array_equal(np.argsort(counts, kind="stable"), np.argsort(bag["intent"], kind="stable"))
    # row 0's (os, ad category) cell is where the layout says
    first = sum(vocab[k] for k in singles) + vocab["age_bucket"] * vocab["gender"] * cats
    col = first + examples.ids["os"][0] * cats + examples.ids["ad_category"][0]
    assert x[0, col] == 1.0


def test_scale_experiment_trains_each_config_on_the_world_at_each_size(small_world, fl_config, tmp_path):
    from adfed.data.store import Dataset
    from experiments import scale

    assert fl_targets.EXPERIMENTS["scale"] is scale.analyse
    cfg = fl_config(small_world)
    results = scale.analyse(cfg, Dataset.open(small_world), tmp_path / "scale", lambda _: None, scales=(1, 2))
    rows = results["rows"]
    assert [(r["config"], r["users"]) for r in rows] == [
        ("configured", 3000), ("constant_lr", 3000), ("configured", 6000), ("constant_lr", 6000)]
    for r in rows:
        summary = json.loads((tmp_path / "scale" / f"{r['config']}_{r['users']}" / "summary.json").read_text())
        assert summary["mode"] == "centralized" and summary["auc_expected"] == r["auc_expected"]
        assert r["gap_expected"] == pytest.approx(r["oracle_auc_expected"] - r["auc_expected"])
        assert r["steps"] == -(-r["train_examples"] // cfg.train.batch_size)
    # the doubled world holds about twice the rows; the generated copy is removed once trained
    assert 1.5 < rows[2]["train_examples"] / rows[0]["train_examples"] < 2.5
    assert not (tmp_path / "scale" / "worlds" / "users_6000").exists()
    scale.plot(results, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 0
    only = scale.configs(fl_config(small_world, "train.lr_decay_start=0"))
    assert list(only) == ["configured"]
    with pytest.raises(ValueError, match="scales must be ints >= 1"):
        scale.analyse(cfg, Dataset.open(small_world), tmp_path / "bad", lambda _: None, scales=(0,))



def test_scale_experiment_refuses_a_size_that_would_not_fit_in_memory(small_world, fl_config, tmp_path):
    from adfed.data.store import Dataset
    from adfed.errors import DataError
    from experiments import scale

    scale.check_memory(1000, 100, 16, 1000 * 16 * scale.BYTES_PER_ROW)  # exactly fits
    with pytest.raises(DataError, match=r"the world at 16x \(1,600 users, ~0.0M rows\) needs about"):
        scale.check_memory(1000, 100, 16, 1000 * 16 * scale.BYTES_PER_ROW - 1)
    # before anything is generated or trained
    with pytest.raises(DataError, match="run it on a smaller dataset"):
        scale.analyse(fl_config(small_world), Dataset.open(small_world), tmp_path / "big", lambda _: None,
                      scales=(1, 10**9))
    assert not (tmp_path / "big").exists()


def test_a_replay_step_is_one_fedavg_round_of_the_same_users(small_world, fl_config):
    # the claim the replay experiment rests on: with one full-batch local step per phone
    # and server lr 1, a round of the engine and a replay step are the same arithmetic
    import numpy as np
    import torch

    from adfed.data.examples import Examples
    from adfed.data.store import Dataset
    from adfed.fl import server, strategies
    from adfed.fl.backends import InProcessBackend, Job
    from adfed.fl.rounds import make_offer
    from adfed.fl.simulation import build_engine, initial_server_state
    from adfed.fl.wire import decode_update
    from adfed.model.groups import make_optimizers
    from experiments.replay import federated_start, replay_step

    cfg = fl_config(small_world, "fl.local_lr=0.5", "fl.local_sparse_lr=0.7", "fl.local_table_lr=20",
                    "fl.max_weight=12")
    dataset = Dataset.open(small_world)
    backend = InProcessBackend(small_world, cfg)
    population = backend.ctx.population
    users = population.clients[np.argsort(-population.num_train(population.clients), kind="stable")[:3]]
    users = np.sort(np.concatenate([users, population.clients[:12]]))  # some above max_weight
    assert population.num_train(users).max() > 12
    # the engine: one round of these phones, all accepted
    eval_model = federated_start(cfg, dataset)
    server_opt = strategies.create("fedavg", 1.0)
    state = initial_server_state(cfg, eval_model, server_opt)
    engine = build_engine(cfg, dataset, population, state, backend, server_opt)
    offer = make_offer(state, engine, 1)
    results = backend.map(offer, [Job(client_id=int(u), phone=None, seed=(0, int(u))) for u in users])
    updates = [decode_update(r.payload, engine.spec)[1] for r in results]
    weights = server.server_weights([u.num_examples for u in updates], cfg.fl.max_weight)
    after, _ = engine.aggregate(state, updates, weights, 1)
    # the replay: one step on the same users' training rows
    model = federated_start(cfg, dataset)
    fl = cfg.fl
    optimizers = make_optimizers(model, lr=fl.local_lr, dense_opt="sgd", sparse_opt="sgd", table_lr=fl.local_table_lr,
                                 sparse_lr=fl.local_sparse_lr, local_lr=fl.local_user_lr or fl.local_sparse_lr)
    replay_step(model, optimizers, Examples.concat(population.train_data_many(users)), fl.max_weight)
    params = dict(model.named_parameters())
    moved = 0
    for name, value in {**after.model.dense, **after.model.sparse}.items():
        torch.testing.assert_close(params[name].detach(), value, atol=2e-6, rtol=1e-4, msg=name)
        moved += int(not torch.equal(value, {**state.model.dense, **state.model.sparse}[name]))
    assert moved > 10
    for user, res in zip(users, results, strict=True):  # each phone's own rows
        for name, row in res.phone.items():
            torch.testing.assert_close(params[name][int(user)].detach(), row[0], atol=2e-6, rtol=1e-4, msg=name)
    assert any(float(row.abs().max()) > 0 for res in results for row in res.phone.values())


def test_protocol_runs_worlds_and_seeds_and_resumes(fl_config, small_world, tmp_path, monkeypatch):
    from experiments import protocol

    base = fl_config(small_world, "fl.clients_per_round=100", "window.min_clients=3")
    results = protocol.run(base, [(300, 5)], [0, 1], tmp_path / "cand", tmp_path / "worlds")
    assert [(r["world"], r["seed"]) for r in results["rows"]] == [("300-5", 0), ("300-5", 1)]
    for r in results["rows"]:
        assert r["rounds"] == 3 and r["evaluated_round"] == 3  # one pass: ceil(300 / 100)
        assert r["auc_expected_gap"] == pytest.approx(r["centralized_auc_expected"] - r["auc_expected"])
    w = results["worlds"]["300-5"]
    assert w["min_gap"] <= w["mean_gap"] <= w["max_gap"] and w["seeds"] == 2
    assert json.loads((tmp_path / "cand" / "protocol.json").read_text())["worlds"] == results["worlds"]

    # a second call reads what is there instead of training again
    monkeypatch.setattr(protocol, "one", lambda *a, **k: pytest.fail("trained again"))
    assert protocol.run(base, [(300, 5)], [0, 1], tmp_path / "cand", tmp_path / "worlds")["rows"] == results["rows"]


def test_protocol_takes_the_centralized_runs_of_another_candidate(fl_config, small_world, tmp_path, monkeypatch):
    from experiments import protocol

    base = fl_config(small_world, "fl.clients_per_round=100", "window.min_clients=3")
    first = protocol.run(base, [(300, 5)], [0], tmp_path / "defaults", tmp_path / "worlds")
    trained = []
    real = protocol.train_and_write
    monkeypatch.setattr(protocol, "train_and_write",
                        lambda cfg, *a, **k: trained.append(cfg.train.mode) or real(cfg, *a, **k))
    cand = protocol.run(with_overrides(base, ["fl.server_lr=0.5"]), [(300, 5)], [0], tmp_path / "cand",
                        tmp_path / "worlds", central_from=tmp_path / "defaults")
    assert trained == ["federated"]  # the centralized run is the defaults' own
    row, ref = cand["rows"][0], first["rows"][0]
    assert row["centralized_from"] == str(tmp_path / "defaults" / "world-300-5" / "seed-0" / "centralized")
    assert row["centralized_auc_expected"] == ref["centralized_auc_expected"]
    assert row["auc_expected_gap"] == pytest.approx(row["centralized_auc_expected"] - row["auc_expected"])
    assert not (tmp_path / "cand" / "world-300-5" / "seed-0" / "centralized").exists()

    # a centralized setting of its own (or no run to take) trains its own
    trained.clear()
    protocol.run(with_overrides(base, ["train.lr=0.02"]), [(300, 5)], [0], tmp_path / "cand2",
                 tmp_path / "worlds", central_from=tmp_path / "defaults")
    assert trained == ["centralized", "federated"]
    trained.clear()
    protocol.run(base, [(300, 5)], [1], tmp_path / "cand3", tmp_path / "worlds", central_from=tmp_path / "defaults")
    assert trained == ["centralized", "federated"]


def test_protocol_reuses_a_centralized_run_by_the_start_it_made(tmp_path):
    from adfed import config
    from experiments import protocol

    run = tmp_path / "centralized"
    run.mkdir()
    cfg = config.Config()
    (run / "config.toml").write_text(config.dumps(cfg))
    (run / "summary.json").write_text('{"auc_expected": 0.7}')
    # auto_cvr changes only the federated start: centralized training starts as under auto
    assert protocol.reusable_central(with_overrides(cfg, ['model.output_bias="auto_cvr"']), run) == {"auc_expected": 0.7}
    assert protocol.reusable_central(with_overrides(cfg, ['model.output_bias="zero"']), run) == {"auc_expected": 0.7}
    assert protocol.reusable_central(with_overrides(cfg, ['model.output_bias="base_rates"']), run) is None


def test_protocol_seeds_replace_the_stages(tmp_path, monkeypatch):
    from experiments import protocol
    seen = {}
    def fake_run(base, worlds, seeds, out, worlds_dir, progress, central_from=None):  # noqa: ANN001, ANN202
        seen["seeds"], seen["worlds"] = seeds, worlds
        return {"rows": [], "worlds": {}, "mean_gap": None, "target_met": False}
    monkeypatch.setattr(protocol, "run", fake_run)

    assert protocol.main(["--stage", "choice", "--out", str(tmp_path / "o"), "--seeds", "0", "1"]) == 0
    assert seen["seeds"] == (0, 1) and seen["worlds"] == protocol.CHOICE
    assert protocol.main(["--stage", "report", "--out", str(tmp_path / "o")]) == 0
    assert seen["seeds"] == (0, 1, 2)
    assert protocol.main(["--stage", "report2", "--out", str(tmp_path / "o")]) == 0
    assert seen["seeds"] == (0, 1, 2) and seen["worlds"] == protocol.REPORT2
    fresh = {seed for _, seed in protocol.REPORT2}
    assert not fresh & {seed for _, seed in protocol.CHOICE + protocol.REPORT}


def test_protocol_rule_and_target():
    from experiments import protocol

    def summary(*gaps_per_world):
        rows = [{"world": f"w{i}", "auc_expected_gap": g, "auc_gap": g} for i, gaps in enumerate(gaps_per_world)
                for g in gaps]
        return protocol.summarize(rows)

    defaults = summary([0.000, 0.002], [0.030, 0.020])
    assert not defaults["target_met"] and defaults["mean_gap"] == pytest.approx(0.013)
    assert summary([0.009, 0.011], [0.0, 0.0])["target_met"]
    assert not summary([0.002, 0.016], [0.0, 0.0])["target_met"]  # one seed above 0.015
    # wins where the gap is, loses 0.006 where there was none: not adopted
    mixed = protocol.verdict(summary([0.007, 0.007], [0.005, 0.005]), defaults)
    assert mixed["gain"] == pytest.approx(0.007) and set(mixed["worse"]) == {"w0"} and not mixed["adopt"]
    assert protocol.verdict(summary([0.001, 0.003], [0.012, 0.010]), defaults)["by"] == "rule"
    # the tie-break: the same mean, the worst run 0.010 closer (0.020 against 0.030)
    tie = protocol.verdict(summary([0.005, 0.007], [0.020, 0.020]), defaults)
    assert tie["gain"] == pytest.approx(0.0, abs=1e-12) and tie["worst_run"] == pytest.approx(0.020)
    assert tie["adopt"] and tie["by"] == "tie-break"
    # ... but not with a larger mean, nor with a worst run only 0.004 closer
    assert not protocol.verdict(summary([0.006, 0.007], [0.020, 0.020]), defaults)["adopt"]
    assert not protocol.verdict(summary([0.000, 0.002], [0.026, 0.024]), defaults)["adopt"]
    with pytest.raises(ValueError, match="different worlds"):
        protocol.verdict(summary([0.0]), defaults)
