"""The broker's rules as a pure object (no sockets, the clock passed in): credit, the bounded
queue, expiry, heartbeats, draining and redelivery, and what hostile peers cannot do (forge
answers, hold requests forever, pin memory, reuse a msg_id). Every rule the multi-process
tests prove end to end is pinned here in-process, event by event."""

import pytest

from pipeline.protocol import wire
from pipeline.protocol.wire import Kind, Refusal
from workers.config import MAX_CREDIT, START_CREDIT
from workers.scheduler import BACKEND, FRONTEND, Request, Scheduler, WorkerTable

LIVENESS_S = 2.0
REQ = [b"header", b"payload"]   # the scheduler routes parts, it never decodes them


def sched(max_queue=8, queue_timeout_s=1.0, max_held_bytes=1 << 20) -> Scheduler:
    return Scheduler(max_queue, queue_timeout_s, LIVENESS_S, max_held_bytes)


def req(i: int, edge: bytes = b"edge", parts=(b"req",)) -> Request:
    return Request(edge, i, list(parts), since=0.0, size=3)


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
        table.dispatch(w, req(i), now=0.0)
        picked.append(w.identity)
    assert sorted(picked) == [b"a", b"a", b"b", b"b"]
    assert table.pick() is None and table.free_credit == 0  # nobody has credit: queue it
    assert table.answer(b"a", (b"edge", picked.index(b"a")), now=0.1) is None  # it held it
    assert table.pick().identity == b"a"


def test_a_silent_worker_is_purged_and_its_requests_come_back_in_order():
    table = WorkerTable(liveness_s=2.0)
    table.ready(b"a", credit=4, now=0.0)
    w = table.pick()
    for i in range(3):
        table.dispatch(w, req(i), now=0.0)
    table.ready(b"b", credit=4, now=1.5)
    assert table.purge(now=1.9) == []           # still within liveness
    table.seen(b"b", now=3.0)
    lost = table.purge(now=2.5)                  # a: last seen at 0.0, expired at 2.0
    assert [r.key for r in lost] == [(b"edge", 0), (b"edge", 1), (b"edge", 2)]
    assert list(table.workers) == [b"b"]
    assert table.answer(b"a", (b"edge", 0), now=2.6) == "unknown_worker"  # the dead one


def test_a_worker_that_reannounces_itself_loses_what_it_held():
    table = WorkerTable(liveness_s=2.0)
    table.ready(b"a", credit=1, now=0.0)
    table.dispatch(table.pick(), req(7, b"e"), now=0.0)
    lost = table.ready(b"a", credit=1, now=1.0)  # it restarted: redeliver
    assert [r.key for r in lost] == [(b"e", 7)] and table.free_credit == 1


def test_a_draining_worker_gets_nothing_new_and_leaves_when_empty():
    table = WorkerTable(liveness_s=2.0)
    table.ready(b"a", credit=2, now=0.0)
    table.dispatch(table.pick(), req(1, b"e"), now=0.0)
    table.drain(b"a")
    assert table.pick() is None and b"a" in table.workers
    assert table.answer(b"a", (b"e", 1), now=0.1) is None and b"a" not in table.workers


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
    s = sched(queue_timeout_s=10.0)
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


def test_a_reply_from_a_dropped_worker_is_not_forwarded_but_counted():
    """Only the worker holding a request answers it: once a worker is dropped, what it held
    belongs to the queue (and then to another worker), not to it."""
    s = sched(queue_timeout_s=10.0)
    s.ready(b"a", credit=1, now=0.0)
    s.request(b"e", 7, REQ, now=0.0)
    s.tick(now=3.0)                                           # a dropped, 7 requeued
    assert s.reply(b"a", b"e", 7, b"late", now=3.1) == []
    assert s.counts.dropped["unknown_worker"] == 1 and len(s.queue) == 1


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
    assert b"a" not in s.table.workers and not any(s.counts.dropped.values())


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


# -- hostile peers (issue 25) ---------------------------------------------------------------------

def answers(sends) -> list:
    """(edge, answer parts) of every send to an edge."""
    return [(parts[0], parts[1:]) for side, parts in sends if side == FRONTEND]


def test_only_the_worker_holding_a_request_may_answer_it():
    s = sched(queue_timeout_s=10.0)
    s.ready(b"a", credit=4, now=0.0)
    s.ready(b"b", credit=4, now=0.0)
    [(holder, _)] = dispatched(s.request(b"e", 1, REQ, now=0.0))
    other = b"b" if holder == b"a" else b"a"
    assert s.reply(b"ghost", b"e", 1, b"forged", now=0.1) == []    # never sent READY
    assert s.reply(other, b"e", 1, b"forged", now=0.1) == []       # not given it
    assert s.reply(holder, b"e", 2, b"forged", now=0.1) == []      # never sent by the edge
    assert s.counts.dropped == {"unknown_worker": 1, "not_held": 2, "late": 0}
    assert answers(s.reply(holder, b"e", 1, b"true", now=0.2)) == [(b"e", [b"true"])]
    assert s.reply(holder, b"e", 1, b"again", now=0.3) == []       # already answered
    assert s.counts.dropped["not_held"] == 3 and s.counts.replies == 1


def test_after_a_redelivery_only_the_new_holders_answer_is_forwarded():
    s = sched(queue_timeout_s=10.0)
    s.ready(b"a", credit=4, now=0.0)
    s.request(b"e", 1, REQ, now=0.0)
    s.ready(b"b", credit=4, now=1.0)
    s.heartbeat(b"b", now=2.0)
    assert dispatched(s.tick(now=2.1)) == [(b"b", b"e")]           # a silent: redelivered
    s.ready(b"a", credit=4, now=2.2)                               # a is back, and answers
    assert s.reply(b"a", b"e", 1, b"old", now=2.3) == []
    assert answers(s.reply(b"b", b"e", 1, b"new", now=2.4)) == [(b"e", [b"new"])]
    assert s.counts.dropped["not_held"] == 1


def test_a_request_expires_in_a_workers_hands_and_keeps_its_deadline_across_redelivery():
    s = sched(queue_timeout_s=3.0)
    s.ready(b"a", credit=4, now=0.0)
    s.request(b"e", 1, REQ, now=0.0)                               # arrives at 0: due at 3
    s.ready(b"b", credit=4, now=2.0)
    s.heartbeat(b"b", now=2.5)
    assert dispatched(s.tick(now=2.1)) == [(b"b", b"e")]           # a silent since 0
    s.heartbeat(b"b", now=2.9)
    assert s.tick(now=2.9) == []
    [(edge, expired)] = answers(s.tick(now=3.1))                   # not 3 s after 2.1
    assert edge == b"e" and wire.decode_answer(expired).reason == Refusal.NO_WORKER
    assert s.counts.expired_held == 1 and not s.requests and s.held_bytes == 0
    # b's answer comes too late: dropped, and only then is its credit free again
    assert s.table.workers[b"b"].free == 3
    assert s.reply(b"b", b"e", 1, b"late", now=3.2) == []
    assert s.counts.dropped["late"] == 1 and s.table.workers[b"b"].free == 4


def test_a_silent_high_credit_worker_gets_little_and_is_dropped_while_a_real_one_serves():
    """READY with credit 65 536, heartbeats, never answers: it is held to MAX_CREDIT and,
    having answered nothing, to START_CREDIT requests; they expire (NO_WORKER), the real
    worker serves everything else, and the silent one is dropped after a liveness period
    of owing answers."""
    s = sched(max_queue=1024, queue_timeout_s=1.0)
    s.ready(b"silent", credit=65536, now=0.0)
    s.ready(b"real", credit=128, now=0.0)
    assert s.table.workers[b"silent"].credit == MAX_CREDIT
    to_edge = []
    for i in range(400):                          # 400 requests over 4 s
        now = i * 0.01
        s.heartbeat(b"silent", now)
        s.heartbeat(b"real", now)
        sends = s.request(b"e", i, REQ, now) + s.tick(now)
        while sends:                              # the real worker answers what it gets
            to_edge += [a for _, a in answers(sends)]
            sends = [send for edge, msg_id in list(s.table.workers[b"real"].inflight)
                     for send in s.reply(b"real", edge, msg_id, b"ok", now)]
        silent = s.table.workers.get(b"silent")
        assert silent is None or len(silent.inflight) + len(silent.late) <= START_CREDIT
    assert b"silent" not in s.table.workers       # owed answers for over LIVENESS_S: dropped
    refused = [a for a in to_edge if a != [b"ok"]]
    assert {refusal((FRONTEND, [b"e"] + a)) for a in refused} == {Refusal.NO_WORKER}
    assert 0 < len(refused) == s.counts.expired_held <= START_CREDIT
    assert len(to_edge) == 400 - len(s.queue) - len(s.table.workers[b"real"].inflight)


def test_a_reused_msg_id_is_refused_and_never_overwrites_the_request_in_flight():
    s = sched(max_queue=1024)
    s.ready(b"w", credit=4, now=0.0)
    sent_to_worker, refusals = 0, []
    for i in range(100):                           # ids 1..4 over and over
        sends = s.request(b"e", 1 + i % 4, REQ, now=0.0)
        sent_to_worker += len(dispatched(sends))
        refusals += [a for _, a in answers(sends)]
    assert sent_to_worker == 4 and len(refusals) == 96
    assert {wire.decode_answer(a).reason for a in refusals} == {Refusal.BAD_REQUEST}
    assert s.counts.duplicate == 96 and len(s.table.workers[b"w"].inflight) == 4
    s.request(b"e", 5, REQ, now=0.0)                            # queued ...
    [dup] = s.request(b"e", 5, REQ, now=0.0)                    # ... is in flight too
    assert refusal(dup) == Refusal.BAD_REQUEST and len(s.queue) == 1
    assert dispatched(s.request(b"other-edge", 1, REQ, now=0.0)) == []  # ids are per edge
    assert len(s.queue) == 2


def test_credit_is_capped_and_a_new_worker_starts_small():
    table = WorkerTable(liveness_s=2.0)
    table.ready(b"w", credit=1 << 16, now=0.0)
    w = table.workers[b"w"]
    assert w.credit == MAX_CREDIT and w.free == START_CREDIT
    for i in range(START_CREDIT):
        table.dispatch(w, req(i), now=0.0)
    assert table.pick() is None
    assert table.answer(b"w", (b"edge", 0), now=0.1) is None
    assert w.free == 2                            # its slot back, and one more for answering


def test_the_bytes_held_are_bounded_and_given_back():
    s = sched(max_queue=100, max_held_bytes=1000)
    big = [bytes(400)]
    assert s.request(b"e", 1, big, now=0.0) == [] and s.request(b"e", 2, big, now=0.0) == []
    [busy] = s.request(b"e", 3, big, now=0.0)
    assert refusal(busy) == Refusal.BUSY and s.held_bytes == 800
    s.ready(b"w", credit=4, now=0.1)                             # held by a worker: still held
    assert s.held_bytes == 800 and refusal(s.request(b"e", 3, big, now=0.1)[0]) == Refusal.BUSY
    s.reply(b"w", b"e", 1, b"ok", now=0.2)
    assert s.held_bytes == 400 and s.request(b"e", 3, big, now=0.2) != [busy]
    s.tick(now=5.0)                                              # the rest expire
    assert s.held_bytes == 0 and not s.requests
