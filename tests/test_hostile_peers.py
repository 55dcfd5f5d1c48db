"""Hostile peers against a real `splitexit broker` process, each as an attacker with a few
well-formed messages (issue 25): a camera's key offered as a worker's, forged replies, a
worker that takes work and never answers, a reused msg_id, and messages larger than any legal
one. The broker stays up, counts what it refused, and a valid client is served.

The peers here are raw ZeroMQ sockets speaking the wire format, as an attacker's would;
where a real worker is needed it is `splitexit workers --join`. Every wait is on an event:
a message, a socket monitor event, or the broker's metrics."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from monitoring.top import scrape
from pipeline.model.artifacts import load_edge
from pipeline.protocol import wire
from pipeline.protocol.security import Security
from pipeline.protocol.timing import HEARTBEAT_INTERVAL_S
from tests.conftest import ROOT, free_port
from workers.config import START_CREDIT
from workers.pool import START_TIMEOUT_S, wait_until

TAG = bytes(wire.MODEL_TAG_BYTES)
WIDTH = 40                       # the split width of the session's `artifacts` model
HUGE = 8 << 20                   # twice the largest legal request


def request(msg_id: int, tag: bytes = TAG) -> list[bytes]:
    return wire.encode_request(msg_id, tag, np.ones((1, WIDTH), np.float32))


def reply(msg_id: int, worker: str, cls: int = 3) -> list[bytes]:
    return wire.encode_reply(msg_id, worker, np.array([cls]), np.array([1.0]), 0, 0, 1)


class Broker:
    """`splitexit broker` on fresh loopback ports, ready (its /ready) when built."""

    def __init__(self, *args: str):
        self.front = f"tcp://127.0.0.1:{free_port()}"
        self.back = f"tcp://127.0.0.1:{free_port()}"
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "broker", "--frontend", self.front,
             "--backend", self.back, "--metrics-port", str(self.port), *args],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_until(self.ready, START_TIMEOUT_S, "the broker ready", [self.proc])

    def ready(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready",
                                          timeout=5).status == 200
        except OSError:
            return False

    def total(self, name: str, **labels: str) -> float:
        return scrape([f"http://127.0.0.1:{self.port}/metrics"]).total(name, **labels)

    def wait_for(self, name: str, at_least: float, **labels: str) -> None:
        wait_until(lambda: self.total(name, **labels) >= at_least, START_TIMEOUT_S,
                   f"{name}{labels} >= {at_least}", [self.proc])

    def rss_bytes(self) -> int:
        status = open(f"/proc/{self.proc.pid}/status").read()
        return int(status.split("VmRSS:")[1].split()[0]) * 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            assert self.proc.wait(15) == 0, self.proc.stderr.read()
        finally:
            self.proc.kill()


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def plain_broker():
    broker = Broker("--insecure", "--queue-timeout-ms", "1000")
    try:
        yield broker
    finally:
        broker.stop()


def dealer(ctx, address: str, identity: bytes | None = None, security: Security | None = None,
           events: int = 0):
    """A DEALER connected to `address`, and its monitor socket (None without `events`)."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if identity:
        sock.identity = identity
    if security:
        security.client_socket(sock)
    monitor = sock.get_monitor_socket(events) if events else None
    sock.connect(address)
    return sock, monitor


def receive(sock, what: str, timeout_s: float = START_TIMEOUT_S) -> list[bytes]:
    assert sock.poll(timeout_s * 1000), f"no {what} within {timeout_s:.0f} s"
    return sock.recv_multipart()


def next_request(*workers) -> tuple:
    """(the worker socket, the edge, the request) of the next request any of `workers` is
    sent; the broker's heartbeats to them in between are skipped."""
    poller = zmq.Poller()
    for sock in workers:
        poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for sock, _ in poller.poll(1000):
            parts = sock.recv_multipart()
            if len(parts) == 2:   # [edge, request]; control messages are one frame
                return sock, parts[0], parts[1:]
    raise AssertionError(f"no request within {START_TIMEOUT_S:.0f} s")


def monitor_event(monitor, what: str) -> int:
    """The next event the monitor reports (its mask chose which)."""
    assert monitor.poll(START_TIMEOUT_S * 1000), f"no {what} within {START_TIMEOUT_S:.0f} s"
    return recv_monitor_message(monitor)["event"]


def worker(ctx, broker: Broker, name: str, credit: int, security: Security | None = None):
    """A peer that announced itself as a worker and was confirmed by the broker."""
    sock, _ = dealer(ctx, broker.back, name.encode(), security)
    sock.send_multipart(wire.encode_ready(name, TAG, credit))
    assert wire.decode_control(receive(sock, f"{name}'s confirmation")) == wire.Kind.HEARTBEAT
    return sock


def test_a_cameras_key_is_refused_on_the_workers_port(ctx, keys):
    """Under CURVE each broker socket admits one role: the camera's key fails its handshake
    on the backend (it cannot take requests and read other cameras' features), a worker's
    fails on the frontend, and each is served where it belongs."""
    broker = Broker("--broker-secret", str(keys / "broker.key_secret"),
                    "--allow-edges", str(keys / "allow-edges"),
                    "--allow-workers", str(keys / "allow-workers"))
    server = str(keys / "broker.key")
    as_edge = Security(secret=str(keys / "edge.key_secret"), server=server)
    as_worker = Security(secret=str(keys / "worker.key_secret"), server=server)
    watched = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH \
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    try:
        for address, security in ((broker.back, as_edge), (broker.front, as_worker)):
            sock, monitor = dealer(ctx, address, b"intruder", security, watched)
            sock.send_multipart(wire.encode_ready("intruder", TAG, 4))
            assert monitor_event(monitor, "handshake") == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        real = worker(ctx, broker, "w", 4, as_worker)
        camera, monitor = dealer(ctx, broker.front, b"cam-1", as_edge, watched)
        assert monitor_event(monitor, "handshake") == zmq.EVENT_HANDSHAKE_SUCCEEDED
        camera.send_multipart(request(1))
        _, edge, _ = next_request(real)
        real.send_multipart([edge] + reply(1, "w"))
        assert wire.decode_answer(receive(camera, "the answer")).worker_id == "w"
        assert broker.total("splitexit_broker_workers") == 1
    finally:
        broker.stop()


def test_a_forged_reply_is_dropped_and_counted(ctx, plain_broker):
    """Replies from a peer that never sent READY, from a worker not given that request, for
    a request never sent, and a request posing as a reply: none reaches the edge; the
    holder's answer does."""
    b = plain_broker
    w, w2 = worker(ctx, b, "w", 4), worker(ctx, b, "w2", 4)
    camera, _ = dealer(ctx, b.front, b"cam-1")
    camera.send_multipart(request(5))
    holder, edge, _ = next_request(w, w2)
    other = w2 if holder is w else w
    assert edge == b"cam-1"
    forger, _ = dealer(ctx, b.back, b"forger")
    forger.send_multipart([edge] + reply(5, "forger", cls=9))
    other.send_multipart([edge] + reply(5, "other", cls=9))
    holder.send_multipart([edge] + reply(6, "holder", cls=9))   # never given msg 6
    holder.send_multipart([edge] + request(5))                   # not an answer at all
    b.wait_for("splitexit_broker_replies_dropped_total", 1, reason="unknown_worker")
    b.wait_for("splitexit_broker_replies_dropped_total", 2, reason="not_held")
    b.wait_for("splitexit_bad_messages_total", 1, component="broker_backend", reason="kind")
    holder.send_multipart([edge] + reply(5, "holder", cls=3))
    # forwarded in the order the broker read them: a forged one would have come first
    answer = wire.decode_answer(receive(camera, "the answer"))
    assert (answer.msg_id, answer.worker_id, answer.classes.tolist()) == (5, "holder", [3])


def test_a_silent_high_credit_worker_cannot_starve_a_valid_client(ctx, plain_broker,
                                                                  artifacts, tmp_path):
    """A peer that sends READY with credit 65 536 and heartbeats but never answers (it came
    first, so it gets the first request): a client at 10 Hz is served by the real worker,
    the silent peer's request expires (NO_WORKER reaches the client), and the peer is
    dropped and told so while it still heartbeats."""
    b = plain_broker
    silent = worker(ctx, b, "silent", 1 << 16)
    tag = wire.model_tag(load_edge(artifacts).model_id)
    real = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "workers", "-n", "1", "--insecure",
         "--artifacts", str(artifacts), "--join", b.back, "--metrics-port", "0",
         "--metrics-dir", str(tmp_path / "wm")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    beat_at = [time.monotonic()]

    def beat() -> None:
        """The silent peer's one sign of life, on time."""
        if time.monotonic() >= beat_at[0]:
            silent.send_multipart(wire.HEARTBEAT)
            beat_at[0] = time.monotonic() + HEARTBEAT_INTERVAL_S

    try:
        wait_until(lambda: beat() or b.total("splitexit_broker_workers") == 2,
                   START_TIMEOUT_S, "the real worker confirmed", [b.proc, real])
        client, _ = dealer(ctx, b.front, b"valid-client")
        n, answers, sent = 30, {}, 0
        start = time.monotonic()
        deadline = start + START_TIMEOUT_S
        while len(answers) < n:
            assert time.monotonic() < deadline, f"{len(answers)} of {n} answered"
            beat()
            if sent < n and time.monotonic() >= start + sent / 10:   # 10 requests a second
                client.send_multipart(request(sent + 1, tag))
                sent += 1
            if client.poll(20):
                answer = wire.decode_answer(client.recv_multipart())
                assert answer.msg_id not in answers
                answers[answer.msg_id] = answer
        served = [a for a in answers.values() if isinstance(a, wire.Reply)]
        refused = [a for a in answers.values() if isinstance(a, wire.Error)]
        assert {a.reason for a in refused} == {wire.Refusal.NO_WORKER}
        assert 1 <= len(refused) <= START_CREDIT and len(served) == n - len(refused)
        assert len({a.worker_id for a in served}) == 1            # the real worker's
        assert b.total("splitexit_broker_requests_total", status="expired_held") == len(refused)

        def told_to_leave() -> bool:
            beat()
            while silent.poll(0):
                if silent.recv_multipart() == wire.DISCONNECT:
                    return True
            return False

        wait_until(told_to_leave, START_TIMEOUT_S, "the silent peer dropped", [b.proc, real])
        assert b.total("splitexit_broker_workers") == 1
    finally:
        real.terminate()
        real.wait(30)


def test_a_reused_msg_id_is_refused_and_credit_holds(ctx, plain_broker):
    """100 requests reusing ids 1..4 at a credit-4 worker: it is sent 4; the rest are
    refused BAD_REQUEST at once and counted."""
    b = plain_broker
    w = worker(ctx, b, "w", 4)
    camera, _ = dealer(ctx, b.front, b"cam-1")
    for i in range(100):
        camera.send_multipart(request(1 + i % 4))
    refusals = [wire.decode_answer(receive(camera, f"refusal {k}")) for k in range(96)]
    assert {r.reason for r in refusals} == {wire.Refusal.BAD_REQUEST}
    for _ in range(4):
        next_request(w)
    # every request is accounted for (one loop pass exports them all): 4 went to w
    b.wait_for("splitexit_broker_requests_total", 96, status="duplicate")
    assert b.total("splitexit_broker_requests_total", status="dispatched") == 4


def test_an_oversized_message_is_refused_before_it_is_read(ctx, plain_broker):
    """An 8 MB request (twice the largest legal one) on the frontend, and an 8 MB reply on
    the backend: the broker drops the sender before reading it, its memory does not grow by
    the message, and it still serves."""
    b = plain_broker
    w = worker(ctx, b, "w", 4)
    before = b.rss_bytes()
    for address in (b.front, b.back):
        attacker, monitor = dealer(ctx, address, events=zmq.EVENT_DISCONNECTED)
        [header] = request(9)
        attacker.send_multipart([header + bytes(HUGE)] if address == b.front
                                else [b"cam-1", header + bytes(HUGE)])
        assert monitor_event(monitor, "disconnect") == zmq.EVENT_DISCONNECTED
        attacker.close()
    grown = b.rss_bytes() - before
    assert grown < HUGE // 4, f"the broker grew by {grown >> 20} MiB"
    camera, _ = dealer(ctx, b.front, b"cam-1")
    camera.send_multipart(request(1))
    _, edge, _ = next_request(w)
    w.send_multipart([edge] + reply(1, "w"))
    assert wire.decode_answer(receive(camera, "the answer")).msg_id == 1
