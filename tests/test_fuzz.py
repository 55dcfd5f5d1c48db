"""Hostile input on every socket: 100k malformed messages at the broker (frontend and
backend) and straight at a worker. The processes stay up, every bad message is counted with
a reason or answered, and real traffic is served afterwards."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import lz4.block
import msgpack
import numpy as np
import zmq

from monitoring.top import scrape as top_scrape

from pipeline.protocol import wire
from pipeline.model.artifacts import load_edge
from tests.conftest import ROOT, free_port
from workers.pool import START_TIMEOUT_S, wait_until

BROKER_MESSAGES = 60_000
WORKER_MESSAGES = 40_000


def hostile_messages(n: int, tag: bytes, width: int, seed: int = 0):
    """A seeded mix of every kind of bad input, built around one valid request (its fixed
    header: version 0, kind 1, dtype << 4 | codec 2, frames - 1 3, msg_id 4..8, model tag
    8..12, width 12..14; then scales, then the payload)."""
    rng = np.random.default_rng(seed)
    [good] = wire.encode_request(1, tag, np.ones((1, width), np.float32), wire.DType.FLOAT32,
                                 wire.Codec.NONE)
    head, body = good[:wire.REQUEST_HEADER_BYTES], good[wire.REQUEST_HEADER_BYTES:]

    def patched(offset: int, value: bytes, payload: bytes | None = None):
        h = head[:offset] + value + head[offset + len(value):]
        return [h + (body if payload is None else payload)]

    def types(dtype: int, codec: int) -> bytes:
        return bytes([dtype << 4 | codec])

    [uint4] = wire.encode_request(1, tag, np.ones((1, width - 1), np.float32),
                                  wire.DType.UINT4, wire.Codec.NONE)
    def wrong_version() -> int:
        v = int(rng.integers(0, 255))
        return v + (v >= wire.VERSION)  # any byte but the current version

    bomb = lz4.block.compress(bytes(8_000_000), store_size=False)
    makers = [
        lambda: [rng.bytes(int(rng.integers(0, 64)))
                 for _ in range(int(rng.integers(1, 5)))],                    # random frames
        lambda: patched(0, bytes([wrong_version()])),                          # wrong version
        lambda: [msgpack.packb([1, 1, 5, 1, tag, 0, [0], width, 0, 0, b""]) + body],  # v1
        lambda: [good[:int(rng.integers(1, wire.REQUEST_HEADER_BYTES))]],     # truncated header
        lambda: [head + body[:int(rng.integers(0, len(body)))]],              # truncated payload
        lambda: patched(3, bytes([255]) + bytes(4) + tag + (60_000).to_bytes(2, "little"),
                        bytes(100)),                                          # oversized shape
        lambda: patched(2, types(0, 1), bomb[:int(rng.integers(100, 5000))]),  # lz4 bomb
        lambda: [head + np.full(width, np.nan, np.float32).tobytes()],        # NaN features
        lambda: [head + np.full(width, np.inf, np.float32).tobytes()],        # Inf features
        lambda: patched(12, (width + 1).to_bytes(2, "little"),
                        bytes(4 * (width + 1))),                              # wrong shape
        lambda: patched(2, types(int(rng.integers(6, 16)), 0)),               # unknown dtype
        lambda: patched(2, types(0, int(rng.integers(2, 16)))),               # unknown codec
        lambda: patched(8, rng.bytes(wire.MODEL_TAG_BYTES)),                  # unknown model id
        lambda: patched(2, types(4, 0), body[:20]),                           # no scales
        lambda: [uint4[:-1] + bytes([uint4[-1] | 0xF0])],                     # padding bits set
        lambda: [bytes([wire.VERSION, int(rng.integers(2, 7))])
                 + rng.bytes(int(rng.integers(0, 40)))],                      # wrong kind
    ]
    for i in range(n):
        frames = makers[i % len(makers)]()
        if len(frames[0]) >= 8:   # a msg_id of its own, so none is refused as a duplicate
            frames[0] = frames[0][:4] + (i + 1).to_bytes(4, "little") + frames[0][8:]
        yield frames


def scrape(port: int):
    return top_scrape([f"http://127.0.0.1:{port}/metrics"])


def ready(port: int) -> bool:
    """The launcher's readiness probe, as Kubernetes would call it."""
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5).status == 200
    except OSError:  # not listening yet, or 503
        return False


def cli(*args):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_100k_hostile_messages_are_counted_and_nothing_dies(artifacts, tmp_path):
    edge = load_edge(artifacts)
    tag, width = wire.model_tag(edge.model_id), 40
    front, back = free_port(), free_port()
    broker_metrics, worker_metrics = free_port(), free_port()
    broker = cli("broker", "--insecure", "--frontend", f"tcp://127.0.0.1:{front}",
                 "--backend", f"tcp://127.0.0.1:{back}", "--metrics-port", str(broker_metrics),
                 "--max-queue", "100000", "--queue-timeout-ms", "3600000")  # all reach the worker
    workers = cli("workers", "-n", "1", "--insecure", "--artifacts", str(artifacts), "--join",
                  f"tcp://127.0.0.1:{back}", "--metrics-port", str(worker_metrics),
                  "--metrics-dir", str(tmp_path / "wm"))
    ctx = zmq.Context()
    try:
        wait_until(lambda: ready(broker_metrics) and ready(worker_metrics), START_TIMEOUT_S,
                   "broker and its worker ready", [broker, workers])
        # 1. through the broker's frontend, as an edge would
        attacker = ctx.socket(zmq.DEALER)
        attacker.linger = 0
        attacker.connect(f"tcp://127.0.0.1:{front}")
        for frames in hostile_messages(BROKER_MESSAGES, tag, width):
            attacker.send_multipart(frames)
        # ... and garbage control messages at its backend, as a rogue worker would
        rogue = ctx.socket(zmq.DEALER)
        rogue.linger = 0
        rogue.connect(f"tcp://127.0.0.1:{back}")
        rogue_bad = 0  # heartbeats and disconnects from a stranger are legal, the rest not
        for frames in hostile_messages(2000, tag, width, seed=1):
            if len(frames[0]) > wire.MAX_REPLY_BYTES:
                continue  # no worker sends that much: the broker drops the sender unread
            rogue.send_multipart(frames[:1])
            try:
                wire.decode_control(frames[:1])
            except wire.WireError:
                rogue_bad += 1
        # 2. straight at a worker, from a fake broker it connects to
        fake_port = free_port()
        fake_broker = ctx.socket(zmq.ROUTER)
        fake_broker.linger = 0
        fake_broker.router_mandatory = 1  # block instead of silently dropping at the HWM
        fake_broker.sndtimeo = 30_000
        fake_broker.rcvhwm = 0            # never make the worker wait to send its refusals
        fake_broker.bind(f"tcp://127.0.0.1:{fake_port}")
        target = cli("workers", "-n", "1", "--insecure", "--artifacts", str(artifacts), "--join",
                     f"tcp://127.0.0.1:{fake_port}", "--metrics-port", "0")
        assert fake_broker.poll(30_000), "worker never announced itself"
        identity = fake_broker.recv_multipart()[0]
        valid = wire.encode_request(99, tag, np.ones((1, width), np.float32))
        hostile = list(hostile_messages(WORKER_MESSAGES, tag, width, seed=2)) + [valid]
        answer, refusals = None, 0
        deadline = time.monotonic() + 120
        for start in range(0, len(hostile), 500):  # a real broker reads while it sends
            for k, frames in enumerate(hostile[start:start + 500]):
                # one frame: as a request from an edge, or (every third) as a control message
                as_request = len(frames) == 1 and (k % 3 or frames is valid)
                fake_broker.send_multipart([identity, b"edge"] + frames if as_request
                                           else [identity] + frames)
            while fake_broker.poll(0 if start + 500 < len(hostile) else 2000):
                frames = fake_broker.recv_multipart()
                if len(frames) != 3:
                    continue  # READY again after a DISCONNECT-kind message, or a heartbeat
                reply = wire.decode_answer(frames[2:])
                if isinstance(reply, wire.Reply) and reply.msg_id == 99:
                    answer = reply
                elif isinstance(reply, wire.Error):
                    refusals += 1
            assert time.monotonic() < deadline
        assert answer is not None, f"no answer to the valid request ({refusals} refusals)"
        assert answer.classes.shape == (1,)
        assert target.poll() is None, "the fuzzed worker died"
        target.terminate()
        assert target.wait(15) == 0

        def accounted() -> float:
            """Every hostile message sent through the broker, counted somewhere: refused by
            the broker (as bad, or as a msg_id already in flight), or dispatched and then
            refused by the worker."""
            b, w = scrape(broker_metrics), scrape(worker_metrics)
            return (b.total("splitexit_bad_messages_total", component="broker_frontend")
                    + b.total("splitexit_broker_requests_total", status="duplicate")
                    + w.total("splitexit_bad_messages_total")
                    + w.total("splitexit_worker_requests_total", status="wrong_model"))

        # the worker drains its backlog: wait until all of it is counted, then for the rogue
        wait_until(lambda: accounted() >= BROKER_MESSAGES, START_TIMEOUT_S,
                   f"{BROKER_MESSAGES} hostile messages counted", [broker, workers])
        wait_until(lambda: scrape(broker_metrics).total(
            "splitexit_bad_messages_total", component="broker_backend") >= rogue_bad,
            START_TIMEOUT_S, "the rogue worker's messages counted", [broker, workers])
        assert broker.poll() is None and workers.poll() is None
        b, w = scrape(broker_metrics), scrape(worker_metrics)
        assert b.total("splitexit_broker_requests_total", status="busy") == 0
        assert accounted() == BROKER_MESSAGES  # nothing counted twice
        assert b.total("splitexit_bad_messages_total", component="broker_backend") == rogue_bad
        reasons = {r for snap in (b, w) for r in snap.by("splitexit_bad_messages_total",
                                                          "reason")}
        assert {"malformed", "version", "shape", "nonfinite", "size"} <= reasons
    finally:
        for p in (broker, workers):
            p.terminate()
            p.wait(15)
        ctx.destroy(linger=0)
