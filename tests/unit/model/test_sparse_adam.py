"""RowSparseAdam: the same lazy Adam as torch.optim.SparseAdam, at a lower cost."""

from __future__ import annotations

import copy
from collections.abc import Callable

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from adfed.data.examples import Batch
from adfed.data.schema import Schema
from adfed.model import build_model, esmm_loss, make_optimizers
from adfed.model.sparse_adam import RowSparseAdam, unique_rows

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")

# float32 Adam steps from the same inputs; the only differences are rounding (fused
# lerp/addcdiv, and the order in which duplicate rows are summed).
RTOL, ATOL = 1e-5, 1e-6


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.detach(), b.detach(), rtol=RTOL, atol=ATOL)

#: (shape, sparse_dim) of the parameters the tests train together.
SHAPES: list[tuple[tuple[int, ...], int]] = [((30, 4), 1), ((12, 3), 1), ((9,), 1), ((8, 2, 3), 1), ((5, 6), 2)]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape, _ in SHAPES]


def _sparse_grad(
    shape: tuple[int, ...], sparse_dim: int, ids: torch.Tensor, gen: torch.Generator, *, coalesced: bool = False
) -> torch.Tensor:
    """An uncoalesced sparse COO gradient with one stored entry per id (duplicates kept).

    The values are multiples of 1/64 in [-4, 4], so duplicates sum exactly in any order:
    SparseAdam (coalesce) and RowSparseAdam (stored order) sum them in different orders,
    and with random floats a sum that cancels to ~1e-7 differs between the two in its
    leading digits, which Adam's first step (g / (|g| + eps)) turns into a visible
    difference (hypothesis found one: seed 213, 2e-4). Summation order is not what these
    tests compare; the arithmetic of the update is.
    """
    if sparse_dim == 1:
        indices = ids.unsqueeze(0)
    else:  # a position over the first two dims, row-major
        indices = torch.stack([ids // shape[1], ids % shape[1]])
    values = torch.randint(-256, 257, (ids.shape[0], *shape[sparse_dim:]), generator=gen) / 64.0
    grad = torch.sparse_coo_tensor(indices, values, shape)
    return grad.coalesce() if coalesced else grad


def _schedule(seed: int, steps: int) -> list[list[torch.Tensor | None]]:
    """Per step, per parameter: a gradient (duplicates, rows missing) or None (no grad)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[list[torch.Tensor | None]] = []
    for step in range(steps):
        grads: list[torch.Tensor | None] = []
        for j, (shape, sparse_dim) in enumerate(SHAPES):
            rows = 1
            for d in shape[:sparse_dim]:
                rows *= d
            if (step + j * j) % 5 == 4:
                grads.append(None)  # this parameter gets no gradient this step
                continue
            # Only the first half of the rows in even steps: the rest stay absent.
            high = rows if step % 2 else max(1, rows // 2)
            n = int(torch.randint(0, 2 * rows, (), generator=gen)) if step % 3 else 2 * rows
            ids = torch.randint(0, high, (n,), generator=gen)
            grads.append(_sparse_grad(shape, sparse_dim, ids, gen, coalesced=step == 4))
        out.append(grads)
    return out


def _run(
    opt_cls: Callable[..., torch.optim.Optimizer], schedule: list[list[torch.Tensor | None]], **kwargs: object
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = _params()
    opt = opt_cls(params, **kwargs)
    for grads in schedule:
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
    return params, opt


def _assert_same_state(
    a: list[torch.nn.Parameter], opt_a: torch.optim.Optimizer, b: list[torch.nn.Parameter],
    opt_b: torch.optim.Optimizer, *, exact: bool = False,
) -> None:
    for pa, pb in zip(a, b, strict=True):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb)
        if not sa:
            continue
        assert sa["step"] == sb["step"]
        for x, y in ((pa, pb), (sa["exp_avg"], sb["exp_avg"]), (sa["exp_avg_sq"], sb["exp_avg_sq"])):
            assert x.shape == y.shape
            if exact:
                assert torch.equal(x, y)
            else:
                _assert_close(x, y)


def test_matches_torch_sparse_adam_over_several_steps() -> None:
    schedule = _schedule(seed=1, steps=12)

    ours, opt_ours = _run(RowSparseAdam, schedule, lr=0.05)
    ref, opt_ref = _run(torch.optim.SparseAdam, schedule, lr=0.05)

    _assert_same_state(ours, opt_ours, ref, opt_ref)
    # The step counts differ between parameters (some had no gradient in some steps).
    assert len({opt_ours.state[p]["step"] for p in ours}) > 1


@pytest.mark.parametrize("kwargs", [{"betas": (0.5, 0.9), "eps": 1e-3}, {"maximize": True}, {"lr": torch.tensor(0.02)}])
def test_matches_torch_sparse_adam_with_other_settings(kwargs: dict[str, object]) -> None:
    schedule = _schedule(seed=2, steps=6)

    ours, opt_ours = _run(RowSparseAdam, schedule, **kwargs)
    ref, opt_ref = _run(torch.optim.SparseAdam, schedule, **kwargs)

    _assert_same_state(ours, opt_ours, ref, opt_ref)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 6))
def test_matches_torch_sparse_adam_on_random_schedules(seed: int, steps: int) -> None:
    schedule = _schedule(seed=seed, steps=steps)

    ours, opt_ours = _run(RowSparseAdam, schedule, lr=0.1)
    ref, opt_ref = _run(torch.optim.SparseAdam, schedule, lr=0.1)

    _assert_same_state(ours, opt_ours, ref, opt_ref)


def test_duplicates_are_summed_before_the_nonlinear_update() -> None:
    # One row read three times must move as one read of the summed gradient, not three.
    p_dup, p_sum = torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(4, 2))
    opt_dup, opt_sum = RowSparseAdam([p_dup], lr=0.1), RowSparseAdam([p_sum], lr=0.1)
    p_dup.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3, 1, 1]]), torch.tensor(
        [[1.0, -2.0], [0.5, 0.5], [2.0, 1.0], [-4.0, 1.0]]), (4, 2))
    p_sum.grad = torch.sparse_coo_tensor(torch.tensor([[3, 1]]), torch.tensor([[0.5, 0.5], [-1.0, 0.0]]), (4, 2))

    opt_dup.step()
    opt_sum.step()

    assert torch.equal(p_dup, p_sum)
    assert torch.equal(opt_dup.state[p_dup]["exp_avg"], opt_sum.state[p_sum]["exp_avg"])
    # A zero summed gradient still counts as present (its moments decay), as in SparseAdam.
    assert p_dup[1, 1] == 0 and opt_dup.state[p_dup]["exp_avg_sq"][1, 1] == 0


def test_untouched_rows_and_their_state_stay_exactly_unchanged() -> None:
    schedule = _schedule(seed=3, steps=5)
    params, opt = _run(RowSparseAdam, schedule, lr=0.05)
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy({i: opt.state[p] for i, p in enumerate(params)})
    gen = torch.Generator().manual_seed(4)
    touched = torch.tensor([2, 0, 2, 5])  # with a duplicate

    # Only the first parameter gets a gradient, on rows {0, 2, 5}.
    params[0].grad = _sparse_grad(SHAPES[0][0], 1, touched, gen)
    for p in params[1:]:
        p.grad = None
    opt.step()

    mask = torch.zeros(params[0].shape[0], dtype=torch.bool)
    mask[touched] = True
    s0, s0_before = opt.state[params[0]], state_before[0]
    assert torch.equal(params[0][~mask], before[0][~mask])
    assert torch.equal(s0["exp_avg"][~mask], s0_before["exp_avg"][~mask])
    assert torch.equal(s0["exp_avg_sq"][~mask], s0_before["exp_avg_sq"][~mask])
    assert (params[0][mask] != before[0][mask]).any(dim=1).all()
    for i, p in enumerate(params[1:], start=1):  # no gradient: nothing moves, not even the step
        assert torch.equal(p, before[i])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], state_before[i][key])
        assert opt.state[p]["step"] == state_before[i]["step"]


def test_rows_never_touched_keep_zero_state() -> None:
    p = torch.nn.Parameter(torch.randn(10, 3))
    start = p.detach().clone()
    opt = RowSparseAdam([p], lr=0.1)
    for ids in ([1, 1, 4], [4, 7], [1]):
        p.grad = torch.sparse_coo_tensor(torch.tensor([ids]), torch.ones(len(ids), 3), (10, 3))
        opt.step()

    never = torch.tensor([i not in (1, 4, 7) for i in range(10)])
    assert torch.equal(p[never], start[never])
    assert not opt.state[p]["exp_avg"][never].any() and not opt.state[p]["exp_avg_sq"][never].any()
    assert opt.state[p]["step"] == 3


def test_empty_gradient_counts_a_step_and_moves_nothing() -> None:
    start = torch.randn(6, 2)
    ps = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    opts = [RowSparseAdam([ps[0]], lr=0.1), torch.optim.SparseAdam([ps[1]], lr=0.1)]
    for opt, p in zip(opts, ps, strict=True):
        before = p.detach().clone()
        p.grad = torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.int64), torch.zeros(0, 2), (6, 2))
        opt.step()
        assert torch.equal(p, before) and opt.state[p]["step"] == 1
        p.grad = torch.sparse_coo_tensor(torch.tensor([[2, 2]]), torch.ones(2, 2), (6, 2))
        opt.step()
    _assert_close(ps[0], ps[1])


def test_same_inputs_give_bitwise_the_same_result() -> None:
    schedule = _schedule(seed=5, steps=8)
    threads = torch.get_num_threads()

    first, opt_first = _run(RowSparseAdam, schedule, lr=0.05)
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        second, opt_second = _run(RowSparseAdam, schedule, lr=0.05)
    finally:
        torch.set_num_threads(threads)

    _assert_same_state(first, opt_first, second, opt_second, exact=True)


def test_gradients_are_left_untouched() -> None:
    params = _params()
    grads = _schedule(seed=6, steps=1)[0]
    copies = [None if g is None else g.clone() for g in grads]
    opt = RowSparseAdam(params, lr=0.05, maximize=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()

    for g, c in zip(grads, copies, strict=True):
        assert (g is None) == (c is None)
        if g is not None and c is not None:
            assert torch.equal(g._indices(), c._indices()) and torch.equal(g._values(), c._values())


def test_state_dict_carries_over_from_and_to_torch_sparse_adam() -> None:
    schedule = _schedule(seed=7, steps=8)
    ref, opt_ref = _run(torch.optim.SparseAdam, schedule, lr=0.05)
    # The same run, switching optimizers after four steps, both ways.
    for first, second in ((torch.optim.SparseAdam, RowSparseAdam), (RowSparseAdam, torch.optim.SparseAdam)):
        params = _params()
        opt: torch.optim.Optimizer = first(params, lr=0.05)
        for i, grads in enumerate(schedule):
            if i == 4:
                saved = copy.deepcopy(opt.state_dict())
                opt = second(params, lr=0.05)
                opt.load_state_dict(saved)
            for p, g in zip(params, grads, strict=True):
                p.grad = None if g is None else g.clone()
            opt.step()
        _assert_same_state(params, opt, ref, opt_ref)


def test_state_has_sparse_adams_keys_and_shapes() -> None:
    params, opt = _run(RowSparseAdam, _schedule(seed=8, steps=3), lr=0.05)

    for p in params:
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and isinstance(state["step"], int)
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
        assert state["exp_avg"].is_contiguous() and state["exp_avg_sq"].is_contiguous()


@pytest.mark.parametrize("layout", ["column_major", "row_slice"])
def test_non_contiguous_parameter_is_updated_in_place(layout: str) -> None:
    base = torch.randn(6, 8)
    wide = torch.cat([base, torch.randn(6, 3)], dim=1)
    # [6, 8] with column-major strides (no row view), or the first 8 columns of a [6, 11]
    ours = torch.nn.Parameter(base.t().contiguous().t() if layout == "column_major" else wide[:, :8])
    ref = torch.nn.Parameter(base.clone())
    assert not ours.is_contiguous()
    ptr, strides, spare = ours.data_ptr(), ours.stride(), wide[:, 8:].clone()
    opts = [RowSparseAdam([ours], lr=0.1), torch.optim.SparseAdam([ref], lr=0.1)]
    for ids in ([0, 5, 0], [3]):
        for p, opt in zip((ours, ref), opts, strict=True):
            p.grad = torch.sparse_coo_tensor(torch.tensor([ids]), torch.arange(8.0).repeat(len(ids), 1), (6, 8))
            opt.step()

    _assert_close(ours, ref)
    assert ours.data_ptr() == ptr and ours.stride() == strides
    assert torch.equal(wide[:, 8:], spare)


def test_unique_rows_sums_duplicates_like_coalesce() -> None:
    gen = torch.Generator().manual_seed(9)
    grad = _sparse_grad((20, 3), 1, torch.randint(0, 20, (50,), generator=gen), gen)

    ids, values = unique_rows(grad)
    ref = grad.coalesce()

    assert torch.equal(ids, ref.indices()[0])
    _assert_close(values, ref.values())
    # Already unique and increasing: passed through as they are.
    unique = _sparse_grad((20, 3), 1, torch.tensor([1, 4, 9]), gen)
    ids, values = unique_rows(unique)
    assert torch.equal(ids, torch.tensor([1, 4, 9])) and values.data_ptr() == unique._values().data_ptr()


def test_rejects_what_sparse_adam_rejects() -> None:
    with pytest.raises(ValueError, match="learning rate"):
        RowSparseAdam([torch.nn.Parameter(torch.zeros(2))], lr=0.0)
    with pytest.raises(ValueError, match="beta"):
        RowSparseAdam([torch.nn.Parameter(torch.zeros(2))], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="epsilon"):
        RowSparseAdam([torch.nn.Parameter(torch.zeros(2))], eps=0.0)
    p = torch.nn.Parameter(torch.zeros(3, 2))
    opt = RowSparseAdam([p])
    p.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="dense gradients"):
        opt.step()


def test_model_training_matches_torch_sparse_adam(schema: Schema, make_batch: Callable[..., Batch]) -> None:
    models = [build_model(schema, seed=0) for _ in range(2)]
    opts = [make_optimizers(models[0], lr=0.02, sparse_opt="sparse_adam"),
            make_optimizers(models[1], lr=0.02, sparse_opt="torch_sparse_adam")]
    assert isinstance(opts[0][1], RowSparseAdam) and type(opts[1][1]) is torch.optim.SparseAdam
    batches = [make_batch(64) for _ in range(4)]

    for batch in batches:
        for model, optimizers in zip(models, opts, strict=True):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            esmm_loss(model(batch), batch).backward()
            for opt in optimizers:
                opt.step()

    ours, ref = dict(models[0].named_parameters()), dict(models[1].named_parameters())
    for name in ours:
        torch.testing.assert_close(ours[name].detach(), ref[name].detach(), rtol=1e-4, atol=1e-5, msg=name)


def test_state_dict_moments_are_tensors_of_their_own() -> None:
    # The live moments are halves of one buffer; torch's SparseAdam, handed such a view
    # of a 1-D parameter, lost its exp_avg_sq update and corrupted the heap.
    p = torch.nn.Parameter(torch.zeros(9))
    opt = RowSparseAdam([p], lr=0.1)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[2, 5]]), torch.tensor([1.0, -2.0]), (9,))
    opt.step()
    saved = opt.state_dict()["state"][0]
    live = opt.state[p]
    for name in ("exp_avg", "exp_avg_sq"):
        assert saved[name].storage_offset() == 0
        assert saved[name].untyped_storage().data_ptr() != live[name].untyped_storage().data_ptr()
        assert torch.equal(saved[name], live[name])
    ref = torch.optim.SparseAdam([p], lr=0.1)
    ref.load_state_dict(opt.state_dict())
    before = ref.state[p]["exp_avg_sq"].clone()
    p.grad = torch.sparse_coo_tensor(torch.tensor([[2]]), torch.tensor([3.0]), (9,)).coalesce()
    ref.step()
    assert ref.state[p]["exp_avg_sq"][2] > before[2]  # the update landed
