"""Server optimizers: a contract suite over every registered strategy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adfed.fl import strategies
from adfed.fl.strategies import ServerAdaptive, ServerSGD
from adfed.fl.types import Update

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
              {s: {k: v.clone() for k, v in d.items()} for s, d in state.items()})

    # Execute
    opt.apply(params, delta, state)
    opt.apply(params, delta, state)

    # Assert
    for k in params:
        assert torch.equal(params[k], before[0][k]) and torch.equal(delta[k], before[1][k])
    for s, d in state.items():
        for k, v in d.items():
            assert torch.equal(v, before[2][s][k])


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

def test_fedadam_one_step_by_hand() -> None:
    # Prepare
    opt = strategies.create("fedadam", 0.1)
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
        assert new["w"][i].item() == pytest.approx(x + 0.1 * m / (math.sqrt(v) + tau))


def test_fedadam_second_step_uses_the_state() -> None:
    opt = ServerAdaptive(kind="adam", lr=1.0, beta1=0.5, beta2=0.5, tau=0.0)
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
    strategies.register("halfavg", lambda lr, tau: ServerSGD(lr=lr / 2))
    strategies.register("fedavg", lambda lr, tau: ServerSGD(lr=3 * lr), force=True)

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
