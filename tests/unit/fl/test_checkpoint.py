"""The federated checkpoint: safetensors + JSON, no pickle, exact round trip."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from adfed.errors import ConfigError
from adfed.fl import checkpoint
from adfed.fl.checkpoint import Checkpoint
from adfed.fl.fedbuff import AsyncState, Event, Started
from adfed.fl.population import LocalStore
from adfed.fl.server import ServerState
from adfed.fl.types import GlobalState, Passes
from adfed.fl.window import WindowState


def _checkpoint() -> Checkpoint:
    g = torch.Generator().manual_seed(0)
    model = GlobalState(dense={"towers.0.weight": torch.randn(3, 2, generator=g)},
                        sparse={"emb.ad": torch.randn(5, 4, generator=g)}, version=9)
    opt = {"m": {"towers.0.weight": torch.randn(3, 2, generator=g)},
           "v": {"towers.0.weight": torch.rand(3, 2, generator=g)}}
    average = GlobalState(dense={"towers.0.weight": torch.randn(3, 2, generator=g)},
                          sparse={"emb.ad": torch.randn(5, 4, generator=g)}, version=9)
    state = ServerState(model=model, opt_state=opt, round=9, sim_time_s=12.5,
                        window=WindowState(deadline_s=math.inf, history=((1.0, 2.5), (3.0,))), average=average,
                        passes=Passes(number=2, cursor=17, deferred=np.array([5, 3, 8], dtype=np.int64)))
    phone = {"user_emb.weight": torch.randn(1, 4, generator=g), "user_bias.weight": torch.randn(1, 1, generator=g)}
    entries = collections.OrderedDict([(7, phone), (3, {**phone, "pipeline/ef/residual": torch.ones(2)})])
    events = (Event(1.5, 4, 11, b"\x00payload\xff", phone, 321), Event(2.0, 5, 12))
    st = AsyncState(clock_s=1.25, seq=6, events=events, pending=(Started(1.0, 3, 13),), failed=2)
    rows = [{"round": 9, "auc": float("nan"), "arrived": 10}]
    return Checkpoint(state=state, rows=rows, async_state=st, store=LocalStore(capacity=50, entries=entries, evicted=4),
                      wall_s=3.5, settings={"seed": 0, "fl.strategy": "fedadam"})


def test_round_trip_is_exact(tmp_path: Path) -> None:
    # Prepare
    ck = _checkpoint()

    # Execute
    checkpoint.save(tmp_path, ck)
    back = checkpoint.load(tmp_path / checkpoint.CHECKPOINT)

    # Assert
    s, b = ck.state, back.state
    assert (b.round, b.sim_time_s, b.model.version, b.window) == (s.round, s.sim_time_s, s.model.version, s.window)
    for part in ("dense", "sparse"):
        for k, v in getattr(s.model, part).items():
            assert torch.equal(getattr(b.model, part)[k], v)
    assert torch.equal(b.opt_state["v"]["towers.0.weight"], s.opt_state["v"]["towers.0.weight"])
    assert b.passes is not None and (b.passes.number, b.passes.cursor, b.passes.deferred.tolist()) == (2, 17, [5, 3, 8])
    assert b.average is not None and s.average is not None and b.average.version == 9
    assert torch.equal(b.average.dense["towers.0.weight"], s.average.dense["towers.0.weight"])
    assert torch.equal(b.average.sparse["emb.ad"], s.average.sparse["emb.ad"])
    assert list(back.store.entries) == [7, 3] and back.store.evicted == 4 and back.store.capacity == 50
    assert torch.equal(back.store.entries[3]["pipeline/ef/residual"], torch.ones(2))
    assert set(back.store.entries[7]) == {"user_emb.weight", "user_bias.weight"}
    e0, e1 = back.async_state.events
    assert e0.payload == b"\x00payload\xff" and e0.bytes_down == 321 and torch.equal(
        e0.phone["user_emb.weight"], ck.store.entries[7]["user_emb.weight"])
    assert e1.payload is None and e1.phone is None
    assert back.async_state.pending == ck.async_state.pending and back.async_state.failed == 2
    assert math.isnan(back.rows[0]["auc"]) and back.rows[0]["arrived"] == 10
    assert back.settings == ck.settings and back.wall_s == 3.5


def test_the_file_is_safetensors_with_no_pickle(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    checkpoint.save(tmp_path, _checkpoint())
    tensors = load_file(tmp_path / checkpoint.CHECKPOINT)  # a plain safetensors reader opens it
    assert "dense/towers.0.weight" in tensors and "store/order" in tensors
    assert not (tmp_path / (checkpoint.CHECKPOINT + ".tmp")).exists()


@pytest.mark.parametrize("damage", [b"", b"garbage" * 10, None])
def test_a_damaged_file_is_a_one_line_config_error(tmp_path: Path, damage: bytes | None) -> None:
    checkpoint.save(tmp_path, _checkpoint())
    path = tmp_path / checkpoint.CHECKPOINT
    path.write_bytes(path.read_bytes()[:200] if damage is None else damage)
    with pytest.raises(ConfigError, match=r"--resume: .* is not a readable adfed checkpoint .*; start a new run"):
        checkpoint.load(path)


def test_the_checkpoint_benchmark_packs_incrementally_what_a_full_read_packs() -> None:
    # the benchmark asserts that its incremental pack equals a full one on every round
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[3] / "benchmarks" / "bench_checkpoint.py"
    spec = importlib.util.spec_from_file_location("bench_checkpoint", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    result = bench.measure(phones=500, changed=40, rounds=3, dim=4, seed=1)

    assert result["phones"] == 500 and result["full_ms"] > 0 and result["incremental_ms"] > 0
