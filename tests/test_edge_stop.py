"""An edge never loses an answer it counted: stopped by SIGTERM (a producer, or an `edge -n`
launcher passing it on), killed with -9, or out of disk; and it never believes a reply that
cannot be true (a class the model lacks, the wrong number of answers). Real processes and
sockets; every wait is on the metrics or the results file, never a sleep."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq
from prometheus_client import CollectorRegistry

from monitoring.exposition import total
from pipeline import Edge
from pipeline.edge.config import EdgeConfig
from pipeline.edge.producer import run_producer
from pipeline.floor.data import load_test_split
from pipeline.protocol import wire
from tests.conftest import ROOT, Observed, free_port
from tests.test_cli import one_line_failure
from workers.pool import START_TIMEOUT_S, ProcessGroup

FRAMES = 300            # the generated test split
ANSWERED = "splitexit_edge_frames_total"
SUMMARY = re.compile(r"edge: (\d+) frames: ")


def lines_of(path: Path) -> list[dict]:
    """The results file's lines, each a whole JSON object (a torn line fails here)."""
    text = path.read_text() if path.exists() else ""
    assert not text or text.endswith("\n"), text[-200:]
    return [json.loads(line) for line in text.splitlines()]


def producer(group: ProcessGroup, artifacts: Path, frontend: str, results: Path, idx_dir: Path):
    """A producer replaying the test split at 50 frames/s (6 s in all), one frame per
    request, with a deadline no answer on a busy machine misses."""
    return group.start("edge", run_producer, str(artifacts),
                       EdgeConfig(frontend, 5000.0, results=str(results), max_pack=1),
                       "dataset", 50.0, None, str(idx_dir))


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_producer_answers_the_frames_it_took_and_writes_the_summary(
        stop, observed, artifacts, idx_dir, tmp_path, capfd):
    group = ProcessGroup()
    try:
        frontend, _ = observed.broker_and_worker(group, artifacts)
        results = tmp_path / "edge.jsonl"
        edge = producer(group, artifacts, frontend, results, idx_dir)
        observed.wait_for(ANSWERED, 5, [edge], producer="0", path="offload")
        os.kill(edge.pid, stop)
        edge.join(START_TIMEOUT_S)
        assert edge.exitcode == 0
    finally:
        group.stop()
    outcomes = lines_of(results)
    counted = observed.total(ANSWERED, producer="0")
    assert 5 <= len(outcomes) == counted < FRAMES   # stopped early, nothing counted is lost
    assert sorted(o["frame"] for o in outcomes) == list(range(len(outcomes)))  # none skipped
    assert [int(n) for n in SUMMARY.findall(capfd.readouterr().err)] == [len(outcomes)]


def test_kill_9_of_a_producer_loses_no_answer_it_counted(observed, artifacts, idx_dir,
                                                         tmp_path):
    group = ProcessGroup()
    try:
        frontend, _ = observed.broker_and_worker(group, artifacts)
        results = tmp_path / "edge.jsonl"
        edge = producer(group, artifacts, frontend, results, idx_dir)
        for at_least in (5, 10, 20):   # counted, then the file: it holds at least as many
            counted = observed.wait_for(ANSWERED, at_least, [edge], producer="0")
            assert len(lines_of(results)) >= counted
        edge.kill()
        edge.join(START_TIMEOUT_S)
    finally:
        group.stop()
    counted = observed.total(ANSWERED, producer="0")
    assert len(lines_of(results)) >= counted >= 20


def test_sigterm_to_an_edge_launcher_reaches_every_producer(observed, artifacts, idx_dir,
                                                           tmp_path):
    group = ProcessGroup()
    metrics, results = tmp_path / "edge-metrics", tmp_path / "results"
    metrics.mkdir()
    stderr = tmp_path / "launcher.err"
    launcher = None
    try:
        frontend, _ = observed.broker_and_worker(group, artifacts)
        with stderr.open("w") as err:
            launcher = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "edge", "-n", "2", "--artifacts",
                 str(artifacts), "--broker", frontend, "--data", str(idx_dir), "--fps", "50",
                 "--deadline-ms", "5000", "--max-pack", "1", "--results", str(results),
                 "--metrics-port", "0", "--metrics-dir", str(metrics), "--insecure"],
                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        seen = Observed(metrics)
        for p in ("0", "1"):   # both producers are answering, so both are past their start
            seen.wait_for(ANSWERED, 5, [launcher], producer=p, path="offload")
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(START_TIMEOUT_S) == 0, stderr.read_text()
    finally:
        if launcher is not None and launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        group.stop()
    log = stderr.read_text()
    assert "Traceback" not in log, log
    counts = []
    for p in ("0", "1"):
        outcomes = lines_of(results / f"edge-{p}.jsonl")
        assert 5 <= len(outcomes) == seen.total(ANSWERED, producer=p) < FRAMES
        counts.append(len(outcomes))
    assert sorted(int(n) for n in SUMMARY.findall(log)) == sorted(counts), log


@pytest.fixture
def small_disk(tmp_path):
    """A 16 KiB tmpfs: room for ~50 result lines."""
    folder = tmp_path / "small"
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_every_frame_is_still_answered(artifacts, idx_dir,
                                                                   tmp_path, small_disk):
    """No broker: frames fall back at a short deadline; the file fills after ~50 lines."""
    metrics = tmp_path / "edge-metrics"
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "edge", "--artifacts", str(artifacts),
         "--broker", f"tcp://127.0.0.1:{free_port()}", "--data", str(idx_dir),
         "--deadline-ms", "50", "--results", str(small_disk), "--metrics-port", "0",
         "--metrics-dir", str(metrics), "--insecure"],
        cwd=tmp_path, capture_output=True, text=True, timeout=START_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    one_line_failure(r)
    assert "No space left on device" in r.stderr.splitlines()[-1]
    assert [int(n) for n in SUMMARY.findall(r.stderr)] == [FRAMES]   # all answered
    assert total(Observed(metrics).registry, ANSWERED) == FRAMES
    outcomes = lines_of(small_disk / "edge-0.jsonl")   # whole lines only
    assert 0 < len(outcomes) < FRAMES
    assert len({o["frame"] for o in outcomes}) == len(outcomes)


class FakeBroker:
    """A ROUTER where the broker would be: answers every request with forged replies (a
    class the model lacks, one answer too many, a confidence of 1.5, an id never sent), then
    with a true-looking one (class 3) for even msg_ids only; odd ones wait for the deadline."""

    FORGERIES = {"class_range": lambda m, n: (m, [200] * n, [0.9] * n),
                 "answer_count": lambda m, n: (m, [1] * (n + 1), [0.9] * (n + 1)),
                 "confidence_range": lambda m, n: (m, [1] * n, [1.5] * n),
                 "unknown_msg_id": lambda m, n: (m + 1_000_000, [1] * n, [0.9] * n)}

    def __init__(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.sock.bind(self.endpoint)
        self.requests: list[int] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            if not self.sock.poll(50):
                continue
            edge, payload = self.sock.recv_multipart()
            request = wire.decode_request([payload])
            msg_id, n = request.msg_id, len(request.features)
            self.requests.append(msg_id)
            for forge in self.FORGERIES.values():
                m, classes, confidences = forge(msg_id, n)
                self.reply(edge, m, classes, confidences)
            if msg_id % 2 == 0:
                self.reply(edge, msg_id, [3] * n, [0.75] * n)

    def reply(self, edge: bytes, msg_id: int, classes: list, confidences: list) -> None:
        self.sock.send_multipart([edge] + wire.encode_reply(
            msg_id, "fake", np.array(classes, np.uint8), np.array(confidences, np.float32),
            10, 20, 1))

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.sock.close()
        self.ctx.term()


def test_forged_replies_are_not_answers_and_are_counted(artifacts, idx_dir):
    images = load_test_split(idx_dir).images[:40].reshape(-1, 28, 28)
    registry = CollectorRegistry()
    fake = FakeBroker()
    try:
        with Edge(artifacts, broker=fake.endpoint, deadline_ms=3000, max_pack=1,
                  dtype="float32", codec="none", registry=registry) as edge:
            answers = [f.result() for f in [edge.submit(i) for i in images]]
    finally:
        fake.close()
    sent = fake.requests
    assert sent and len(sent) == sum(a.path != "exit" for a in answers)
    assert all(a.cls < 10 for a in answers)
    offloaded = [a for a in answers if a.path == "offload"]
    assert len(offloaded) == sum(m % 2 == 0 for m in sent)   # the true-looking ones only
    assert {(a.cls, a.confidence, a.worker) for a in offloaded} == {(3, 0.75, "fake")}
    assert {a.reason for a in answers if a.path == "fallback"} == {"deadline"}
    for reason in FakeBroker.FORGERIES:
        assert total(registry, "splitexit_edge_bad_replies_total", reason=reason) == len(sent)


def test_a_full_disk_still_gives_every_submitted_frame_its_answer(artifacts, idx_dir,
                                                                  small_disk):
    """The library: futures and the summary get every answer; the file keeps whole lines.
    (250 frames: all fit the edge's queue, so submit never waits on a failed edge.)"""
    n = 250
    images = load_test_split(idx_dir).images[:n].reshape(-1, 28, 28)
    registry = CollectorRegistry()
    results = small_disk / "api.jsonl"
    edge = Edge(artifacts, broker=f"tcp://127.0.0.1:{free_port()}", deadline_ms=50,
                results=str(results), registry=registry)
    answers = [edge.submit(i) for i in images]
    answered, _ = concurrent.futures.wait(answers, START_TIMEOUT_S)
    assert len(answered) == n   # before the fix, the first failed write ended the edge
    edge.close()
    assert [a.result().frame for a in answers] == list(range(n))
    assert edge.summary.frames == total(registry, ANSWERED) == n
    assert 0 < len(lines_of(results)) == n - edge.summary.unwritten < n
