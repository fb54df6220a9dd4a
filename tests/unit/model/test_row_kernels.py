"""The compiled row kernels: bitwise the torch code they replace, and a clean fallback."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from adfed.data.examples import Batch, Examples
from adfed.data.schema import Schema
from adfed.model import build_model, esmm_loss, make_optimizers, row_kernels
from adfed.model.pooling import SORTED_MIN_READS, multi_hot_mean, sum_rows_by_id
from adfed.model.sparse_adam import RowSparseAdam
from data_gen.params import WorldParams, build_schema

T = TypeVar("T")

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _kernels_and_torch(monkeypatch: pytest.MonkeyPatch, run: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, T]:
    """``run(*args, **kwargs)`` with the compiled kernels, then with every caller on its torch path."""
    fast = run(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(row_kernels, "_library", lambda: None)
        return fast, run(*args, **kwargs)


def test_kernels_build_on_this_machine() -> None:
    # CI and make test run where a C compiler is; the fallback is tested below.
    assert row_kernels.available()


@pytest.mark.parametrize("num_rows", [1, 37, 2000, 300_000])  # direct table and hash table
@pytest.mark.parametrize("with_source", [False, True])
def test_sum_rows_is_bitwise_the_torch_path(num_rows: int, with_source: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(num_rows)
    for n in (0, 1, 5, 700, 9000):
        ids = torch.randint(0, num_rows, (n,), generator=gen)
        m = max(1, n // 4)
        grad = torch.randn(m if with_source else n, 7, generator=gen) * 1e3
        grad[::3] = -0.0  # signed zeros must survive as torch keeps them
        source = torch.randint(0, m, (n,), generator=gen) if with_source else None
        fast, slow = _kernels_and_torch(monkeypatch, sum_rows_by_id, ids, source, grad, num_rows, sparse=True)
        assert fast.is_coalesced() and slow.is_coalesced()
        assert torch.equal(fast._indices(), slow._indices())
        assert _same_bits(fast._values(), slow._values())
        assert torch.equal(fast._indices()[0], torch.unique(ids))


@pytest.mark.parametrize("num_rows", [1, 95, 3000])
@pytest.mark.parametrize("with_source", [False, True])
def test_dense_table_gradient_is_bitwise_index_add(num_rows: int, with_source: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(num_rows + 1)
    for n in (0, 3, 2048, 9000):
        ids = torch.randint(0, num_rows, (n,), generator=gen)
        m = max(1, n // 4)
        grad = torch.randn(m if with_source else n, 16, generator=gen) * 1e3
        source = torch.randint(0, m, (n,), generator=gen) if with_source else None
        fast, slow = _kernels_and_torch(monkeypatch, sum_rows_by_id, ids, source, grad, num_rows, sparse=False)
        assert _same_bits(fast, slow)


def test_dense_table_gradient_rejects_bad_ids() -> None:
    with pytest.raises(IndexError, match="index 7 is out of bounds for a table of 5 rows"):
        row_kernels.index_add(torch.tensor([0, 7, 1]), None, torch.ones(3, 2), 5)


def _adam_run(seed: int, *, maximize: bool, width: int, duplicates: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rows = 300
    p = torch.nn.Parameter(torch.randn(rows, width, generator=gen))
    q = torch.nn.Parameter(torch.randn(rows, width, generator=gen))
    opt = RowSparseAdam([{"params": [p]}, {"params": [q], "lr": 0.003}], lr=0.05, maximize=maximize)
    for step in range(5):
        n = int(torch.randint(1, 900, (1,), generator=gen))
        ids = torch.randint(0, rows, (n,), generator=gen)
        if not duplicates:
            ids = ids.unique()  # strictly increasing: used as they are
        scale = 10.0 ** float(torch.randint(-6, 3, (1,), generator=gen))
        values = torch.randn(ids.shape[0], width, generator=gen) * scale
        p.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), values, (rows, width))
        q.grad = None if step == 2 else torch.sparse_coo_tensor(ids.flip(0).unsqueeze(0), values, (rows, width))
        opt.step()
    return [t.detach().clone() for t in (p, q, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"],
                                          opt.state[q]["exp_avg"], opt.state[q]["exp_avg_sq"])]


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("width", [1, 2, 16, 5])
@pytest.mark.parametrize("duplicates", [False, True])
def test_sparse_adam_is_bitwise_the_torch_path(
    maximize: bool, width: int, duplicates: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for seed in range(4):
        fast, slow = _kernels_and_torch(monkeypatch, _adam_run, seed, maximize=maximize, width=width, duplicates=duplicates)
        assert all(_same_bits(a, b) for a, b in zip(fast, slow, strict=True))


def _train(schema_batch: tuple[Schema, Batch], steps: int = 3) -> dict[str, torch.Tensor]:
    schema, batch = schema_batch
    model = build_model(schema, seed=0)
    opts = make_optimizers(model, lr=0.01, sparse_lr=0.05, local_lr=0.02)
    for _ in range(steps):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        esmm_loss(model(batch), batch).backward()
        for opt in opts:
            opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def big_batch(make_examples: Callable[..., Examples]) -> tuple[Schema, Batch]:
    """The synthetic world's schema and a batch big enough that the bag table's gradient
    takes the sorted (kernel) path."""
    schema = build_schema(WorldParams(num_users=500, num_ads=300))
    batch = make_examples(schema, 1024).to_batch()
    assert batch.bags["app_usage"][0].shape[0] >= SORTED_MIN_READS
    return schema, batch


def test_training_steps_are_bitwise_the_same_without_kernels(big_batch: tuple[Schema, Batch], monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow = _kernels_and_torch(monkeypatch, _train, big_batch)
    assert fast.keys() == slow.keys()
    assert all(_same_bits(fast[k], slow[k]) for k in fast)


def test_unfit_tensors_take_the_torch_path() -> None:
    ids = torch.tensor([3, 1, 3])
    assert row_kernels.sum_rows(ids, None, torch.ones(3, 2, dtype=torch.float64), 4) is None
    assert row_kernels.sum_rows(ids.int(), None, torch.ones(3, 2), 4) is None
    p, moments = torch.zeros(4, 2), torch.zeros(2, 4, 2)
    kw = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "step_size": 0.1, "maximize": False}
    assert not row_kernels.sparse_adam(ids, torch.ones(3, 2).t().contiguous().t(), p, moments, **kw)
    assert torch.count_nonzero(p) == 0 and torch.count_nonzero(moments) == 0
    assert row_kernels.sparse_adam(ids, torch.ones(3, 2), p, moments, **kw)
    assert torch.count_nonzero(p[[1, 3]]) == 4 and torch.count_nonzero(p[[0, 2]]) == 0


def _probe(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = ("import logging; logging.basicConfig(level=logging.WARNING)\n"
            "from adfed.model import row_kernels\nprint(row_kernels.available())")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_switch_and_missing_compiler_fall_back_with_one_warning(tmp_path: Path) -> None:
    import os

    base = {**os.environ, "ADFED_KERNEL_CACHE": str(tmp_path / "cache")}
    off = _probe({**base, "ADFED_ROW_KERNELS": "0"})
    assert off.stdout.strip() == "False" and "unavailable" not in off.stderr  # asked for: no warning
    missing = _probe({**base, "CC": str(tmp_path / "no-such-cc")})
    assert missing.stdout.strip() == "False"
    assert missing.stderr.count("compiled row kernels unavailable") == 1
    assert "no-such-cc" in missing.stderr
    built = _probe(base)
    assert built.stdout.strip() == "True", built.stderr
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".so"]  # no temporary files left


def test_a_failing_compile_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'error: broken compiler' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    monkeypatch.setenv("ADFED_KERNEL_CACHE", str(tmp_path / "cache"))
    row_kernels._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="adfed.model.row_kernels"):
            assert not row_kernels.available()
        assert "broken compiler" in caplog.text
        assert list((tmp_path / "cache").iterdir()) == []  # the failed build left nothing
    finally:
        row_kernels._library.cache_clear()


def _multi_hot(values: torch.Tensor, lengths: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.clone().requires_grad_(True)
    offsets = torch.cumsum(lengths, 0) - lengths
    out = multi_hot_mean(values, offsets, w, lengths=lengths)
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()).sum().backward()
    assert w.grad is not None
    return out.detach(), w.grad


def test_multi_hot_counts_are_bitwise_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(5)
    for rows, max_len in ((1, 3), (48, 25), (64, 7)):
        lengths = torch.randint(0, max_len + 1, (300,), generator=gen)
        lengths[:3] = 0  # empty bags pool to zeros
        values = torch.randint(0, rows, (int(lengths.sum()),), generator=gen)
        weight = torch.randn(rows, 16, generator=gen)
        fast, slow = _kernels_and_torch(monkeypatch, _multi_hot, values, lengths, weight)
        assert all(_same_bits(a, b) for a, b in zip(fast, slow, strict=True))
        assert torch.count_nonzero(fast[0][:3]) == 0


def test_multi_hot_counts_reject_bad_ids_and_lengths() -> None:
    weight = torch.randn(5, 4)
    lengths = torch.tensor([2, 1])
    with pytest.raises(IndexError, match=r"ids must lie in \[0, 5\); got \[0, 5\]"):
        multi_hot_mean(torch.tensor([0, 5, 1]), torch.tensor([0, 2]), weight, lengths=lengths)
    with pytest.raises(IndexError, match=r"got \[-1, 2\]"):
        multi_hot_mean(torch.tensor([2, 1, -1]), torch.tensor([0, 2]), weight, lengths=lengths)
    with pytest.raises(ValueError, match="add up to the 3 ids"):
        row_kernels.bag_counts(torch.tensor([0, 1, 2]), torch.tensor([2, 2]), 5)
    with pytest.raises(ValueError, match="add up to the 3 ids"):
        row_kernels.bag_counts(torch.tensor([0, 1, 2]), torch.tensor([4, -1]), 5)


def test_out_of_range_rows_raise_instead_of_writing_outside_the_table() -> None:
    # torch's path raises (index_select); the C loops must not index past the table.
    with pytest.raises(IndexError, match=r"row ids must lie in \[0, 5\); got \[0, 9\]"):
        row_kernels.sum_rows(torch.tensor([0, 9, 1]), None, torch.ones(3, 2), 5)
    p, moments = torch.zeros(5, 2), torch.zeros(2, 5, 2)
    kw = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "step_size": 0.1, "maximize": False}
    for rows in ([1, 3, 5], [-1, 2, 3], [4, 1, 7]):  # increasing (last, first bad) and unordered
        with pytest.raises(IndexError, match=r"row ids must lie in \[0, 5\)"):
            row_kernels.sparse_adam(torch.tensor(rows), torch.ones(3, 2), p, moments, **kw)
    assert torch.count_nonzero(p) == 0 and torch.count_nonzero(moments) == 0


def test_reads_outside_the_source_rows_raise_instead_of_reading_past_the_buffer() -> None:
    # found by a review: the C loops read src[source[j]] and src[j] unchecked
    src, ids = torch.ones(3, 2), torch.tensor([0, 1])
    for kernel in (row_kernels.sum_rows, row_kernels.index_add):
        with pytest.raises(IndexError, match=r"source rows must lie in \[0, 3\); got \[0, 5000\]"):
            kernel(ids, torch.tensor([0, 5000]), src, 4)
        with pytest.raises(IndexError, match=r"source rows must lie in \[0, 3\); got \[-1, 0\]"):
            kernel(ids, torch.tensor([-1, 0]), src, 4)
        with pytest.raises(ValueError, match=r"source must be shaped like ids \(2,\); got \(3,\)"):
            kernel(ids, torch.tensor([0, 1, 2]), src, 4)
        with pytest.raises(ValueError, match=r"src has 3 rows for 4 ids"):
            kernel(torch.tensor([0, 1, 2, 3]), None, src, 4)
        with pytest.raises(ValueError, match=r"ids must be 1-d"):
            kernel(torch.zeros(2, 2, dtype=torch.int64), None, torch.ones(4, 2), 4)
    p, moments = torch.zeros(5, 2), torch.zeros(2, 5, 2)
    kw = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "step_size": 0.1, "maximize": False}
    for rows, values, mom in (([1, 3], torch.ones(3, 2), moments), ([1, 3, 4], torch.ones(3, 3), moments),
                              ([1, 3, 4], torch.ones(3, 2), torch.zeros(2, 4, 2))):
        with pytest.raises(ValueError, match=r"sparse_adam needs rows \[n\], values \[n, r\]"):
            row_kernels.sparse_adam(torch.tensor(rows), values, p, mom, **kw)
    assert torch.count_nonzero(p) == 0 and torch.count_nonzero(moments) == 0


def test_bag_matches_is_the_torch_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from adfed.model.layers import VocabMatch, _bag_matches

    gen = torch.Generator().manual_seed(5)
    for n in (0, 1, 300):
        lengths = torch.randint(0, 6, (n,), generator=gen)
        values = torch.randint(0, 4, (int(lengths.sum()),), generator=gen)
        ids = torch.randint(0, 4, (n,), generator=gen)
        fast = row_kernels.bag_matches(values, lengths, ids)
        assert fast is not None and torch.equal(fast, _bag_matches(values, lengths, ids))
    assert row_kernels.bag_matches(torch.tensor([2, 2, 1]), torch.tensor([2, 1]), torch.tensor([2, 1])).tolist() == [2, 1]
    with pytest.raises(ValueError, match="add up"):
        row_kernels.bag_matches(torch.tensor([2, 2, 1]), torch.tensor([2, 2]), torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="one id per bag"):
        row_kernels.bag_matches(torch.tensor([2, 2, 1]), torch.tensor([2, 1]), torch.tensor([2]))
    assert row_kernels.bag_matches(torch.tensor([2]), torch.tensor([1]), torch.tensor([2], dtype=torch.int32)) is None
    assert VocabMatch.pairs_of([]) == []
