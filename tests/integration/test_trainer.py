"""Trainer in process: centralized fit, the cloud-only variant, NaN detection."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from adfed.config import Config, with_overrides
from adfed.data.schema import Visibility
from adfed.data.store import Dataset
from adfed.errors import ConfigError, TrainingError
from adfed.model.pcvr import ensure_finite
from adfed.trainer import Trainer, fit_centralized


def _central(data: Path, *overrides: str) -> Config:
    base = [f'data.path="{data}"', 'train.mode="centralized"', "model.tower=[32,16]",
            "data.max_test_users=300"]
    return with_overrides(Config(), base + list(overrides))


@pytest.fixture(scope="module")
def dataset(small_world: Path) -> Dataset:
    return Dataset.open(small_world)


def test_centralized_fit_rows_per_epoch(small_world: Path, dataset: Dataset) -> None:
    cfg = _central(small_world, "train.epochs=2")
    seen: list[dict] = []
    result = Trainer(cfg).fit(dataset, on_step=seen.append)
    assert result.rows_name == "epochs.csv"
    assert [r["epoch"] for r in result.rows] == [1, 2]
    assert seen == result.rows
    for row in result.rows:
        assert math.isfinite(row["auc"]) and 0.0 <= row["auc"] <= 1.0
        assert math.isfinite(row["loss"])
    s = result.summary
    assert s["mode"] == "centralized" and s["epochs"] == 2 and s["auc"] == result.rows[-1]["auc"]
    assert s["model_bytes"] > 0 and s["train_examples"] > 0 and s["test_examples"] > 0


def test_the_learning_curve_scores_the_test_set_at_its_points_without_changing_training(
        small_world: Path, dataset: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    import copy

    from adfed import trainer
    from adfed.trainer import curve_steps

    calls: list[tuple[object, dict]] = []  # (a copy of the model scored, its metrics)
    real = trainer.evaluate

    def recording(model, test):  # noqa: ANN001, ANN202 - the real evaluate, recorded
        metrics = real(model, test)
        calls.append((copy.deepcopy(model), metrics))
        return metrics

    monkeypatch.setattr(trainer, "evaluate", recording)
    cfg = _central(small_world, "train.epochs=2", "train.batch_size=512", "train.eval_points=3")
    result = Trainer(cfg).fit(dataset)
    steps = result.steps
    per_epoch = math.ceil(result.summary["train_examples"] / 512)
    assert [r["step"] for r in steps] == list(range(1, 2 * per_epoch + 1))
    assert [r["epoch"] for r in steps] == [1] * per_epoch + [2] * per_epoch
    assert steps[-1]["examples"] == 2 * result.summary["train_examples"]
    assert all(math.isfinite(r["loss"]) for r in steps)
    scored = [r["step"] for r in steps if "auc" in r]
    # every third of all steps, and each epoch's end
    assert scored == sorted({round(2 * per_epoch / 3), round(4 * per_epoch / 3), per_epoch, 2 * per_epoch})
    assert steps[per_epoch - 1]["auc"] == result.rows[0]["auc"] and steps[-1]["auc"] == result.summary["auc"]
    # each point is a real evaluation of the model as it stood then: one call per point, in
    # order, four distinct models (a point computed without scoring would not be here)
    points = [r for r in steps if "auc" in r]
    assert len(calls) == len(points) == 4
    assert [r["auc"] for r in points] == [m["auc"] for _, m in calls]
    assert len({round(r["auc"], 12) for r in points}) == 4
    first, last = calls[0][0].state_dict(), calls[-1][0].state_dict()
    assert any(not torch.equal(first[k], last[k]) for k in first)
    # scoring is not training: the same model as with epoch ends only
    plain = Trainer(_central(small_world, "train.epochs=2", "train.batch_size=512", "train.eval_points=1")).fit(dataset)
    assert [r["step"] for r in plain.steps if "auc" in r] == [per_epoch, 2 * per_epoch]
    for (name, a), b in zip(result.model.state_dict().items(), plain.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert curve_steps(0, 512, 1, 4) == set() and curve_steps(100, 512, 1, 4) == set()
    assert curve_steps(4096, 1024, 1, 4) == {1, 2, 3}


def test_centralized_training_never_sees_a_test_row(small_world: Path, dataset: Dataset) -> None:
    from adfed.evaluation import split_examples

    result = Trainer(_central(small_world, "data.max_test_users=0")).fit(dataset)
    s = result.summary
    assert s["train_examples"] + s["test_examples"] == dataset.num_impressions
    split = split_examples(dataset.load(), 0.2)
    assert (len(split.train), len(split.test)) == (s["train_examples"], s["test_examples"])
    # each user's test rows are its last: no test row is earlier than a train row of its user
    train_t, test_t = split.train.labels["timestamp"], split.test.labels["timestamp"]
    train_u, test_u = split.train.ids["user_id"], split.test.ids["user_id"]
    last_train = {int(u): int(t) for u, t in zip(train_u, train_t, strict=True)}  # rows sorted by time
    assert all(int(t) >= last_train.get(int(u), -1) for u, t in zip(test_u, test_t, strict=True))
    train_keys = set(zip(train_u.tolist(), train_t.tolist(), split.train.ids["ad_id"].tolist(), strict=True))
    test_keys = set(zip(test_u.tolist(), test_t.tolist(), split.test.ids["ad_id"].tolist(), strict=True))
    assert not train_keys & test_keys


def test_cloud_only_variant_reads_no_private_field(small_world: Path, dataset: Dataset) -> None:
    private = {f.name for f in dataset.schema.fields if f.visibility is Visibility.PRIVATE}
    assert private, "the synthetic schema should have PRIVATE fields"
    result = Trainer(_central(small_world, 'model.variant="cloud_only"')).fit(dataset)
    model = result.model
    names = {f.name for f in model.schema.fields}
    assert names and not names & private
    assert all(f.visibility is Visibility.CLOUD for f in model.schema.fields)
    assert model.user_bias is None
    params = [n for n, _ in model.named_parameters()]
    assert not [n for n in params if any(f".{p}." in f".{n}." for p in private)], params
    assert result.summary["variant"] == "cloud_only"
    assert math.isfinite(result.summary["auc"])
    full = Trainer(_central(small_world)).fit(dataset)
    assert result.summary["model_bytes"] < full.summary["model_bytes"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_ensure_finite_raises_on_non_finite(value: float) -> None:
    with pytest.raises(TrainingError, match="step 3"):
        ensure_finite(torch.tensor(value), where="epoch 1, step 3")
    ok = torch.tensor(0.5)
    assert ensure_finite(ok, where="x") is ok


def test_diverging_training_raises_training_error(small_world: Path, dataset: Dataset) -> None:
    cfg = _central(small_world, "train.lr=1e38", "train.sparse_lr=1e38")
    with pytest.raises(TrainingError, match="train.lr"):
        fit_centralized(cfg, dataset)


def test_ema_returns_and_scores_the_average_of_the_weights(small_world: Path, dataset: Dataset) -> None:
    """train.ema: the model returned (and evaluated) has the towers' moving average, not the
    last step's towers; everything else is the last step's (the same in both runs: the
    average never feeds back into training)."""
    averaged = Trainer(_central(small_world, "train.ema=0.9")).fit(dataset)
    last = Trainer(_central(small_world, "train.ema=0")).fit(dataset)
    avg_params = dict(averaged.model.named_parameters())
    last_params = dict(last.model.named_parameters())
    assert avg_params.keys() == last_params.keys()
    moved = {n for n in avg_params if not torch.equal(avg_params[n], last_params[n])}
    assert moved == {n for n in avg_params if n.startswith("towers.")}  # the tables are the live ones
    assert averaged.summary["auc"] != last.summary["auc"] or averaged.summary["logloss"] != last.summary["logloss"]


def test_weight_average_follows_the_warmed_up_ema_formula() -> None:
    from adfed.trainer import weight_average

    model = torch.nn.Linear(3, 1)
    average = weight_average(model, 0.5)  # type: ignore[arg-type]
    assert average is not None and weight_average(model, 0.0) is None  # type: ignore[arg-type]
    values = [1.0, 2.0, 4.0]
    expected = None
    for n, v in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(v)
        average.update_parameters(model)
        d = min(0.5, (1 + n) / (10 + n))
        expected = v if expected is None else d * expected + (1 - d) * v
    assert torch.allclose(average.module.weight, torch.full((1, 3), expected))


def test_weight_average_follows_a_new_module_object() -> None:
    """The fast update reuses the first module's tensors; another module object (or
    parameters replaced by new tensors, passed as a new object) is read afresh."""
    from adfed.trainer import weight_average

    first, second = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    with torch.no_grad():
        first.weight.fill_(1.0)
        second.weight.fill_(5.0)
    average = weight_average(first, 0.5)
    assert average is not None
    average.update_parameters(first)  # copies 1
    average.update_parameters(first)  # n=1: d = min(0.5, 2/11) -> 1
    average.update_parameters(second)  # n=2: d = 3/12, toward 5
    d = 3 / 12
    assert torch.allclose(average.module.weight, torch.full((1, 3), d * 1.0 + (1 - d) * 5.0))
    assert int(average.n_averaged) == 3


def test_weight_average_rejects_a_decay_outside_0_1() -> None:
    from adfed.trainer import WeightAverage

    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="train.ema"):
            WeightAverage(torch.nn.Linear(2, 1), decay)


def test_train_optimizer_and_sparse_optimizer_choose_the_optimizers(small_world: Path, dataset: Dataset) -> None:
    """train.optimizer picks the dense parameters' optimizer and train.sparse_optimizer the
    big tables' rows'; each choice changes what training produces, and every one trains."""
    def fit(dense: str, sparse: str) -> dict[str, torch.Tensor]:
        cfg = _central(small_world, f'train.optimizer="{dense}"', f'train.sparse_optimizer="{sparse}"',
                       "train.ema=0")
        result = fit_centralized(cfg, dataset)
        assert math.isfinite(result.summary["auc"]) and math.isfinite(result.summary["logloss"])
        return {n: p.detach().clone() for n, p in result.model.named_parameters()}

    base = fit("adam", "sparse_adam")
    model = Trainer(_central(small_world)).fit(dataset).model
    sparse = [n for n, _ in model.named_parameters() if model.has_sparse_grad(n)]
    dense = [n for n, _ in model.named_parameters() if not model.has_sparse_grad(n)]
    assert sparse and dense
    for options in (("sgd", "sparse_adam"), ("adam", "adagrad"), ("adam", "sgd")):
        other = fit(*options)
        assert any(not torch.equal(base[n], other[n]) for n in dense), options
        assert any(not torch.equal(base[n], other[n]) for n in sparse), options


def test_an_unknown_optimizer_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match="train.sparse_optimizer must be one of"):
        with_overrides(Config(), ['train.sparse_optimizer="adam"'])
    with pytest.raises(ConfigError, match="train.optimizer must be one of"):
        with_overrides(Config(), ['train.optimizer="rmsprop"'])


def test_lr_decay_holds_then_scales_every_group_by_start_over_step() -> None:
    from adfed.model.groups import lr_decay_factor
    from adfed.trainer import lr_decay

    assert [lr_decay_factor(n, 4) for n in (0, 1, 4, 5, 8, 400)] == [1.0, 1.0, 1.0, 0.8, 0.5, 0.01]
    assert lr_decay_factor(10_000, 0) == 1.0
    w = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    adam = torch.optim.Adam([{"params": [w], "lr": 0.01}, {"params": [b], "lr": 0.003}])
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    assert lr_decay([adam, sgd], 0) == []
    schedules = lr_decay([adam, sgd], 4)
    for step in range(1, 9):
        for opt in (adam, sgd):
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = torch.ones_like(p)
            opt.step()
        for schedule in schedules:
            schedule.step()
        factor = 1.0 if step <= 4 else 4 / step
        assert [g["lr"] for g in adam.param_groups] == pytest.approx([0.01 * factor, 0.003 * factor])
        assert sgd.param_groups[0]["lr"] == pytest.approx(2.0 * factor)


def test_train_lr_decay_start_reaches_every_optimizer(small_world: Path, dataset: Dataset) -> None:
    """A start past the run's last step trains exactly as constant rates; an early start
    changes both the dense parameters and the big tables' rows."""
    def fit(start: int) -> dict[str, torch.Tensor]:
        result = fit_centralized(_central(small_world, f"train.lr_decay_start={start}", "train.ema=0"), dataset)
        return {n: p.detach().clone() for n, p in result.model.named_parameters()}

    constant, late, early = fit(0), fit(1_000_000), fit(1)
    model = Trainer(_central(small_world)).fit(dataset).model
    assert all(torch.equal(constant[n], late[n]) for n in constant)
    for sparse in (True, False):
        names = [n for n, _ in model.named_parameters() if model.has_sparse_grad(n) == sparse]
        assert names and any(not torch.equal(constant[n], early[n]) for n in names), sparse


def test_a_negative_lr_decay_start_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match=r"train.lr_decay_start must be an int >= 0 \(0 = constant lr\)"):
        with_overrides(Config(), ["train.lr_decay_start=-1"])
