"""The server's round state machine, its async buffer, and its aggregation step."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from adfed.config import Config
from adfed.fl import aggregators, pipeline, server, strategies
from adfed.fl.server import Counts, Phase, RoundRules, ServerState, SyncRound
from adfed.fl.types import GlobalState, SparseRows, Update
from adfed.fl.window import WindowState
from adfed.fl.wire import Envelope, WireSpec, encode_update

DENSE = {"w": torch.zeros(3, 2), "b": torch.zeros(3)}
TABLES = {"ad": torch.zeros(10, 4)}
SPEC = WireSpec.of(DENSE, TABLES)
PIPE = pipeline.build(Config())


def _state(deadline: float = 10.0, version: int = 4, rnd: int = 7) -> ServerState:
    return ServerState(model=GlobalState(dense=DENSE, sparse=TABLES, version=version), opt_state={},
                       window=WindowState(deadline_s=deadline), round=rnd)


def _payload(client: int, *, rnd: int = 8, version: int = 4, n: int = 5, value: float = 1.0,
             codec: str = "identity") -> bytes:
    ids = torch.tensor([1, client % 10]).unique()
    update = Update(client_id=client, dense={k: torch.full_like(v, float(value)) for k, v in DENSE.items()},
                    sparse={"ad": SparseRows(ids, torch.full((len(ids), 4), float(value)))},
                    num_examples=n, base_version=version, metrics={"loss": 0.5})
    return encode_update(update, Envelope("update", rnd, version, codec, client))


def _open(target: int = 3, min_clients: int = 2, retries: int = 1, deadline: float = 10.0) -> SyncRound:
    rnd = server.open_round(_state(deadline), RoundRules(target, min_clients, retries), PIPE.codec)
    return server.offer(rnd, [11, 12, 13, 14, 15])


# -- the sync round --------------------------------------------------------------------------

def test_open_round_offers_the_next_round_and_current_model() -> None:
    rnd = _open()
    assert rnd.expect == server.Expected(round=8, model_version=4, codec="identity")
    assert rnd.phase is Phase.OPEN and rnd.counts.selected == 5 and rnd.pending == {11, 12, 13, 14, 15}
    assert rnd.offered == (11, 12, 13, 14, 15)


def test_round_closes_at_the_target_count_and_later_uploads_are_late() -> None:
    # Prepare
    rnd = _open(target=3)

    # Execute
    for t, c in enumerate([11, 12, 13, 14], start=1):
        rnd = server.accept(rnd, c, _payload(c), float(t), SPEC, PIPE)

    # Assert
    assert rnd.phase is Phase.CLOSED and rnd.end_s == 3.0
    assert [u.update.client_id for u in rnd.uploads] == [11, 12, 13]
    assert rnd.counts.late == 1 and rnd.arrivals_s == (1.0, 2.0, 3.0, 4.0)


def test_a_random_take_waits_for_the_deadline_and_keeps_a_random_target_of_the_on_time() -> None:
    # Prepare: target 3 of 5 offered, uploads at 1..4 s, the deadline at 10 s
    rnd = server.open_round(_state(10.0), RoundRules(3, 2, 1, take_random=True), PIPE.codec)
    rnd = server.offer(rnd, [11, 12, 13, 14, 15])

    # Execute
    for t, c in enumerate([11, 12, 13, 14], start=1):
        rnd = server.accept(rnd, c, _payload(c), float(t), SPEC, PIPE)
    still_open = rnd.phase
    rnd = server.expire(rnd, 11.0)
    taken = {s: server.take_random(rnd, np.random.default_rng(s)) for s in range(20)}

    # Assert: not closed at the 3rd upload; 3 of the 4 on-time ones kept, which ones by the rng
    assert still_open is Phase.OPEN and rnd.phase is Phase.CLOSED and rnd.end_s == 10.0
    for t in taken.values():
        kept = [u.update.client_id for u in t.uploads]
        assert len(kept) == 3 and set(kept) <= {11, 12, 13, 14} and kept == sorted(kept)
        assert t.counts.surplus == 1 and t.counts.late == 0
    assert len({tuple(u.update.client_id for u in t.uploads) for t in taken.values()}) > 1


def test_take_random_leaves_a_first_k_round_and_a_short_one_alone() -> None:
    first = _open(target=3)
    for t, c in enumerate([11, 12, 13], start=1):
        first = server.accept(first, c, _payload(c), float(t), SPEC, PIPE)
    short = server.open_round(_state(10.0), RoundRules(3, 1, 1, take_random=True), PIPE.codec)
    short = server.offer(short, [11, 12])
    for t, c in enumerate([11, 12], start=1):
        short = server.accept(short, c, _payload(c), float(t), SPEC, PIPE)
    rng = np.random.default_rng(0)
    assert server.take_random(first, rng) == first and server.take_random(short, rng) == short


def test_a_late_upload_comes_in_the_next_round_stale_by_one_and_counts_there() -> None:
    # Prepare: round 8 (model 4) made client 14's upload; round 9 (model 5) is open
    late = server.Late(client=14, payload=_payload(14, rnd=8, version=4), expect=server.Expected(8, 4, "identity"),
                       after_s=0.5)
    rnd = server.open_round(_state(10.0, version=5, rnd=8), RoundRules(3, 2, 1), PIPE.codec)
    rnd = server.offer(rnd, [11, 12, 13])

    # Execute
    rnd = server.accept_late(rnd, late, SPEC, PIPE)
    for t, c in enumerate([12, 11], start=1):
        rnd = server.accept(rnd, c, _payload(c, rnd=9, version=5), float(t), SPEC, PIPE)

    # Assert: it counted towards the target (closed at 3 uploads, 13 still pending is late
    # when it comes), weighs as one version stale, comes first in the aggregation order
    assert rnd.phase is Phase.CLOSED and rnd.end_s == 2.0 and rnd.pending == {13}
    assert [(u.update.client_id, u.staleness) for u in server.uploads_in_offer_order(rnd)] == [(14, 1), (11, 0), (12, 0)]
    assert rnd.arrivals_s == (1.0, 2.0)  # its time was the window's in its own round
    assert server.finish(rnd).counts == Counts(selected=3, arrived=2, carried=1)


def test_a_late_upload_after_the_next_round_closed_or_foreign_is_left_out() -> None:
    late = server.Late(client=14, payload=_payload(14, rnd=8, version=4), expect=server.Expected(8, 4, "identity"),
                       after_s=12.0)
    rnd = server.offer(server.open_round(_state(10.0, version=5, rnd=8), RoundRules(3, 2, 1), PIPE.codec), [11])
    gone = server.accept_late(rnd, late, SPEC, PIPE)
    assert gone.phase is Phase.CLOSED and gone.uploads == ()  # past this round's deadline
    forged = dataclasses.replace(late, after_s=1.0, expect=server.Expected(7, 3, "identity"))
    assert server.accept_late(rnd, forged, SPEC, PIPE).uploads == ()  # not the round it names


def test_round_closes_at_the_deadline_when_an_upload_comes_after_it() -> None:
    # Prepare
    rnd = _open(target=5, deadline=10.0)

    # Execute
    rnd = server.accept(rnd, 11, _payload(11), 4.0, SPEC, PIPE)
    rnd = server.accept(rnd, 12, _payload(12), 10.0, SPEC, PIPE)  # on the deadline: on time
    rnd = server.accept(rnd, 13, _payload(13), 10.5, SPEC, PIPE)

    # Assert
    assert rnd.phase is Phase.CLOSED and rnd.end_s == 10.0
    assert len(rnd.uploads) == 2 and rnd.counts.late == 1


def test_round_closes_when_nobody_is_left_pending() -> None:
    # Prepare: two of five drop out, the other three arrive on time
    rnd = server.drop(server.drop(_open(target=5), 14), 15)

    # Execute
    for t, c in enumerate([11, 12, 13], start=1):
        rnd = server.accept(rnd, c, _payload(c), float(t), SPEC, PIPE)

    # Assert
    assert rnd.phase is Phase.CLOSED and rnd.end_s == 3.0 and rnd.counts.failed == 2


def test_expire_closes_at_the_deadline_and_a_window_of_none_never_expires() -> None:
    assert server.expire(_open(deadline=5.0), 6.0).end_s == 5.0
    assert server.expire(_open(deadline=5.0), 4.0).phase is Phase.OPEN
    assert server.expire(_open(deadline=math.inf), 1e12).phase is Phase.OPEN


@pytest.mark.parametrize(("payload", "why"), [
    (b"not a payload", "malformed"),
    (_payload(11, rnd=7), "another round"),
    (_payload(11, version=3), "another model"),
    (_payload(12), "names another client"),
    (_payload(11, value=float("nan")), "non-finite"),
])
def test_an_invalid_upload_is_rejected_and_counted_not_aggregated(payload: bytes, why: str) -> None:
    # Execute
    rnd = server.accept(_open(), 11, payload, 1.0, SPEC, PIPE)

    # Assert
    assert rnd.counts.rejected == 1, why
    assert rnd.uploads == () and 11 not in rnd.pending


def test_an_upload_of_another_pipeline_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = dataclasses.replace(_open(), expect=server.Expected(round=8, model_version=4, codec="identity+other"))
    rnd = server.accept(rnd, 11, _payload(11), 1.0, SPEC, PIPE)
    assert rnd.counts.rejected == 1


def test_an_upload_from_a_client_without_an_offer_is_ignored() -> None:
    rnd = server.accept(_open(), 99, _payload(99), 1.0, SPEC, PIPE)
    assert rnd.uploads == () and rnd.counts == Counts(selected=5)


def test_too_few_uploads_retry_then_give_up_with_every_client_counted_once() -> None:
    # Prepare: min 2, one retry; each attempt gets one upload and four drop-outs
    rnd = _open(target=3, min_clients=2, retries=1)
    outcomes = []

    # Execute
    for attempt in range(2):
        if attempt:
            rnd = server.offer(server.retry(rnd, 20.0), [21, 22, 23, 24, 25])
        first, *rest = rnd.offered
        for c in rest:
            rnd = server.drop(rnd, c)
        rnd = server.accept(rnd, first, _payload(first), 1.0, SPEC, PIPE)
        outcomes.append((server.enough(rnd), server.can_retry(rnd)))
        rnd = server.discard(rnd)

    # Assert
    assert outcomes == [(False, True), (False, False)]
    c = rnd.counts
    assert (c.selected, c.failed, c.discarded, c.retries, c.arrived) == (10, 8, 2, 2, 0)
    assert c.selected == c.failed + c.late + c.arrived + c.discarded + c.rejected + c.surplus
    assert rnd.deadline_s == 20.0 and rnd.attempt == 1


def test_transitions_refuse_the_wrong_phase() -> None:
    with pytest.raises(ValueError, match="round 8 is closed; cannot close it"):
        server.close(server.close(_open(), 1.0), 2.0)
    with pytest.raises(ValueError, match="round 8 is open; cannot retry it"):
        server.retry(_open(), 1.0)
    with pytest.raises(ValueError, match="discard the closed attempt's uploads first"):
        server.retry(_closed_with_uploads(), 1.0)


def _closed_with_uploads() -> SyncRound:
    rnd = _open(target=1)
    return server.accept(rnd, 11, _payload(11), 1.0, SPEC, PIPE)


def test_aggregation_order_is_the_offer_order_whatever_the_arrival_order() -> None:
    # Prepare: the same uploads arriving in two orders
    a, b = _open(target=5), _open(target=5)
    for t, c in enumerate([15, 11, 13]):
        a = server.accept(a, c, _payload(c, value=c), float(t), SPEC, PIPE)
    for t, c in enumerate([11, 13, 15]):
        b = server.accept(b, c, _payload(c, value=c), float(t), SPEC, PIPE)

    # Assert
    assert [u.client_id for u in server.updates_in_offer_order(a)] == [11, 13, 15]
    assert [u.client_id for u in server.updates_in_offer_order(b)] == [11, 13, 15]


def test_the_machine_never_mutates_its_input() -> None:
    rnd = _open()
    before = dataclasses.replace(rnd)
    server.accept(rnd, 11, _payload(11), 1.0, SPEC, PIPE)
    server.drop(rnd, 12)
    assert rnd == before


# -- aggregation -----------------------------------------------------------------------------

def test_aggregate_applies_the_mean_and_bumps_the_version() -> None:
    # Prepare
    rnd = _open(target=2)
    rnd = server.accept(rnd, 11, _payload(11, value=1.0, n=10), 1.0, SPEC, PIPE)
    rnd = server.accept(rnd, 12, _payload(12, value=3.0, n=30), 2.0, SPEC, PIPE)
    updates = server.updates_in_offer_order(server.finish(rnd))
    weights = server.server_weights([u.num_examples for u in updates], 200.0)
    agg = aggregators.build(Config(), aggregators.BuildContext(spec=SPEC, population=10))

    # Execute
    new, _ = server.aggregate(_state(), updates, weights, agg, strategies.create("fedavg", 1.0),
                              np.random.default_rng(0), step=8)

    # Assert: dense mean (10 x 1 + 30 x 3) / 40 = 2.5; row 1 touched by both, rows 1 and 2 by one
    assert new.model.version == 5
    torch.testing.assert_close(new.model.dense["w"], torch.full((3, 2), 2.5))
    assert new.model.sparse["ad"][1].tolist() == [2.5] * 4  # "all": sum over every client's weight
    assert new.model.sparse["ad"][2].tolist() == [90 / 40] * 4
    assert torch.equal(TABLES["ad"], torch.zeros(10, 4))  # the old state is untouched


def test_aggregate_of_nothing_only_steps_the_version() -> None:
    new, stats = server.aggregate(_state(), [], np.zeros(0), aggregators.create("mean", Config()),
                                  strategies.create("fedavg", 1.0), np.random.default_rng(0), step=8)
    assert stats == {}
    assert new.model.version == 5 and new.model.dense is DENSE


def test_the_released_model_is_a_warmed_up_moving_average_of_the_models() -> None:
    # Prepare: three server steps whose models hold 1, 2 and 4 everywhere (versions 5-7)
    def stepped(state: ServerState, value: float) -> ServerState:
        g = state.model
        model = GlobalState(dense={k: torch.full_like(v, value) for k, v in g.dense.items()},
                            sparse={k: torch.full_like(v, value) for k, v in g.sparse.items()}, version=g.version + 1)
        return server.averaged(dataclasses.replace(state, model=model), 0.5)

    # Execute
    s1 = stepped(_state(), 1.0)
    s2 = stepped(s1, 2.0)
    s3 = stepped(s2, 4.0)

    # Assert: the first step starts the average at the model; version 6 moves it by
    # 1 - min(0.5, 7 / 16) = 0.5625, version 7 by 1 - min(0.5, 8 / 17) = 0.5294...
    assert s1.released is s1.average and torch.equal(s1.released.dense["w"], torch.ones(3, 2))
    a2 = 1 + (1 - 7 / 16) * (2 - 1)
    a3 = a2 + (1 - 8 / 17) * (4 - a2)
    torch.testing.assert_close(s2.released.dense["b"], torch.full((3,), a2))
    torch.testing.assert_close(s3.released.sparse["ad"], torch.full((10, 4), a3))
    assert s3.released.version == 7 and s3.model.dense["w"][0, 0] == 4.0  # training goes on from the model
    assert torch.equal(s1.released.dense["w"], torch.ones(3, 2))  # each state's average is its own
    assert server.averaged(_state(), 0.0).average is None  # decay 0: no average


def test_aggregate_moves_the_average_also_when_nothing_arrived() -> None:
    # Prepare
    agg, opt = aggregators.create("mean", Config()), strategies.create("fedavg", 1.0)

    # Execute
    off, _ = server.aggregate(_state(), [], np.zeros(0), agg, opt, np.random.default_rng(0), step=8)
    on, _ = server.aggregate(_state(), [], np.zeros(0), agg, opt, np.random.default_rng(0), step=8, average=0.9)

    # Assert
    assert off.average is None and off.released is off.model
    assert on.average is not None and on.average.version == 5 and torch.equal(on.released.dense["w"], DENSE["w"])


def test_torch_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    with server.torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


# -- the async buffer ------------------------------------------------------------------------

def test_buffer_takes_staleness_drops_too_stale_and_rejects_newer() -> None:
    # Prepare: server at version 10, max staleness 3
    buf = server.Buffer(size=3, max_staleness=3, codec="identity")

    # Execute
    buf = server.buffer_accept(buf, _payload(1, rnd=8, version=10), 1.0, SPEC, PIPE, 10)
    buf = server.buffer_accept(buf, _payload(2, rnd=8, version=7), 2.0, SPEC, PIPE, 10)
    buf = server.buffer_accept(buf, _payload(3, rnd=8, version=6), 3.0, SPEC, PIPE, 10)  # s = 4 > 3
    buf = server.buffer_accept(buf, _payload(4, rnd=8, version=11), 4.0, SPEC, PIPE, 10)  # from the future

    # Assert
    assert buf.staleness == (0, 3) and buf.stale == 1 and buf.rejected == 1 and not buf.full
    np.testing.assert_allclose(server.buffer_weights(buf, 200.0), [5.0, 5.0 / 2.0])
    assert server.drain(buf).uploads == () and server.drain(buf).stale == 1
