"""The broker's scheduling rules as a pure object (no sockets, the clock passed in), and the
worker's batching rule."""

from pipeline.broker import WorkerTable
from workers.tail_worker import batch_due


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


def test_batch_is_due_when_full_or_when_the_oldest_waited_long_enough():
    assert not batch_due(0, None, 64, 0.002, now=10.0)
    assert not batch_due(10, 10.0, 64, 0.002, now=10.001)
    assert batch_due(10, 10.0, 64, 0.002, now=10.002)
    assert batch_due(64, 10.0, 64, 0.002, now=10.0)
    assert batch_due(1, 10.0, 64, 0.0, now=10.0)  # max_wait 0: no batching delay
