"""Config: defaults, TOML round trip, validation messages, ``--set`` overrides."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adfed import config as C
from adfed.config import Config, ConfigError, with_overrides
from adfed.fl import strategies


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


# -- defaults and round trip ---------------------------------------------------------------

def test_defaults_are_valid_and_survive_from_dict() -> None:
    # Prepare
    cfg = Config()

    # Execute
    rebuilt = C.from_dict(C.to_dict(cfg))

    # Assert
    assert rebuilt == cfg
    assert cfg.window.min_deadline_s <= cfg.window.deadline_s <= cfg.window.max_deadline_s


def test_toml_round_trip_of_defaults(tmp_path: Path) -> None:
    # Prepare
    cfg = Config()

    # Execute
    loaded = C.load(_write(tmp_path, C.dumps(cfg)))

    # Assert
    assert loaded == cfg


def test_toml_round_trip_of_varied_config(tmp_path: Path) -> None:
    # Prepare
    cfg = Config(
        seed=11,
        data=C.DataConfig(path="some/dir with space", test_fraction=0.3, max_test_users=7),
        model=C.ModelConfig(variant="cloud_only", embedding_dim=4, tower=(64, 32, 8)),
        train=C.TrainConfig(mode="federated", lr=0.5),
        fl=C.FLConfig(strategy="fedyogi", schedule="async", backend="process", rounds=3),
        window=C.WindowConfig(kind="fixed", deadline_s=12.5),
    )

    # Execute
    loaded = C.load(_write(tmp_path, C.dumps(cfg)))

    # Assert
    assert loaded == cfg
    assert isinstance(loaded.model.tower, tuple)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**40),
    path=st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
    tower=st.lists(st.integers(1, 4096), min_size=1, max_size=4).map(tuple),
    strategy=st.sampled_from(typing.get_args(typing.get_type_hints(C.FLConfig)["strategy"])),
    quantile=st.floats(0.01, 1.0),
    lr=st.floats(1e-8, 10.0),
)
def test_toml_round_trip_property(seed, path, tower, strategy, quantile, lr) -> None:  # noqa: ANN001
    # Prepare
    cfg = Config(
        seed=seed,
        data=C.DataConfig(path=path),
        model=C.ModelConfig(tower=tower),
        train=C.TrainConfig(lr=lr),
        fl=C.FLConfig(strategy=strategy),
        window=C.WindowConfig(quantile=quantile),
    )

    # Execute
    rebuilt = C.from_dict(tomllib.loads(C.dumps(cfg)))

    # Assert
    assert rebuilt == cfg


def test_strategy_choices_match_the_registry() -> None:
    # Prepare
    choices = typing.get_args(typing.get_type_hints(C.FLConfig)["strategy"])

    # Execute
    registered = strategies.names()

    # Assert
    assert sorted(choices) == registered


@pytest.mark.parametrize(("strategy", "server_lr", "used"), [
    ("fedavg", 0.0, 1.0), ("fedprox", 0.0, 1.0), ("fedadam", 0.0, 0.01), ("fedyogi", 0.0, 0.01),
    ("fedadagrad", 0.0, 0.01), ("fedavg", 0.7, 0.7), ("fedadam", 0.03, 0.03)])
def test_server_lr_zero_means_the_strategys_own(strategy: str, server_lr: float, used: float) -> None:
    # Execute
    fl = with_overrides(Config(), [f'fl.strategy="{strategy}"', f"fl.server_lr={server_lr}"]).fl

    # Assert
    assert fl.server_lr_for() == used


def test_fedavg_preset_restores_the_defaults_before_the_server_adam() -> None:
    # Prepare: the preset the studies up to 2026-12-06 ran with
    preset = Path(__file__).parents[2] / "experiments" / "configs" / "fedavg.toml"
    base = with_overrides(Config(), ["fl.rounds=7", "seed=3"])

    # Execute
    cfg = C.with_file(base, preset)

    # Assert: FedAvg at lr 1, uniform draws, constant rates; what the preset leaves out is kept
    fl = cfg.fl
    assert (fl.strategy, fl.server_lr_for(), fl.sampling, fl.server_lr_decay_start) == ("fedavg", 1.0, "uniform", 0)
    assert (fl.local_user_lr, fl.server_adaptive_scope, fl.server_bias_correction) == (0.0, "all", False)
    assert (fl.lr_decay_start, fl.server_ema, cfg.model.output_bias) == (0, 0.0, "auto")
    assert (fl.rounds, cfg.seed, cfg.train) == (7, 3, base.train)
    assert Config().fl.strategy == "fedadam" and Config().fl.sampling == "passes"


def test_towers_adam_preset_restores_the_defaults_before_2026_12_07() -> None:
    # Prepare: the preset the studies of late 2026-12-06 to 2026-12-07 ran with ("T")
    preset = Path(__file__).parents[2] / "experiments" / "configs" / "towers-adam-2026-12-06.toml"

    # Execute
    cfg = C.with_file(Config(), preset)

    # Assert: the server Adam on the towers decayed from round 50, constant phone lrs, the last
    # model released, both heads at their base rates; today's defaults differ in exactly these
    assert (cfg.fl.strategy, cfg.fl.server_adaptive_scope, cfg.fl.sampling) == ("fedadam", "towers", "passes")
    assert (cfg.fl.server_lr_decay_start, cfg.fl.lr_decay_start, cfg.fl.server_ema) == (50, 0, 0.0)
    assert cfg.model.base_rate_heads("federated") == ("ctr", "cvr")
    now = Config()
    assert (now.fl.server_lr_decay_start, now.fl.lr_decay_start, now.fl.server_ema) == (200, 200, 0.99)
    assert now.model.base_rate_heads("federated") == ("cvr",) and now.model.base_rate_heads("centralized") == ()


def test_with_file_names_a_bad_key_of_the_file(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, "[fl]\nstrategy = \"fedsgd\"\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"fl\.strategy must be one of"):
        C.with_file(Config(), path)


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


# -- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[fl]\nroundz = 3\n", r"unknown config key 'fl\.roundz'"),
        ("[fleet]\nrounds = 3\n", r"unknown config key 'fleet'"),
        ("bogus = 1\n", r"unknown config key 'bogus'"),
        ('[train]\nmode = "distributed"\n', r"train\.mode must be one of 'centralized' \| 'federated'; got 'distributed'"),
        ('[fl]\nstrategy = "fedsgd"\n', r"fl\.strategy must be one of .*'fedavg'.*got 'fedsgd'"),
        ('[fl]\nrounds = "5"\n', r"fl\.rounds must be an int; got '5'"),
        ("[fl]\nrounds = 5.0\n", r"fl\.rounds must be an int; got 5\.0"),
        ("[fl]\nrounds = true\n", r"fl\.rounds must be an int; got True"),
        ('[train]\nlr = "fast"\n', r"train\.lr must be a number; got 'fast'"),
        ("[data]\npath = 3\n", r"data\.path must be a string; got 3"),
        ('[model]\ntower = "64,32"\n', r"model\.tower must be a list; got '64,32'"),
        ('[model]\ntower = [64, "x"]\n', r"model\.tower must be an int; got 'x'"),
        ("fl = 3\n", r"fl must be a table; got 3"),
        ("seed = -1\n", r"seed must be an int in \[0, 2\*\*63\); got -1"),
        ("[fl]\nrounds = 0\n", r"fl\.rounds must be an int >= 1; got 0"),
        ("[fl]\nover_selection = 0.5\n", r"fl\.over_selection must be a float >= 1\.0; got 0\.5"),
        ("[fl]\nmax_weight = 0\n", r"fl\.max_weight must be a float > 0; got 0\.0"),
        ("[fl]\nlocal_table_lr = 0\n", r"fl\.local_table_lr must be a float > 0; got 0\.0"),
        ("[fl]\nlocal_cache = -1\n", r"fl\.local_cache must be an int >= 0; got -1"),
        ("[data]\ntest_fraction = 1.0\n", r"data\.test_fraction must be in \(0, 1\); got 1\.0"),
        ("[train]\nlr = -1\n", r"train\.lr must be a float > 0; got -1\.0"),
        ("[train]\nema = 1.0\n", r"train\.ema must be a float in \[0, 1\) \(0 = off\); got 1\.0"),
        ("[fl]\nserver_lr = -0.5\n", r"fl\.server_lr must be a float >= 0 \(0 = the strategy's own\); got -0\.5"),
        ("[fl]\nserver_ema = 1.0\n", r"fl\.server_ema must be a float in \[0, 1\) \(0 = off\), e\.g\. 0\.98; got 1\.0"),
        ("[train]\neval_points = 0\n", r"train\.eval_points must be an int >= 1 \(1 = epoch ends only\); got 0"),
        ("[train]\nuser_lr = -0.1\n", r"train\.user_lr must be a float >= 0 \(0 = train\.sparse_lr\); got -0\.1"),
        ("[model]\ntower = [64, 0]\n", r"model\.tower must be a list of one or more ints >= 1"),
        ("[model]\ntower = []\n", r"model\.tower must be a list of one or more ints >= 1, e\.g\. \[64\]; got \(\)"),
        ("[model]\nembedding_dim = 0\n", r"model\.embedding_dim must be an int >= 1; got 0"),
        ("[window]\nquantile = 1.5\n", r"window\.quantile must be in \(0, 1\]; got 1\.5"),
        ("[window]\nsmoothing = 0\n", r"window\.smoothing must be in \(0, 1\]; got 0\.0"),
        ("[window]\nmin_deadline_s = 700\n", r"window\.min_deadline_s must be > 0 and <= window\.max_deadline_s; got 700\.0"),
        ("[window]\nmin_clients = 0\n", r"window\.min_clients must be an int >= 1; got 0"),
        # a sync round takes at most clients_per_round updates: it would retry forever
        ("[train]\nmode = \"federated\"\n[fl]\nclients_per_round = 5\n",
         r"window\.min_clients must be <= fl\.clients_per_round \(5\): pass --set window\.min_clients=5 or more "
         r"clients a round; got 10"),
    ],
)
def test_bad_toml_raises_config_error_naming_the_key(tmp_path: Path, text: str, match: str) -> None:
    # Prepare
    path = _write(tmp_path, text)

    # Execute / Assert
    with pytest.raises(ConfigError, match=match):
        C.load(path)


def test_a_centralized_run_does_not_check_the_federated_round_size() -> None:
    # --clients-per-round 5 is a federated setting; a centralized run never builds a round
    cfg = with_overrides(Config(), ["fl.clients_per_round=5"])
    assert cfg.train.mode == "centralized" and cfg.window.min_clients == 10
    with pytest.raises(ConfigError, match=r"window\.min_clients must be <= fl\.clients_per_round \(5\)"):
        with_overrides(cfg, ['train.mode="federated"'])


def test_missing_file_raises_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"config file .*nope\.toml not found"):
        C.load(missing)


def test_invalid_toml_raises_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "[fl\nrounds = \n")
    with pytest.raises(ConfigError, match=r"run\.toml is not valid TOML"):
        C.load(path)


def test_min_clients_above_clients_per_round_is_fine_in_async_mode(tmp_path: Path) -> None:
    cfg = C.load(_write(tmp_path, '[fl]\nclients_per_round = 5\nschedule = "async"\n'))
    assert cfg.window.min_clients == 10 and cfg.fl.clients_per_round == 5


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="fl.rounds"):
        C.FLConfig(rounds=0)


# -- overrides -------------------------------------------------------------------------------

def test_override_int() -> None:
    # Prepare
    cfg = Config()

    # Execute
    out = C.with_overrides(cfg, ["fl.rounds=5"])

    # Assert
    assert out.fl.rounds == 5
    assert out == dataclasses.replace(cfg, fl=dataclasses.replace(cfg.fl, rounds=5))
    assert cfg.fl.rounds == 100  # the input is not mutated


def test_override_list_becomes_tuple() -> None:
    out = C.with_overrides(Config(), ["model.tower=[64,32]"])
    assert out.model.tower == (64, 32)


@pytest.mark.parametrize("item", ["train.mode=federated", "train.mode = federated", 'train.mode="federated"'])
def test_override_bare_and_quoted_strings(item: str) -> None:
    out = C.with_overrides(Config(), [item])
    assert out.train.mode == "federated"


def test_override_bare_path_and_top_level_key() -> None:
    # Prepare
    items = ["data.path=/tmp/some dir/x", "seed=9", "train.lr=1"]

    # Execute
    out = C.with_overrides(Config(), items)

    # Assert
    assert out.data.path == "/tmp/some dir/x"
    assert out.seed == 9
    assert out.train.lr == 1.0 and isinstance(out.train.lr, float)


def test_overrides_apply_in_order() -> None:
    out = C.with_overrides(Config(), ["fl.rounds=5", "fl.rounds=7"])
    assert out.fl.rounds == 7


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("fl.rounds", r"--set expects section\.key=value; got 'fl\.rounds'"),
        ("fleet.rounds=3", r"unknown config section 'fleet'"),
        ("fl.rounds.x=3", r"unknown config section 'fl\.rounds'"),
        ("fl.roundz=3", r"unknown config key 'fl\.roundz'"),
        ("fl.rounds=0", r"fl\.rounds must be an int >= 1; got 0"),
        ("fl.rounds=five", r"fl\.rounds must be an int; got 'five'"),
        ("train.mode=distributed", r"train\.mode must be one of"),
        ("fl=3", r"fl must be a table"),
    ],
)
def test_bad_override_raises(item: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        C.with_overrides(Config(), [item])


def test_parse_override_splits_key_path() -> None:
    assert C.parse_override(" window.kind = fixed") == (["window", "kind"], "fixed")
    assert C.parse_override("model.tower=[1, 2]") == (["model", "tower"], [1, 2])
    assert C.parse_override("data.path=a=b") == (["data", "path"], "a=b")


@pytest.mark.parametrize(("setting", "central", "federated"),
                         [("auto", (), ("ctr", "cvr")), ("base_rates", ("ctr", "cvr"), ("ctr", "cvr")),
                          ("zero", (), ()), ("auto_cvr", (), ("cvr",))])
def test_output_bias_setting_per_mode(setting: str, central: tuple[str, ...], federated: tuple[str, ...]) -> None:
    model = with_overrides(Config(), [f'model.output_bias="{setting}"']).model
    assert model.base_rate_heads("centralized") == central
    assert model.base_rate_heads("federated") == federated
    assert model.starts_at_base_rates("centralized") is bool(central)
    assert model.starts_at_base_rates("federated") is bool(federated)


def test_an_error_in_a_config_file_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[fl]\nroundz = 3\n")
    for read in (C.load, lambda p: C.with_file(Config(), p)):
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: unknown config key 'fl\.roundz'"):
            read(path)
