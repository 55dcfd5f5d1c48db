"""Faults on real processes: a worker killed or stuck mid-stream, a broker restarted. Every
frame still gets exactly one final answer; late duplicates are discarded at the edge."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

from pipeline.broker import BrokerConfig, run_broker
from pipeline.edge import EdgeConfig, run_producer
from tests.conftest import free_port
from tests.test_runtime import FRAMES
from workers.pool import ProcessGroup
from workers.tail_worker import WorkerConfig, run_worker

FPS = 100.0  # 300 frames over 3 s: faults land mid-stream


def start_stream(group, art, frontend, results, idx_dir, deadline_ms=10_000.0, fps=FPS):
    return group.start("edge", run_producer, str(art),
                       EdgeConfig(frontend, deadline_ms, results=str(results), max_pack=1),
                       "dataset", fps, None, str(idx_dir))


def read(results):
    return [json.loads(line) for line in results.read_text().splitlines()]


def start_pool(group, art):
    """A broker and workers w0, w1 that batch slowly (200 ms), so w0 holds requests in
    flight when the fault hits it. Returns (frontend, w0)."""
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    group.start("broker", run_broker, BrokerConfig(front, back))
    w0 = group.start("w0", run_worker, str(art), WorkerConfig(back, 64, 200.0), "w0")
    group.start("w1", run_worker, str(art), WorkerConfig(back, 64, 200.0), "w1")
    time.sleep(2.0)
    return front, w0


def assert_one_answer_each(outcomes):
    assert sorted(o["frame"] for o in outcomes) == list(range(FRAMES))


def test_a_killed_workers_requests_are_redelivered(artifacts, idx_dir, tmp_path, capfd):
    group = ProcessGroup()
    try:
        front, w0 = start_pool(group, artifacts)
        edge = start_stream(group, artifacts, front, tmp_path / "r.jsonl", idx_dir)
        time.sleep(1.5)
        os.kill(w0.pid, signal.SIGKILL)
        group.wait([edge], poll_s=0.05)
    finally:
        group.stop()
    outcomes = read(tmp_path / "r.jsonl")
    assert_one_answer_each(outcomes)
    paths = Counter(o["path"] for o in outcomes)
    assert paths["fallback"] == 0, Counter(o["reason"] for o in outcomes)
    broker_line = [line for line in capfd.readouterr().err.splitlines()
                   if line.startswith("I: broker:") and "redelivered" in line][-1]
    assert int(broker_line.split(" redelivered")[0].split()[-1]) > 0, broker_line
    late = [o for o in outcomes if o["path"] == "offload" and o["capture_ts"] >
            min(x["capture_ts"] for x in outcomes) + 2.0]
    assert late and {o["worker"] for o in late} == {"w1"}


def test_a_stuck_worker_is_dropped_and_its_late_answers_discarded(artifacts, idx_dir, tmp_path,
                                                                 capfd):
    group = ProcessGroup()
    try:
        front, w0 = start_pool(group, artifacts)
        results = tmp_path / "r.jsonl"
        edge = start_stream(group, artifacts, front, results, idx_dir, fps=40.0)  # ~7.5 s
        time.sleep(2.5)
        os.kill(w0.pid, signal.SIGSTOP)  # stuck: no heartbeats, holds its requests
        time.sleep(3.0)                  # > heartbeat liveness (2 s): broker redelivers
        os.kill(w0.pid, signal.SIGCONT)  # it wakes and answers what it held, too late
        group.wait([edge], poll_s=0.05)
    finally:
        group.stop()
    err = capfd.readouterr().err
    outcomes = read(results)
    assert_one_answer_each(outcomes)
    assert not [o for o in outcomes if o["path"] == "fallback"]
    assert Counter(o["worker"] for o in outcomes if o["path"] == "offload")["w1"] > 0
    edge_line = [line for line in err.splitlines() if line.startswith("I: edge:")][-1]
    duplicates = int(edge_line.split("duplicates ")[1].split(",")[0])
    assert duplicates > 0, edge_line  # w0's late answers arrived and were discarded by id


def test_broker_restart_edges_and_workers_come_back(artifacts, idx_dir, tmp_path):
    group = ProcessGroup()
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    try:
        broker = group.start("broker", run_broker, BrokerConfig(front, back))
        group.start("w0", run_worker, str(artifacts), WorkerConfig(back), "w0")
        time.sleep(2.0)
        results = tmp_path / "r.jsonl"
        edge = start_stream(group, artifacts, front, results, idx_dir, deadline_ms=300.0)
        time.sleep(0.8)
        os.kill(broker.pid, signal.SIGKILL)
        time.sleep(0.8)  # the outage: edges answer locally
        group.start("broker2", run_broker, BrokerConfig(front, back))
        group.wait([edge], poll_s=0.05)
    finally:
        group.stop()
    outcomes = read(results)
    assert_one_answer_each(outcomes)
    start = min(o["capture_ts"] for o in outcomes)
    fallbacks = [o for o in outcomes if o["path"] == "fallback"]
    assert fallbacks and {o["reason"] for o in fallbacks} <= {"deadline", "unreachable"}
    resumed = [o for o in outcomes if o["path"] == "offload" and o["capture_ts"] > start + 2.5]
    assert resumed, "service did not resume after the broker came back"
