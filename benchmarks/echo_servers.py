"""The servers the capacity benchmark measures the hop against, each run in a process of its
own: its floors (a bare ROUTER echo, a minimal zguide-style broker with an echo worker) and an
echo worker that speaks our protocol, so that what is left of the hop through our broker is
transport and broker, no tail."""

from __future__ import annotations

import time

import numpy as np
import zmq

from pipeline.protocol import timing, wire
from pipeline.protocol.wire import Kind

ECHO_CREDIT = 128


def echo_router(address: str) -> None:
    """Floor 1: answer every message at once, no broker."""
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(address)
    while True:
        sock.send_multipart(sock.recv_multipart())


def minimal_broker(frontend: str, backend: str) -> None:
    """Floor 2, zguide lbbroker with credit: workers announce how many requests they take;
    the frontend is polled only while some worker has credit."""
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    front.bind(frontend)
    back.bind(backend)
    credit: list[bytes] = []
    poll_both, poll_back = zmq.Poller(), zmq.Poller()
    poll_both.register(back, zmq.POLLIN)
    poll_both.register(front, zmq.POLLIN)
    poll_back.register(back, zmq.POLLIN)
    while True:
        events = dict((poll_both if credit else poll_back).poll())
        if back in events:
            worker, *msg = back.recv_multipart()
            if msg[0] == b"READY":
                credit += [worker] * int(msg[1])
            else:
                credit.append(worker)
                front.send_multipart(msg)     # [client, *reply]
        if front in events and credit:
            back.send_multipart([credit.pop(0)] + front.recv_multipart())


def minimal_echo_worker(backend: str) -> None:
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(backend)
    sock.send_multipart([b"READY", str(ECHO_CREDIT).encode()])
    while True:
        sock.send_multipart(sock.recv_multipart())


def protocol_echo_worker(backend: str, model_tag: bytes) -> None:
    """Speaks our protocol as workers/tail_worker.py does -- READY with credit, a HEARTBEAT
    every interval, READY again when the broker says DISCONNECT (it forgot us), a REPLY from
    the worker the request was given to -- but runs no tail: what is left of the hop is
    transport and broker."""
    sock = zmq.Context().socket(zmq.DEALER)
    sock.linger = 0
    sock.identity = b"echo"
    sock.connect(backend)
    ready = wire.encode_ready("echo", model_tag, ECHO_CREDIT)
    sock.send_multipart(ready)
    classes, confidences = np.zeros(1, np.uint8), np.ones(1, np.float32)
    heartbeat_at = time.monotonic() + timing.HEARTBEAT_INTERVAL_S
    while True:
        sock.poll(max(0.0, heartbeat_at - time.monotonic()) * 1000)
        for _ in range(ECHO_CREDIT):   # what arrived, a burst at a time as the tail worker
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(parts) == 2:   # [edge, request]: one frame each, see capacity.requests_for
                _, msg_id = wire.peek(parts[1])
                sock.send_multipart([parts[0]] + wire.encode_reply(
                    msg_id, "echo", classes, confidences, 0, 0, 1))
            elif wire.decode_control(parts) == Kind.DISCONNECT:
                sock.send_multipart(ready)
        if time.monotonic() >= heartbeat_at:
            sock.send_multipart(wire.HEARTBEAT)
            heartbeat_at = time.monotonic() + timing.HEARTBEAT_INTERVAL_S
