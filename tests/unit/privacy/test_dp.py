"""The DP mechanisms: clipping, the Skellam share, the Gaussian and tree sums, the vocabulary."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adfed.config import Config, with_overrides
from adfed.fl.aggregators import RoundInfo
from adfed.fl.blocks import phone_rows, serve_block, upload_block
from adfed.fl.rounds import client_settings
from adfed.fl.types import SparseRows, Update
from adfed.fl.wire import WireSpec
from adfed.privacy.accountant import make_plan
from adfed.privacy.dp import (
    Clip,
    GaussianSum,
    SkellamShare,
    TreeSum,
    clip_per_tensor,
    clip_update,
    tree_nodes,
    update_norm,
)
from adfed.privacy.vocabulary import dp_row_counts, plan_vocabulary

DENSE = {"w": torch.zeros(4, 3)}
TABLES = {"ad": torch.zeros(50, 2)}
SPEC = WireSpec.of(DENSE, TABLES)


def _update(scale: float = 1.0, client: int = 0, rows: torch.Tensor | None = None) -> Update:
    g = torch.Generator().manual_seed(client)
    ids = torch.arange(50) if rows is None else rows
    return Update(client_id=client, dense={"w": torch.randn(4, 3, generator=g) * scale},
                  sparse={"ad": SparseRows(ids, torch.randn(len(ids), 2, generator=g) * scale)},
                  num_examples=17, base_version=0, metrics={"loss": 0.3})


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(0.0, 100.0), clip=st.floats(0.01, 50.0))
def test_clip_bounds_the_norm_and_keeps_small_updates(scale: float, clip: float) -> None:
    update = _update(scale)
    clipped, norm = clip_update(update, clip)
    assert update_norm(clipped) <= clip * (1 + 1e-5)
    if norm <= clip:
        assert clipped is update
    else:  # same direction
        torch.testing.assert_close(clipped.dense["w"] * norm / clip, update.dense["w"], rtol=1e-4, atol=1e-5)


def test_the_clip_transform_reports_one_bit_and_nothing_else() -> None:
    s = client_settings(Config())
    big = Clip().forward(_update(100.0), np.random.default_rng(0), None, type(s)(**{**s.__dict__, "clip": 1.0}))[0]
    small = Clip().forward(_update(1e-3), np.random.default_rng(0), None, type(s)(**{**s.__dict__, "clip": 1.0}))[0]
    assert big.metrics == {"below_clip": 0.0} and small.metrics == {"below_clip": 1.0}
    assert big.num_examples == small.num_examples == 1  # no example count leaves the phone


def _plan(*over: str, population: int = 10_000):  # noqa: ANN202
    cfg = with_overrides(Config(), ["privacy.dp=true", "fl.clients_per_round=100", *over])
    return make_plan(cfg, population)


def test_gaussian_sum_divides_by_the_fixed_denominator_and_adds_z_c_noise() -> None:
    # Prepare: 10 arrivals of 100 expected, no noise, then with noise
    vocab = plan_vocabulary({"ad": 50}, {}, 0, 0.0, seed=0)
    updates = [_update(1.0, c) for c in range(10)]
    quiet = GaussianSum(_plan("privacy.noise_multiplier=0"), SPEC, vocab, False, 0.5, 0.2)
    noisy = GaussianSum(_plan("privacy.noise_multiplier=2"), SPEC, vocab, False, 0.5, 0.2)

    # Execute
    a = quiet(updates, np.ones(10), np.random.default_rng(0), RoundInfo(step=1, clip=3.0))
    b = noisy([], np.zeros(0), np.random.default_rng(0), RoundInfo(step=1, clip=3.0))

    # Assert
    want = sum(u.dense["w"].double() for u in updates) / 100
    torch.testing.assert_close(a.dense["w"].double(), want, rtol=1e-6, atol=1e-7)
    assert torch.equal(a.sparse["ad"].ids, torch.arange(50))
    released = torch.cat([b.dense["w"].flatten(), b.sparse["ad"].values.flatten()]).double()
    assert float(released.std()) == pytest.approx(2 * 3.0 / 100, rel=0.15)  # nobody arrived: noise only
    assert b.stats["noise_std"] == pytest.approx(0.06)


def test_adaptive_clip_moves_toward_the_target_quantile() -> None:
    plan = _plan("privacy.adaptive_clip=true", "privacy.noise_multiplier=0.01", "privacy.clip_count_noise=0.01")
    agg = GaussianSum(plan, SPEC, None, False, 0.5, 0.2)
    below = [Update(client_id=c, dense={"w": torch.zeros(4, 3)}, sparse={}, num_examples=1, base_version=0,
                    metrics={"below_clip": 1.0}) for c in range(100)]
    out = agg(below, np.ones(100), np.random.default_rng(0), RoundInfo(step=1, clip=2.0))
    assert out.stats["below_clip"] == pytest.approx(1.0, abs=1e-3)
    assert out.stats["next_clip"] == pytest.approx(2.0 * np.exp(-0.2 * 0.5), rel=1e-3)  # everyone below: shrink


def test_tree_nodes_cover_each_prefix_exactly_once() -> None:
    for t in range(1, 70):
        covered = []
        for level, index in tree_nodes(t):
            covered.extend(range(index * 2 ** level + 1, (index + 1) * 2 ** level + 1))
        assert sorted(covered) == list(range(1, t + 1))
        assert len(tree_nodes(t)) <= t.bit_length()


def test_tree_sum_releases_prefix_noise_that_telescopes() -> None:
    # Prepare: no update at all; the model after t rounds carries exactly prefix noise t
    plan = _plan('privacy.mechanism="dp_ftrl"', "privacy.noise_multiplier=1", population=1000)
    agg = TreeSum(plan, SPEC, None, seed=3)
    total = torch.zeros(4, 3, dtype=torch.float64)

    # Execute
    for step in range(1, 8):
        total += agg([], np.zeros(0), np.random.default_rng(step), RoundInfo(step=step, clip=1.0)).dense["w"].double()

    # Assert: 7 = 4 + 2 + 1: three nodes, std sqrt(3) / 100 per coordinate, not sqrt(7)
    prefix = agg.prefix_noise(0, 7, 1.0)["w"] / 100
    torch.testing.assert_close(total, prefix, rtol=1e-5, atol=1e-6)
    assert len(tree_nodes(7)) == 3


def test_skellam_shares_sum_to_the_target_noise_and_invert_to_the_values() -> None:
    s = client_settings(Config())
    settings_ = type(s)(**{**s.__dict__, "clip": 1.0})
    share = SkellamShare(scale=256.0, noise_multiplier=1.0, cohort=50)
    base = Update(client_id=0, dense={"w": torch.full((200, 50), 0.25)}, sparse={}, num_examples=1, base_version=0)
    total = torch.zeros(200, 50, dtype=torch.float64)
    for c in range(50):
        out, _ = share.forward(base, np.random.default_rng(c), None, settings_)
        assert torch.equal(out.dense["w"], out.dense["w"].round())  # integers on the wire
        total += share.inverse(out).dense["w"].double()
    # the sum: 50 x 0.25 plus noise of std z C = 1 (in value units)
    assert float(total.mean()) == pytest.approx(12.5, abs=0.02)
    assert float(total.std()) == pytest.approx(1.0, rel=0.05)


def test_vocabulary_is_popular_plus_random_and_the_same_for_everyone() -> None:
    counts = {"ad": np.arange(50, dtype=np.float64)}  # row 49 most popular
    vocab = plan_vocabulary({"ad": 50}, counts, 10, 0.3, seed=1)
    a, b, c = vocab.for_round(1)["ad"], vocab.for_round(1)["ad"], vocab.for_round(2)["ad"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a) == 10 and torch.equal(a, torch.unique(a))
    assert set(range(43, 50)) <= set(a.tolist())  # the 7 most popular
    assert vocab.size("ad") == 10


def test_dp_row_count_caps_each_phone_and_adds_noise() -> None:
    touched = [{"ad": torch.arange(30)} for _ in range(20)]
    exact = dp_row_counts(touched, {"ad": 50}, max_rows=10, noise_multiplier=1e-9, rng=np.random.default_rng(0))
    assert float(exact["ad"].sum()) == pytest.approx(200, abs=1e-3)  # 20 phones x at most 10 rows
    assert float(exact["ad"][30:].max()) == pytest.approx(0, abs=1e-3)


def test_blocks_hide_which_rows_a_phone_read() -> None:
    table = torch.arange(100, dtype=torch.float32).reshape(50, 2)
    vocab = torch.tensor([1, 4, 9, 20])
    block = serve_block(table, vocab)
    rows = phone_rows(block, torch.tensor([4, 5, 20]))
    assert rows.values.tolist() == [[8.0, 9.0], [0.0, 0.0], [40.0, 41.0]]  # row 5 is outside: zeros
    up = upload_block(SparseRows(torch.tensor([4, 5, 20]), torch.ones(3, 2)), vocab, 2)
    assert torch.equal(up.ids, vocab)
    assert up.values.tolist() == [[0, 0], [1, 1], [0, 0], [1, 1]]
    assert torch.equal(upload_block(None, vocab, 2).ids, vocab)


def test_per_tensor_clipping_bounds_each_tensor_and_reports_a_bit_each() -> None:
    s = client_settings(Config())
    update = _update(10.0)
    clips = (("ad", 0.5), ("w", 100.0))
    out = Clip().forward(update, np.random.default_rng(0), None, type(s)(**{**s.__dict__, "clips": clips}))[0]
    assert float(out.sparse["ad"].values.norm()) == pytest.approx(0.5, rel=1e-5)
    assert torch.equal(out.dense["w"], update.dense["w"])  # under its clip: untouched
    assert out.metrics == {"below_clip/ad": 0.0, "below_clip/w": 1.0} and out.num_examples == 1
    with pytest.raises(ValueError, match="no clip for w"):
        clip_per_tensor(update, {"ad": 1.0})


def test_per_tensor_noise_is_in_proportion_to_each_clip() -> None:
    # Prepare: K = 2 tensors with clips 0.1 and 4; the scaled update has sensitivity sqrt(2)
    plan = dataclasses.replace(_plan("privacy.noise_multiplier=1"), clip_groups=2, participation=1.0)
    agg = GaussianSum(plan, SPEC, plan_vocabulary({"ad": 50}, {}, 0, 0.0, seed=0), False, 0.5, 0.2)

    # Execute: nobody arrived, noise only
    out = agg([], np.zeros(0), np.random.default_rng(0), RoundInfo(step=1, clips=(("ad", 4.0), ("w", 0.1))))

    # Assert
    assert float(out.dense["w"].double().std()) == pytest.approx(2 ** 0.5 * 0.1 / 100, rel=0.3)
    assert float(out.sparse["ad"].values.double().std()) == pytest.approx(2 ** 0.5 * 4.0 / 100, rel=0.15)
