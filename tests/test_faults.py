"""Faults on real processes: a worker killed or stuck mid-stream, a broker restarted. Every
frame still gets exactly one final answer; the late answers of a worker whose requests went
to another are dropped by the broker (only a request's holder may answer it).

Each fault is injected once the traffic it must hit is observed in the processes' metrics
(a worker holding requests, answers flowing), and each test proves the fault hit it
(requests redelivered, late answers dropped, fallbacks during the outage)."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter

from pipeline.edge.config import EdgeConfig
from pipeline.edge.producer import run_producer
from tests.conftest import free_port
from tests.test_runtime import FRAMES
from workers.broker import run_broker
from workers.config import BrokerConfig, WorkerConfig
from workers.pool import ProcessGroup
from workers.tail_worker import run_worker

HELD = "splitexit_worker_held_requests"
DEADLINE_MS = 10_000.0   # the edges' deadline, and the broker's queue timeout


def start_stream(group, art, frontend, results, idx_dir, deadline_ms=DEADLINE_MS, fps=40.0):
    """300 frames, one request per offloaded frame, over 300/fps seconds."""
    return group.start("edge", run_producer, str(art),
                       EdgeConfig(frontend, deadline_ms, results=str(results), max_pack=1),
                       "dataset", fps, None, str(idx_dir))


def read(results):
    return [json.loads(line) for line in results.read_text().splitlines()]


def start_pool(group, art, observed):
    """A broker, a victim w0 and a helper w1, both confirmed by the broker. w0 answers only in
    batches of 4 requests and has far more credit, so the broker sends it nearly everything
    and it always holds 0..3 requests; w1 answers at once. The broker's queue timeout is the
    edges' deadline. Returns (frontend, w0)."""
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    group.start("broker", run_broker, BrokerConfig(front, back,
                                                   queue_timeout_s=DEADLINE_MS / 1000))
    w0 = group.start("w0", run_worker, str(art),
                     WorkerConfig(back, max_batch=4, max_wait_ms=60_000, credit=512), "w0")
    w1 = group.start("w1", run_worker, str(art), WorkerConfig(back, credit=4), "w1")
    observed.ready("worker", 2, [w0, w1])
    return front, w0


def frozen_holding_three(observed, w0, edge) -> None:
    """w0 has answered a batch, holds 3 requests it cannot answer before a 4th, and is
    stopped (SIGSTOP) holding them. Seen holding 3, it may still read a 4th and answer the
    batch before the signal lands (a request comes every ~60 ms): so its answers are counted
    before the stop and again after it, when nothing in w0 can move; if they moved, it is let
    go and caught at its next 3."""
    answered = "splitexit_worker_requests_total"
    while True:
        observed.wait("w0 answered once and holds 3 requests",
                      lambda: observed.total(answered, worker="w0", status="ok") >= 4
                      and observed.total(HELD, worker="w0") == 3, [w0, edge])
        before = observed.total(answered, worker="w0", status="ok")
        os.kill(w0.pid, signal.SIGSTOP)
        if (observed.total(answered, worker="w0", status="ok") == before
                and observed.total(HELD, worker="w0") == 3):
            return
        os.kill(w0.pid, signal.SIGCONT)


def assert_one_answer_each(outcomes):
    assert sorted(o["frame"] for o in outcomes) == list(range(FRAMES))


def test_a_killed_workers_requests_are_redelivered(artifacts, idx_dir, tmp_path, observed):
    group = ProcessGroup()
    try:
        front, w0 = start_pool(group, artifacts, observed)
        edge = start_stream(group, artifacts, front, tmp_path / "r.jsonl", idx_dir)
        frozen_holding_three(observed, w0, edge)
        os.kill(w0.pid, signal.SIGKILL)
        killed = observed.total("splitexit_edge_frames_total")
        group.wait([edge])
        redelivered = observed.total("splitexit_broker_redeliveries_total")
    finally:
        group.stop()
    outcomes = read(tmp_path / "r.jsonl")
    assert_one_answer_each(outcomes)
    paths = Counter(o["path"] for o in outcomes)
    assert paths["fallback"] == 0, Counter(o["reason"] for o in outcomes)
    assert redelivered >= 3  # at least the three w0 held when it died
    assert killed < FRAMES  # the fault landed mid-stream
    served = Counter(o["worker"] for o in outcomes if o["path"] == "offload")
    assert served["w1"] >= redelivered


def test_a_stuck_worker_is_dropped_and_its_late_answers_dropped(artifacts, idx_dir, tmp_path,
                                                               observed):
    group = ProcessGroup()
    try:
        front, w0 = start_pool(group, artifacts, observed)
        results = tmp_path / "r.jsonl"
        edge = start_stream(group, artifacts, front, results, idx_dir)
        frozen_holding_three(observed, w0, edge)  # stuck: no heartbeats, holds its requests
        # The broker declares it dead after its liveness and gives its work to w1 ...
        observed.wait_for("splitexit_broker_redeliveries_total", 3, [edge])
        os.kill(w0.pid, signal.SIGCONT)
        # ... then w0 wakes, reads a 4th request, and answers the batch, too late: the
        # requests are w1's now, and the broker drops w0's answers.
        observed.wait_for("splitexit_broker_replies_dropped_total", 1, [edge])
        w0.terminate()  # drained: what it holds now is answered, the rest goes to w1
        group.wait([edge])
    finally:
        group.stop()
    outcomes = read(results)
    assert_one_answer_each(outcomes)
    assert not [o for o in outcomes if o["path"] == "fallback"]
    assert Counter(o["worker"] for o in outcomes if o["path"] == "offload")["w1"] >= 3


def test_broker_restart_edges_and_workers_come_back(artifacts, idx_dir, tmp_path, observed):
    group = ProcessGroup()
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    offloaded = "splitexit_edge_frames_total"
    try:
        broker = group.start("broker", run_broker, BrokerConfig(front, back))
        w0 = group.start("w0", run_worker, str(artifacts), WorkerConfig(back), "w0")
        observed.ready("worker", 1, [broker, w0])
        results = tmp_path / "r.jsonl"
        edge = start_stream(group, artifacts, front, results, idx_dir, deadline_ms=300.0,
                            fps=30.0)  # 10 s
        before = observed.wait_for(offloaded, 5, [edge], path="offload")
        os.kill(broker.pid, signal.SIGKILL)
        group.stop([broker])  # reaped: its gauges leave the sums
        observed.wait_for("splitexit_edge_fallbacks_total", 1, [edge])  # the outage is felt
        during = observed.total(offloaded, path="offload")
        group.start("broker2", run_broker, BrokerConfig(front, back))
        # w0 announces itself again and the edge reconnects: answers resume mid-stream
        observed.wait_for(offloaded, during + 5, [edge], path="offload")
        group.wait([edge])
    finally:
        group.stop()
    outcomes = read(results)
    assert_one_answer_each(outcomes)
    fallbacks = [o for o in outcomes if o["path"] == "fallback"]
    assert fallbacks and {o["reason"] for o in fallbacks} <= {"deadline", "unreachable"}
    assert before >= 5 and sum(o["path"] == "offload" for o in outcomes) >= during + 5
