"""The edge's exactly-one-answer rule as a pure object: every frame of a request is
finalized by exactly one event (answer, refusal, failed send or deadline); whatever comes
later for the same request is discarded as a duplicate and finalizes nothing."""

from dataclasses import dataclass

import numpy as np
import pytest

from pipeline.protocol.wire import MAX_MSG_ID
from pipeline.edge.inflight import InFlight, Status, reply_fault, shares
from pipeline.protocol import wire
from pipeline.protocol.wire import Refusal


@dataclass(frozen=True)
class F:
    frame_id: int


def reply(msg_id, n=2, cls=7, worker="w0"):
    return wire.Reply(msg_id, worker, np.full(n, cls, np.uint8), np.full(n, 0.9, np.float32),
                      10, 20, n)


def error(msg_id, reason=Refusal.BUSY):
    return wire.Error(msg_id, reason, "detail")


def opened(table, now=0.0, frames=2, uplink=101):
    return table.open([F(i) for i in range(frames)], [3] * frames, [0.4] * frames, uplink, now,
                      note="head-ms")


# (events after a request opens at t=0 with a 1 s deadline) -> statuses, and which path won
CASES = [
    ("answered", ["answer"], [Status.ANSWERED], "offload"),
    ("answered, then a redelivered copy", ["answer", "answer"],
     [Status.ANSWERED, Status.DUPLICATE], "offload"),
    ("late answer after the deadline", ["expire", "answer"],
     [Status.DEADLINE, Status.DUPLICATE], "fallback"),
    ("refused", ["refuse"], [Status.REFUSED], "fallback"),
    ("refusal after an answer", ["answer", "refuse"], [Status.ANSWERED, Status.DUPLICATE],
     "offload"),
    ("mis-sized answer, then the deadline", ["bad_size", "expire"],
     [Status.REJECTED, Status.DEADLINE], "fallback"),
    ("mis-sized answer, then a good one", ["bad_size", "answer"],
     [Status.REJECTED, Status.ANSWERED], "offload"),
    ("send failed", ["fail", "answer"], [Status.UNREACHABLE, Status.DUPLICATE], "fallback"),
]


@pytest.mark.parametrize("name,events,statuses,path", CASES, ids=[c[0] for c in CASES])
def test_every_frame_is_finalized_exactly_once(name, events, statuses, path):
    table = InFlight(deadline_s=1.0)
    msg_id = opened(table)
    act = {"answer": lambda: [table.answer(reply(msg_id))],
           "bad_size": lambda: [table.answer(reply(msg_id, n=3))],
           "refuse": lambda: [table.refuse(error(msg_id))],
           "fail": lambda: [table.fail(msg_id)],
           "expire": lambda: table.expire(now=1.0)}
    results = [r for event in events for r in act[event]()]
    assert [r.status for r in results] == statuses
    finals = [f for r in results for f in r.finals]
    assert sorted(f.frame.frame_id for f in finals) == [0, 1]     # each frame once
    assert {f.path for f in finals} == {path}
    assert len(table) == 0 and table.next_deadline() is None
    assert all(r.note == "head-ms" for r in results if r.finals)


def test_an_answer_carries_the_servers_classes_a_fallback_the_exits():
    table = InFlight(deadline_s=1.0)
    a, b = opened(table), opened(table)
    [f0, f1] = table.answer(reply(a, cls=9)).finals
    assert (f0.cls, f0.confidence, f0.reason) == (9, pytest.approx(0.9, abs=1e-3), None)
    r = table.refuse(error(b, Refusal.WRONG_MODEL))
    assert [(f.cls, f.reason) for f in r.finals] == [(3, "wrong_model")] * 2


def test_uplink_bytes_are_shared_over_the_frames_and_nothing_is_charged_for_a_failed_send():
    table = InFlight(deadline_s=1.0)
    sent = table.answer(reply(opened(table, uplink=101)))
    assert [f.uplink_bytes for f in sent.finals] == [51, 50]
    failed = table.fail(opened(table, uplink=101))
    assert [f.uplink_bytes for f in failed.finals] == [0, 0]
    assert shares(10, 3) == [4, 3, 3] and sum(shares(1001, 7)) == 1001


def test_deadlines_expire_in_order_and_only_when_due():
    table = InFlight(deadline_s=1.0)
    first, second = opened(table, now=0.0), opened(table, now=0.5)
    assert table.next_deadline() == 1.0 and table.expire(now=0.99) == []
    assert [r.msg_id for r in table.expire(now=1.0)] == [first]
    table.answer(reply(second))
    assert table.expire(now=9.0) == [] and table.next_deadline() is None


def test_ids_no_longer_in_flight_are_duplicates_never_given_ids_are_rejected():
    table = InFlight(deadline_s=1.0)
    for status, reason in ((Status.REJECTED, "unknown_msg_id"), (Status.DUPLICATE, None)):
        assert (table.answer(reply(99)).status, table.answer(reply(99)).reason) \
            == (status, reason)
        assert (table.refuse(error(99)).status, table.refuse(error(99)).reason) \
            == (status, reason)
        assert table.answer(reply(0)).reason == "unknown_msg_id"
        while table.next_id() <= 99:   # then 99 was given out, and answered
            table.answer(reply(opened(table)))
    ids = {opened(table) for _ in range(100)}
    assert len(ids) == 100 and table.next_id() not in ids


def test_a_wrong_sized_answer_is_rejected_and_the_request_waits_for_its_deadline():
    table = InFlight(deadline_s=1.0)
    msg_id = opened(table)
    for n in (1, 3):
        r = table.answer(reply(msg_id, n=n))
        assert (r.status, r.reason, r.finals) == (Status.REJECTED, "answer_count", ())
    assert len(table) == 1 and table.expire(now=1.0)[0].status is Status.DEADLINE


@pytest.mark.parametrize("classes,confidences,fault", [
    ([9, 0], [0.9, 0.0], None), ([9, 1], [1.0, 0.5], None),
    ([10, 1], [0.9, 0.9], "class_range"), ([200], [0.9], "class_range"),
    ([1, 2], [0.9, 1.5], "confidence_range"), ([1], [-0.25], "confidence_range"),
    ([1], [float("nan")], "confidence_range")])
def test_a_reply_naming_a_class_the_model_lacks_or_an_odd_confidence_is_faulted(
        classes, confidences, fault):
    r = wire.Reply(1, "w0", np.array(classes, np.uint8), np.array(confidences, np.float32),
                   10, 20, 1)
    assert reply_fault(r, classes=10) == fault


def test_a_request_needs_an_exit_answer_per_frame():
    with pytest.raises(ValueError):
        InFlight(deadline_s=1.0).open([F(0)], [1, 2], [0.5], 10, 0.0)
    with pytest.raises(ValueError):
        InFlight(deadline_s=0.0)


def test_msg_ids_wrap_within_the_wires_u32():
    table = InFlight(1.0)
    table._next_id = MAX_MSG_ID  # as after four billion requests
    assert table.open(["a"], [1], [0.5], 10, 0.0) == MAX_MSG_ID
    assert table.next_id() == 1 and table.open(["b"], [1], [0.5], 10, 0.0) == 1
