"""Server optimizers: a contract suite over every registered strategy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adfed.fl import strategies
from adfed.fl.strategies import ServerAdaptive, ServerSGD
from adfed.fl.types import SparseRows, Update

ALL = strategies.names()


def _params(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    return {
        "tower.0.weight": torch.from_numpy(rng.normal(size=(4, 3)).astype(np.float32)),
        "tower.0.bias": torch.from_numpy(rng.normal(size=4).astype(np.float32)),
        "emb.age.weight": torch.from_numpy(rng.normal(size=(5, 2)).astype(np.float32)),
    }


def _update(n: int, dense: dict[str, torch.Tensor] | None = None, client_id: int = 0) -> Update:
    return Update(client_id=client_id, dense=dense or {}, sparse={}, num_examples=n, base_version=0)


# -- contract suite over every registered strategy ------------------------------------------

def test_registry_holds_the_documented_strategies() -> None:
    assert ALL == ["fedadagrad", "fedadam", "fedavg", "fedprox", "fedyogi"]


@pytest.mark.parametrize("name", ALL)
def test_init_and_apply_keep_names_shapes_dtypes(name: str, rng: np.random.Generator) -> None:
    # Prepare
    opt = strategies.create(name, 0.5)
    params = _params(rng)
    delta = {k: torch.from_numpy(rng.normal(size=v.shape).astype(np.float32)) for k, v in params.items()}
    state = opt.init(params)

    # Execute
    new_params, new_state = opt.apply(params, delta, state)

    # Assert
    assert new_params.keys() == params.keys()
    for k, v in params.items():
        assert new_params[k].shape == v.shape and new_params[k].dtype == v.dtype
        assert torch.isfinite(new_params[k]).all()
        assert not torch.equal(new_params[k], v)  # a non-zero delta moves every tensor
    assert new_state.keys() == state.keys()


@pytest.mark.parametrize("name", ALL)
def test_apply_does_not_mutate_its_inputs(name: str, rng: np.random.Generator) -> None:
    # Prepare
    opt = strategies.create(name, 1.0)
    params = _params(rng)
    delta = {k: torch.ones_like(v) for k, v in params.items()}
    state = opt.init(params)
    before = ({k: v.clone() for k, v in params.items()},
              {k: v.clone() for k, v in delta.items()},
              {s: {k: v.clone() for k, v in d.items()} for s, d in state.items() if isinstance(d, dict)})

    # Execute
    opt.apply(params, delta, state)
    opt.apply(params, delta, state)

    # Assert
    for k in params:
        assert torch.equal(params[k], before[0][k]) and torch.equal(delta[k], before[1][k])
    for s, d in before[2].items():
        for k, v in d.items():
            assert torch.equal(state[s][k], v)


@pytest.mark.parametrize("name", ALL)
def test_zero_delta_from_fresh_state_leaves_params_unchanged(name: str, rng: np.random.Generator) -> None:
    # Prepare
    opt = strategies.create(name, 1.0)
    params = _params(rng)
    zero = {k: torch.zeros_like(v) for k, v in params.items()}

    # Execute
    new_params, _ = opt.apply(params, zero, opt.init(params))

    # Assert
    for k in params:
        torch.testing.assert_close(new_params[k], params[k], rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_step_moves_along_the_delta(name: str, rng: np.random.Generator) -> None:
    # Prepare: every strategy's first step has the sign of the mean delta
    opt = strategies.create(name, 0.1)
    params = _params(rng)
    delta = {k: torch.from_numpy(rng.normal(size=v.shape).astype(np.float32)) for k, v in params.items()}

    # Execute
    new_params, _ = opt.apply(params, delta, opt.init(params))

    # Assert
    for k in params:
        assert torch.equal(torch.sign(new_params[k] - params[k]), torch.sign(delta[k]))


def test_fedavg_with_unit_lr_adds_the_delta(rng: np.random.Generator) -> None:
    opt = strategies.create("fedavg", 1.0)
    params = _params(rng)
    delta = {k: torch.full_like(v, 0.25) for k, v in params.items()}
    new_params, state = opt.apply(params, delta, opt.init(params))
    for k in params:
        torch.testing.assert_close(new_params[k], params[k] + 0.25)
    assert state == {}


def test_server_sgd_scales_by_lr() -> None:
    params = {"w": torch.tensor([1.0, 2.0])}
    new, _ = ServerSGD(lr=0.5).apply(params, {"w": torch.tensor([2.0, -4.0])}, {})
    assert new["w"].tolist() == [2.0, 0.0]


# -- FedAdam / FedYogi / FedAdagrad by hand --------------------------------------------------

@pytest.mark.parametrize("corrected", [True, False])
def test_fedadam_one_step_by_hand(corrected: bool) -> None:
    # Prepare
    opt = strategies.create("fedadam", 0.1, bias_correction=corrected)
    assert isinstance(opt, ServerAdaptive)
    params = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    delta = {"w": torch.tensor([0.5, -4.0], dtype=torch.float64)}
    b1, b2, tau = opt.beta1, opt.beta2, opt.tau

    # Execute
    new, state = opt.apply(params, delta, opt.init(params))

    # Assert
    for i, (x, d) in enumerate([(1.0, 0.5), (-2.0, -4.0)]):
        m = (1 - b1) * d
        v = b2 * tau**2 + (1 - b2) * d * d
        assert state["m"]["w"][i].item() == pytest.approx(m)
        assert state["v"]["w"][i].item() == pytest.approx(v)
        if corrected:  # Adam's: m / (1 - b1^1), v / (1 - b2^1)
            assert new["w"][i].item() == pytest.approx(x + 0.1 * (m / (1 - b1)) / (math.sqrt(v / (1 - b2)) + tau))
        else:  # Reddi et al.'s Algorithm 2
            assert new["w"][i].item() == pytest.approx(x + 0.1 * m / (math.sqrt(v) + tau))
    assert state["t"] == 1


def test_fedadam_second_step_uses_the_state() -> None:
    opt = ServerAdaptive(kind="adam", lr=1.0, beta1=0.5, beta2=0.5, tau=0.0, bias_correction=False)
    params = {"w": torch.tensor([0.0], dtype=torch.float64)}
    d = {"w": torch.tensor([2.0], dtype=torch.float64)}
    p1, s1 = opt.apply(params, d, opt.init(params))  # m=1, v=2
    p2, s2 = opt.apply(p1, d, s1)  # m=1.5, v=3
    assert p1["w"].item() == pytest.approx(1 / math.sqrt(2))
    assert s2["m"]["w"].item() == pytest.approx(1.5)
    assert s2["v"]["w"].item() == pytest.approx(3.0)
    assert p2["w"].item() == pytest.approx(1 / math.sqrt(2) + 1.5 / math.sqrt(3))


@pytest.mark.parametrize(
    ("kind", "v_expected"),
    [
        ("adagrad", 0.25 + 4.0),  # v + d^2
        ("yogi", 0.25 + 0.5 * 4.0),  # v - (1-b2) d^2 sign(v - d^2), v < d^2
        ("adam", 0.5 * 0.25 + 0.5 * 4.0),
    ],
)
def test_second_moment_rules(kind: str, v_expected: float) -> None:
    opt = ServerAdaptive(kind=kind, lr=1.0, beta1=0.0, beta2=0.5, tau=0.5)
    params = {"w": torch.tensor([0.0], dtype=torch.float64)}
    _, state = opt.apply(params, {"w": torch.tensor([2.0], dtype=torch.float64)}, opt.init(params))
    assert state["v"]["w"].item() == pytest.approx(v_expected)


def test_yogi_shrinks_v_when_v_exceeds_d2() -> None:
    opt = ServerAdaptive(kind="yogi", lr=1.0, beta1=0.0, beta2=0.5, tau=0.0)
    params = {"w": torch.tensor([0.0], dtype=torch.float64)}
    state = {"m": {"w": torch.zeros(1, dtype=torch.float64)}, "v": {"w": torch.tensor([9.0], dtype=torch.float64)}}
    _, new = opt.apply(params, {"w": torch.tensor([1.0], dtype=torch.float64)}, state)
    assert new["v"]["w"].item() == pytest.approx(9.0 - 0.5)


# -- registry --------------------------------------------------------------------------------

def test_duplicate_register_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(strategies, "_REGISTRY", dict(strategies._REGISTRY))
    with pytest.raises(ValueError, match=r"strategy 'fedavg' is already registered \(pass force=True"):
        strategies.register("fedavg", lambda lr, tau: ServerSGD(lr=lr))
    assert strategies.create("fedavg", 2.0) == ServerSGD(lr=2.0)


def test_register_new_and_force_replace(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(strategies, "_REGISTRY", dict(strategies._REGISTRY))

    # Execute
    strategies.register("halfavg", lambda p: ServerSGD(lr=p.lr / 2))
    strategies.register("fedavg", lambda p: ServerSGD(lr=3 * p.lr), force=True)

    # Assert
    assert "halfavg" in strategies.names()
    assert strategies.create("halfavg", 1.0) == ServerSGD(lr=0.5)
    assert strategies.create("fedavg", 1.0) == ServerSGD(lr=3.0)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown strategy 'fedsgd'; known: \['fedadagrad', 'fedadam', 'fedavg'"):
        strategies.create("fedsgd", 1.0)


def test_fedprox_is_proximal_and_fedavg_is_not() -> None:
    assert "fedprox" in strategies.PROXIMAL and "fedavg" not in strategies.PROXIMAL
    assert strategies.PROXIMAL <= set(ALL)


def test_create_passes_tau_to_the_adaptive_optimizers() -> None:
    for name in ("fedadam", "fedyogi", "fedadagrad"):
        opt = strategies.create(name, 0.01, 1e-7)
        assert isinstance(opt, ServerAdaptive) and opt.tau == 1e-7 and opt.lr == 0.01


# -- sparse rows and the server lr schedule -------------------------------------------------

def _rows(ids: list[int], values: list[list[float]]) -> SparseRows:
    return SparseRows(ids=torch.tensor(ids, dtype=torch.int64), values=torch.tensor(values, dtype=torch.float32))


@pytest.mark.parametrize("name", ALL)
def test_apply_rows_moves_only_the_named_rows_and_keeps_inputs(name: str) -> None:
    # Prepare
    opt = strategies.create(name, 0.5)
    table = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    before = table.clone()
    rows = _rows([1, 4], [[1.0, -1.0], [0.5, 2.0]])
    state = opt.init({})

    # Execute
    new, new_state = opt.apply_rows("ad_id", table, rows, state)

    # Assert
    assert torch.equal(table, before)  # pure
    moved = (new != table).any(dim=1).nonzero().flatten().tolist()
    assert moved == [1, 4]
    assert torch.equal(torch.sign(new[[1, 4]] - table[[1, 4]]), torch.sign(rows.values))


def test_fedavg_rows_step_by_the_server_lr() -> None:
    table = torch.zeros(3, 2)
    rows = _rows([0, 2], [[1.0, 2.0], [3.0, 4.0]])

    full, _ = ServerSGD(lr=1.0).apply_rows("t", table, rows, {})
    half, _ = ServerSGD(lr=0.5).apply_rows("t", table, rows, {})

    assert torch.equal(full[[0, 2]], rows.values)  # lr 1: the mean delta added (FedAvg)
    assert torch.equal(half[[0, 2]], 0.5 * rows.values)


def test_adam_rows_are_lazy_per_row_adam() -> None:
    # a row's moments advance only in the rounds that name it; the step is Adam's on that row
    opt = ServerAdaptive(kind="adam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-8)
    table = torch.zeros(3, 1)
    state = opt.apply({}, {}, opt.init({}))[1]  # the aggregate's dense step counts t
    t1, state = opt.apply_rows("t", table, _rows([0, 1], [[1.0], [1.0]]), state)
    state = opt.apply({}, {}, state)[1]
    t2, state = opt.apply_rows("t", t1, _rows([1], [[1.0]]), state)

    m = state["rows"]["t"]["m"].flatten().tolist()
    assert m[0] == pytest.approx(0.1) and m[1] == pytest.approx(0.19) and m[2] == 0.0
    # first step of a row: m^ / sqrt(v^) = 1 (d = 1), so the row moves by lr
    assert t1[0, 0].item() == pytest.approx(0.1, rel=1e-5)
    assert t2[0, 0].item() == t1[0, 0].item()  # not named in step 2: unchanged
    assert t2[1, 0].item() > t1[1, 0].item()


def test_at_scale_scales_the_lr_and_keeps_the_rest() -> None:
    opt = ServerAdaptive(kind="yogi", lr=0.02, tau=1e-6)
    assert strategies.at_scale(opt, 1.0) is opt
    scaled = strategies.at_scale(opt, 0.25)
    assert scaled.lr == pytest.approx(0.005) and scaled.kind == "yogi" and scaled.tau == 1e-6


def test_towers_scope_steps_only_the_named_tensors_adaptively() -> None:
    # Prepare: "w" is a tower tensor, "emb.age.weight" a small table; rows are FedAvg's
    opt = strategies.create("fedadam", 0.01, only=frozenset({"w"}))
    params = {"w": torch.zeros(2), "emb.age.weight": torch.zeros(3, 2)}
    delta = {"w": torch.tensor([5.0, -5.0]), "emb.age.weight": torch.full((3, 2), 0.25)}
    state = opt.init(params)

    # Execute
    new, state = opt.apply(params, delta, state)
    table, _ = opt.apply_rows("ad_id", torch.zeros(4, 2), _rows([2], [[0.5, -0.5]]), state)

    # Assert
    assert set(state["m"]) == {"w"}  # no moments for what steps as FedAvg
    assert new["w"].tolist() == pytest.approx([0.01, -0.01], rel=5e-3)  # Adam: lr-sized (tau 1e-3)
    assert torch.equal(new["emb.age.weight"], delta["emb.age.weight"])  # FedAvg: + delta
    assert table[2].tolist() == [0.5, -0.5] and not table[[0, 1, 3]].any()


@pytest.mark.parametrize(("advise", "sets", "names", "fix"), [
    ("strategy_advice", [], None, ""),
    ("strategy_advice", ["privacy.dp=true"], "privacy.dp", "experiments/configs/fedavg.toml"),
    ("strategy_advice", ['fl.schedule="async"'], "fl.schedule=async", "experiments/configs/fedavg.toml"),
    ("strategy_advice", ['fl.schedule="async"', 'fl.strategy="fedavg"'], None, ""),
    ("strategy_advice", ["privacy.dp=true", 'fl.strategy="fedyogi"'], "privacy.dp", "experiments/configs/fedavg.toml"),
    ("privacy_advice", [], None, ""),
    ("privacy_advice", ["privacy.dp=true", "privacy.target_epsilon=8"], None, ""),
    ("privacy_advice", ["privacy.target_epsilon=8"], "privacy.target_epsilon=8 without privacy.dp=true",
     "--set privacy.dp=true"),
    ("privacy_advice", ['fl.update_pipeline=["clip"]'], "fl.update_pipeline ['clip'] without privacy.dp=true",
     "--set privacy.dp=true"),
    ("privacy_advice", ["privacy.dp=true", "privacy.noise_multiplier=0"], "privacy.noise_multiplier=0",
     "set privacy.target_epsilon"),
])
def test_settings_measured_to_lose_or_to_give_no_privacy_are_told_in_one_line(
        advise: str, sets: list[str], names: str | None, fix: str) -> None:
    # Prepare: a server Adam (the sync default) where it was measured to lose to FedAvg, or
    # privacy settings that give no privacy
    from adfed.config import Config, with_overrides
    from adfed.fl import simulation

    # Execute
    advice = getattr(simulation, advise)(with_overrides(Config(), sets))

    # Assert: one line naming the setting and the fix, only where it applies
    if names is None:
        assert advice is None
    else:
        assert advice is not None and names in advice and fix in advice
        assert "\n" not in advice
