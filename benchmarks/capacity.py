"""The offload hop against its floor, and how many cameras one broker + workers serve.

All in one run on this machine, loopback tcp, real processes:
  floor 1  direct DEALER <-> ROUTER echo (no broker)
  floor 2  a minimal zguide-style Python load-balancing broker + echo workers
  ours     our broker (heartbeats, credit, redelivery, metrics in multiprocess mode) with
           echo workers that speak our protocol, and with our real tail workers
Three tables:
  1. hop round trip at a low rate (one request every 5 ms, one frame each): p50 / p99
  2. messages/s through the broker with a window of requests in flight
  3. simulated 30-fps cameras (pre-encoded features of real test frames, each camera
     offloading `--offload` of its frames, one frame per request) that our broker and two
     tail workers serve with a hop p99 <= 50 ms

    python benchmarks/capacity.py                        # uses runs/default
    python benchmarks/capacity.py --artifacts runs/paper-sparse --seconds 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np
import zmq

from common import free_port, metrics, start_pool
from pipeline.model.artifacts import load_edge
from pipeline.model.config import FASHION_MNIST_DIR
from pipeline.model.data import load_test_split
from pipeline.protocol import timing, wire
from workers.broker import run_broker
from workers.config import BrokerConfig
from workers.pool import START_TIMEOUT_S, ProcessGroup, wait_until

CAMERA_FPS = 30.0
P99_BUDGET_MS = 50.0
LOW_RATE_PERIOD_S = 0.005
WINDOW = 256                     # requests in flight for the messages/s table
POOL = 4096                      # pre-encoded requests (msg_ids 0..POOL-1, reused in turn)


# -- servers: each runs in a process of its own ------------------------------------------------

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
    sock.send_multipart([b"READY", b"128"])
    while True:
        sock.send_multipart(sock.recv_multipart())


def protocol_echo_worker(backend: str, model_tag: bytes) -> None:
    """Speaks our protocol (READY with credit, heartbeats, a REPLY per request) but runs no
    tail: what is left of the hop is transport and broker."""
    sock = zmq.Context().socket(zmq.DEALER)
    sock.identity = b"echo"
    sock.connect(backend)
    sock.send_multipart(wire.encode_ready("echo", model_tag, 128))
    classes, conf = np.zeros(1, np.uint8), np.ones(1, np.float32)
    heartbeat_at = time.monotonic() + timing.HEARTBEAT_INTERVAL_S
    while True:
        if sock.poll(max(0.0, heartbeat_at - time.monotonic()) * 1000):
            parts = sock.recv_multipart()
            if len(parts) == 3:
                _, msg_id = wire.peek(parts[1])
                sock.send_multipart([parts[0]] + wire.encode_reply(msg_id, "echo", classes, conf,
                                                                    0, 0, 1))
        if time.monotonic() >= heartbeat_at:
            sock.send_multipart(wire.HEARTBEAT)
            heartbeat_at = time.monotonic() + timing.HEARTBEAT_INTERVAL_S


# -- clients (this process) ---------------------------------------------------------------------

def msg_id_of(parts: list) -> int:
    return wire.peek(parts[-1] if len(parts) == 1 else parts[0])[1]


def low_rate_rtts(sock: zmq.Socket, requests: list, n: int) -> np.ndarray:
    """One request at a time, one every 5 ms: the hop with nothing queued anywhere."""
    rtts = []
    for i in range(n):
        start = time.perf_counter()
        sock.send_multipart(requests[i % POOL])
        sock.recv_multipart()
        rtts.append(time.perf_counter() - start)
        pause = LOW_RATE_PERIOD_S - (time.perf_counter() - start)
        if pause > 0:
            time.sleep(pause)  # the pacing of the low-rate scenario
    return np.array(rtts[n // 10:]) * 1000  # drop the warm-up tenth


def window_rate(sock: zmq.Socket, requests: list, seconds: float) -> float:
    """Replies per second with WINDOW requests kept in flight."""
    sent = answered = 0
    for _ in range(WINDOW):
        sock.send_multipart(requests[sent % POOL])
        sent += 1
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        if not sock.poll(5000):
            raise RuntimeError("no reply for 5 s: the server side stalled")
        sock.recv_multipart()
        answered += 1
        sock.send_multipart(requests[sent % POOL])
        sent += 1
    rate = answered / (time.perf_counter() - start)
    while answered < sent and sock.poll(5000):  # let the window drain before the next test
        sock.recv_multipart()
        answered += 1
    return rate


def paced_rtts(sock: zmq.Socket, requests: list, rate: float, seconds: float) -> np.ndarray:
    """Send `rate` requests/s (cameras x fps x offload) and time each answer; a request not
    answered within 1 s counts as infinitely late."""
    period = 1.0 / rate
    n = max(1, int(rate * seconds))
    sent_at = np.full(POOL, np.nan)
    rtts: list[float] = []
    start = time.perf_counter()
    for i in range(n):
        due = start + i * period
        while True:
            now = time.perf_counter()
            if now >= due:
                break
            if sock.poll(max(0.0, due - now) * 1000):
                while sock.poll(0):
                    m = msg_id_of(sock.recv_multipart())
                    rtts.append(time.perf_counter() - sent_at[m])
        sent_at[i % POOL] = time.perf_counter()
        sock.send_multipart(requests[i % POOL])
    while len(rtts) < n and sock.poll(1000):
        m = msg_id_of(sock.recv_multipart())
        rtts.append(time.perf_counter() - sent_at[m])
    rtts += [float("inf")] * (n - len(rtts))
    return np.array(rtts) * 1000


# -- the run ------------------------------------------------------------------------------------

def encoded_requests(artifacts: str, data_dir: str) -> tuple[list, bytes, int]:
    """POOL requests of one frame each: real test frames through the real head, int8 + lz4."""
    import torch

    edge = load_edge(artifacts)
    images = load_test_split(data_dir).images[:POOL]
    with torch.inference_mode():
        _, features = edge.head(torch.from_numpy(images).float() / 255)
    tag = wire.model_tag(edge.model_id)
    requests = [wire.encode_request(i, tag, features[i:i + 1].numpy())
                for i in range(POOL)]
    return requests, tag, features.shape[1]


def dealer(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    return sock


def measure(name: str, address: str, requests: list, args, rows: list) -> None:
    sock = dealer(address)
    try:
        # a first round trip proves the path is up (the broker has its workers)
        sock.send_multipart(requests[0])
        if not sock.poll(START_TIMEOUT_S * 1000):
            raise RuntimeError(f"{name}: no answer")
        sock.recv_multipart()
        rtt = low_rate_rtts(sock, requests, args.low_rate_requests)
        rate = window_rate(sock, requests, args.seconds)
    finally:
        sock.close()
    rows.append((name, np.percentile(rtt, 50), np.percentile(rtt, 99), rate))
    print(f"I: {name}: p50 {rows[-1][1]:.3f} ms, p99 {rows[-1][2]:.3f} ms, {rate:.0f} msg/s",
          flush=True)


def cameras(address: str, requests: list, args) -> list:
    """Double the cameras until the hop p99 passes the budget, then try halfway between
    the last count that held it and the first that did not."""
    sock = dealer(address)
    out: list = []

    def step(n: int) -> bool:
        rate = n * CAMERA_FPS * args.offload
        rtt = paced_rtts(sock, requests, rate, args.seconds)
        p99 = float(np.percentile(rtt, 99))
        out.append((n, rate, float(np.percentile(rtt, 50)), p99))
        print(f"I: {n} cameras ({rate:.0f} requests/s): p50 {out[-1][2]:.2f} ms, "
              f"p99 {p99:.2f} ms", flush=True)
        return p99 <= P99_BUDGET_MS

    try:
        n = args.start_cameras
        while step(n) and n < args.max_cameras:
            n *= 2
        if out[-1][3] > P99_BUDGET_MS and len(out) > 1:
            step((n + n // 2) // 2)
    finally:
        sock.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="runs/default")
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    ap.add_argument("--low-rate-requests", type=int, default=2000)
    ap.add_argument("--offload", type=float, default=0.3, help="fraction a camera offloads")
    ap.add_argument("--start-cameras", type=int, default=25)
    ap.add_argument("--max-cameras", type=int, default=6400)
    ap.add_argument("--workers", type=int, default=2, help="tail workers for the camera table")
    args = ap.parse_args()

    registry = metrics()  # before any server starts: they write their metrics where it reads
    requests, tag, width = encoded_requests(args.artifacts, args.data)
    payload = np.mean([len(r[1]) for r in requests])
    print(f"I: {POOL} requests of one {width}-wide int8 frame, {payload:.0f} B payload on "
          f"average", flush=True)
    spawn = multiprocessing.get_context("spawn")
    rows: list = []

    def run_server(name, targets, address):
        procs = [spawn.Process(target=t, args=a, daemon=True) for t, a in targets]
        for p in procs:
            p.start()
        try:
            measure(name, address, requests, args, rows)
        finally:
            for p in procs:
                p.kill()
                p.join()

    direct = f"tcp://127.0.0.1:{free_port()}"
    run_server("direct DEALER-ROUTER", [(echo_router, (direct,))], direct)
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    run_server("minimal Python broker + echo worker",
               [(minimal_broker, (front, back)), (minimal_echo_worker, (back,))], front)

    group = ProcessGroup()
    try:  # ours, with a protocol-speaking echo worker: the broker's own cost
        front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        group.start("broker", run_broker, BrokerConfig(front, back))
        group.start("echo", protocol_echo_worker, back, tag)
        wait_until(lambda: registry.get_sample_value("splitexit_broker_workers") == 1,
                   START_TIMEOUT_S, "the echo worker known to the broker", group.procs)
        measure("our broker + echo worker", front, requests, args, rows)
    finally:
        group.stop()
    group = ProcessGroup()
    try:  # ours, end to end on the server side: broker + real tail workers
        front, _, _ = start_pool(group, args.artifacts, args.workers)
        measure(f"our broker + {args.workers} tail workers", front, requests, args, rows)
        camera_rows = cameras(front, requests, args)
    finally:
        group.stop()

    floor_rtt, floor_rate = rows[1][1], rows[1][3]
    print("\n| path | hop p50 ms | hop p99 ms | vs minimal broker p50 | msg/s (window "
          f"{WINDOW}) | vs minimal broker msg/s |\n|---|---|---|---|---|---|")
    for name, p50, p99, rate in rows:
        print(f"| {name} | {p50:.3f} | {p99:.3f} | {p50 / floor_rtt:.2f}x | {rate:.0f} | "
              f"{100 * rate / floor_rate:.0f} % |")
    print(f"\n| cameras at {CAMERA_FPS:g} fps, {100 * args.offload:.0f} % offloaded | requests/s "
          f"| hop p50 ms | hop p99 ms | p99 <= {P99_BUDGET_MS:g} ms |\n|---|---|---|---|---|")
    for n, rate, p50, p99 in camera_rows:
        print(f"| {n} | {rate:.0f} | {p50:.2f} | {p99:.2f} | "
              f"{'yes' if p99 <= P99_BUDGET_MS else 'no'} |")


if __name__ == "__main__":
    main()
