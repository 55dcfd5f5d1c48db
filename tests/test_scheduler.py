"""The broker's rules as a pure object (no sockets, the clock passed in): credit, the bounded
queue, expiry, heartbeats, draining and redelivery. Every rule the multi-process tests prove
end to end is pinned here in-process, event by event."""

import pytest

from pipeline.protocol import wire
from pipeline.protocol.wire import Kind, Refusal
from workers.scheduler import BACKEND, FRONTEND, Scheduler, WorkerTable

LIVENESS_S = 2.0
REQ = [b"header", b"payload"]   # the scheduler routes parts, it never decodes them


def sched(max_queue=8, queue_timeout_s=1.0) -> Scheduler:
    return Scheduler(max_queue, queue_timeout_s, LIVENESS_S)


def refusal(send) -> Refusal:
    side, parts = send
    assert side == FRONTEND
    answer = wire.decode_answer(parts[1:])
    assert isinstance(answer, wire.Error)
    return answer.reason


def dispatched(sends) -> list:
    """(worker, edge) of every request sent to a worker."""
    return [(parts[0], parts[1]) for side, parts in sends if side == BACKEND and len(parts) == 4]


def test_requests_go_to_free_credit_and_balance():
    table = WorkerTable(liveness_s=2.0)
    table.ready(b"a", credit=2, now=0.0)
    table.ready(b"b", credit=2, now=0.0)
    picked = []
    for i in range(4):
        w = table.pick()
        table.dispatch(w, (b"edge", i), [b"req"])
        picked.append(w.identity)
    assert sorted(picked) == [b"a", b"a", b"b", b"b"]
    assert table.pick() is None and table.free_credit == 0  # nobody has credit: queue it
    assert table.complete(b"a", (b"edge", picked.index(b"a")))
    assert table.pick().identity == b"a"


def test_a_silent_worker_is_purged_and_its_requests_come_back_in_order():
    table = WorkerTable(liveness_s=2.0)
    table.ready(b"a", credit=4, now=0.0)
    w = table.pick()
    for i in range(3):
        table.dispatch(w, (b"edge", i), [f"req{i}".encode()])
    table.ready(b"b", credit=4, now=1.5)
    assert table.purge(now=1.9) == []           # still within liveness
    table.seen(b"b", now=3.0)
    lost = table.purge(now=2.5)                  # a: last seen at 0.0, expired at 2.0
    assert [key for key, _ in lost] == [(b"edge", 0), (b"edge", 1), (b"edge", 2)]
    assert list(table.workers) == [b"b"]
    assert not table.complete(b"a", (b"edge", 0))  # a late reply from the dead worker


def test_a_worker_that_reannounces_itself_loses_what_it_held():
    table = WorkerTable(liveness_s=2.0)
    table.ready(b"a", credit=1, now=0.0)
    table.dispatch(table.pick(), (b"e", 7), [b"r"])
    lost = table.ready(b"a", credit=1, now=1.0)  # it restarted: redeliver
    assert [key for key, _ in lost] == [(b"e", 7)] and table.free_credit == 1


def test_a_draining_worker_gets_nothing_new_and_leaves_when_empty():
    table = WorkerTable(liveness_s=2.0)
    table.ready(b"a", credit=2, now=0.0)
    table.dispatch(table.pick(), (b"e", 1), [b"r"])
    table.drain(b"a")
    assert table.pick() is None and b"a" in table.workers
    assert table.complete(b"a", (b"e", 1)) and b"a" not in table.workers


def test_ready_is_confirmed_at_once_and_queued_work_goes_to_the_new_worker():
    s = sched()
    assert s.request(b"e1", 1, REQ, now=0.0) == []           # no worker yet: queued
    sends = s.ready(b"w", credit=4, now=0.1)
    assert sends[0] == (BACKEND, [b"w"] + wire.HEARTBEAT)    # the worker's readiness
    assert dispatched(sends) == [(b"w", b"e1")] and sends[1][1][2:] == REQ
    assert s.counts.dispatched == 1 and not s.queue


def test_credit_is_never_exceeded_and_a_reply_frees_it():
    s = sched()
    s.ready(b"w", credit=2, now=0.0)
    sent = [dispatched(s.request(b"e", i, REQ, now=0.0)) for i in range(3)]
    assert sent == [[(b"w", b"e")], [(b"w", b"e")], []] and len(s.queue) == 1
    sends = s.reply(b"w", b"e", 0, b"answer", now=0.1)
    assert sends[0] == (FRONTEND, [b"e", b"answer"])         # forwarded to its edge
    assert dispatched(sends) == [(b"w", b"e")] and not s.queue


def test_a_forwarded_reply_tells_the_edge_how_loaded_the_pool_is():
    """Queued requests and free credit after the reply's credit was given out again: the
    edge's controller slows down on this before the queue fills and BUSY comes."""
    s = sched()
    s.ready(b"w", credit=1, now=0.0)
    for i in range(4):
        s.request(b"e", i, REQ, now=0.0)                     # 1 dispatched, 3 queued
    answer = wire.encode_reply(0, "w", [1], [0.9], 0, 0, 1)[0]
    forwarded = wire.decode_answer(s.reply(b"w", b"e", 0, answer, now=0.1)[0][1][1:])
    assert (forwarded.queued, forwarded.free_credit) == (2, 0)
    s.ready(b"v", credit=8, now=0.2)                         # takes the rest
    forwarded = wire.decode_answer(s.reply(b"w", b"e", 1, answer, now=0.3)[0][1][1:])
    assert (forwarded.queued, forwarded.free_credit) == (0, 7)


def test_a_shadow_goes_only_to_free_credit_and_never_waits():
    s = sched()
    assert refusal(s.request(b"e", 1, REQ, 0.0, shadow=True)[0]) == Refusal.BUSY  # no worker
    s.ready(b"w", credit=2, now=0.0)
    assert dispatched(s.request(b"e", 2, REQ, 0.0, shadow=True)) == [(b"w", b"e")]
    assert dispatched(s.request(b"e", 3, REQ, 0.0)) == [(b"w", b"e")]
    s.request(b"e", 4, REQ, 0.0)                              # a real request waits ...
    assert refusal(s.request(b"e", 5, REQ, 0.0, shadow=True)[0]) == Refusal.BUSY
    assert len(s.queue) == 1 and s.counts.shadows_refused == 2   # ... a shadow does not


def test_a_full_queue_answers_busy_at_once():
    s = sched(max_queue=2)
    assert s.request(b"e", 1, REQ, 0.0) == [] and s.request(b"e", 2, REQ, 0.0) == []
    [busy] = s.request(b"e", 3, REQ, 0.0)
    assert refusal(busy) == Refusal.BUSY and busy[1][0] == b"e"
    assert s.counts.busy == 1 and len(s.queue) == 2


def test_a_request_queued_past_its_timeout_is_answered_no_worker():
    s = sched(queue_timeout_s=1.0)
    s.request(b"e", 1, REQ, now=0.0)
    assert s.tick(now=0.9) == []
    [expired] = s.tick(now=1.1)
    assert refusal(expired) == Refusal.NO_WORKER and s.counts.expired == 1 and not s.queue


def test_a_silent_workers_requests_go_to_another_in_their_order():
    s = sched()
    s.ready(b"a", credit=8, now=0.0)
    for i in range(3):
        s.request(b"e", i, REQ, now=0.0)
    s.ready(b"b", credit=8, now=1.0)
    s.heartbeat(b"b", now=2.5)
    assert s.tick(now=1.9) == []                              # a is within its liveness
    sends = s.tick(now=2.1)                                   # a: silent since 0.0
    assert [p[2:] for side, p in sends] == [REQ] * 3
    assert dispatched(sends) == [(b"b", b"e")] * 3 and s.counts.redelivered == 3
    assert list(s.table.workers) == [b"b"]


def test_a_late_reply_from_a_dropped_worker_is_still_forwarded_and_counted():
    s = sched()
    s.ready(b"a", credit=1, now=0.0)
    s.request(b"e", 7, REQ, now=0.0)
    s.tick(now=3.0)                                           # a dropped, 7 requeued
    sends = s.reply(b"a", b"e", 7, b"late", now=3.1)
    assert sends == [(FRONTEND, [b"e", b"late"])]            # the edge drops duplicates
    assert s.counts.late_replies == 1


def test_a_heartbeat_from_an_unknown_worker_asks_it_to_announce_itself():
    s = sched()
    assert s.heartbeat(b"ghost", now=0.0) == [(BACKEND, [b"ghost"] + wire.DISCONNECT)]
    assert wire.decode_control(wire.DISCONNECT) == Kind.DISCONNECT
    s.ready(b"w", credit=1, now=0.0)
    assert s.heartbeat(b"w", now=1.9) == [] and s.tick(now=3.8) == []  # seen: still alive


def test_a_draining_worker_gets_nothing_new_and_its_answers_still_count():
    s = sched()
    s.ready(b"a", credit=4, now=0.0)
    s.request(b"e", 1, REQ, now=0.0)
    assert s.disconnect(b"a", now=0.1) == []
    assert s.request(b"e", 2, REQ, now=0.2) == [] and len(s.queue) == 1  # not to a
    assert s.reply(b"a", b"e", 1, b"ok", now=0.3) == [(FRONTEND, [b"e", b"ok"])]
    assert b"a" not in s.table.workers and s.counts.late_replies == 0


@pytest.mark.parametrize("lose", ["gone", "reannounced"])
def test_a_vanished_or_restarted_worker_loses_nothing(lose):
    s = sched()
    s.ready(b"a", credit=1, now=0.0)
    s.request(b"e", 1, REQ, now=0.0)
    s.ready(b"b", credit=1, now=0.0)
    sends = s.worker_gone(b"a", now=0.1) if lose == "gone" else s.ready(b"a", 1, now=0.1)
    assert (b"b", b"e") in dispatched(sends) or (b"a", b"e") in dispatched(sends)
    assert s.counts.redelivered == 1 and not s.queue


def test_heartbeats_go_to_every_known_worker():
    s = sched()
    s.ready(b"a", 1, 0.0)
    s.ready(b"b", 1, 0.0)
    assert s.heartbeats() == [(BACKEND, [b"a"] + wire.HEARTBEAT),
                              (BACKEND, [b"b"] + wire.HEARTBEAT)]
