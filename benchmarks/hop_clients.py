"""The capacity benchmark's client side of the hop (run in its own process): a DEALER to a
server, the round trip at a low rate, and messages/s with a window of requests in flight."""

from __future__ import annotations

import time

import numpy as np
import zmq

from pipeline.protocol import wire
from pipeline.protocol.wire import Kind
from workers.pool import START_TIMEOUT_S

LOW_RATE_PERIOD_S = 0.005
WINDOW = 256                     # requests in flight for the messages/s column


def dealer(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    return sock


def answer_of(sock: zmq.Socket) -> tuple[int, bool]:
    """(msg_id, whether it is a prediction) of the next answer: a REPLY, or an echo of the
    request on the floors; False for an ERROR (a refusal: busy, no worker, ...)."""
    kind, msg_id = wire.peek(sock.recv_multipart()[-1])
    return msg_id, kind != Kind.ERROR


def low_rate_rtts(sock: zmq.Socket, requests: list, n: int) -> np.ndarray:
    """One request at a time, one every 5 ms: the hop with nothing queued anywhere."""
    rtts = []
    for i in range(n):
        start = time.perf_counter()
        sock.send_multipart(requests[i % len(requests)])
        if not sock.poll(START_TIMEOUT_S * 1000):
            raise RuntimeError("no reply at a low rate: the server side stalled")
        sock.recv_multipart()
        rtts.append(time.perf_counter() - start)
        pause = LOW_RATE_PERIOD_S - (time.perf_counter() - start)
        if pause > 0:
            time.sleep(pause)  # the pacing of the low-rate scenario
    return np.array(rtts[n // 10:]) * 1000  # drop the warm-up tenth


def window_rate(sock: zmq.Socket, requests: list, seconds: float) -> float:
    """Answers per second with WINDOW requests kept in flight."""
    sent = answered = 0
    for _ in range(WINDOW):
        sock.send_multipart(requests[sent % len(requests)])
        sent += 1
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        if not sock.poll(5000):
            raise RuntimeError("no reply for 5 s: the server side stalled")
        sock.recv_multipart()
        answered += 1
        sock.send_multipart(requests[sent % len(requests)])
        sent += 1
    rate = answered / (time.perf_counter() - start)
    while answered < sent and sock.poll(5000):  # let the window drain before the next test
        sock.recv_multipart()
        answered += 1
    return rate


def client_rate(address: str, requests: list, seconds: float, rates) -> None:
    """A client process: one round trip (the path is up), then messages/s with WINDOW in
    flight, put on `rates`."""
    sock = dealer(address)
    sock.send_multipart(requests[0])
    if not sock.poll(START_TIMEOUT_S * 1000):
        raise RuntimeError(f"no answer from {address} within {START_TIMEOUT_S:.0f} s")
    sock.recv_multipart()
    rates.put(window_rate(sock, requests, seconds))
