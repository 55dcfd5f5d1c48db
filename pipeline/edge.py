"""An edge producer: head + exit on every frame, offload the unsure ones, one answer each.

One asyncio loop, one coroutine per concern (pyzmq's coroutines.py shape):
    capture  - a thread reads the source and hands frames over; it never waits on the network
    process  - head + exit; confident -> final local answer; else send a request (never blocks:
               a full send queue means the server is unreachable -> local answer now)
    receive  - poll, then read (never wait_for(recv): pyzmq #1925 loses the message) answers
    expire   - a frame whose deadline passes is finalized with its local exit answer

Every frame gets exactly one final answer: `finalize` pops the frame from `pending` and only
the first caller finds it there; a late or duplicate reply finds nothing and is counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import zmq
import zmq.asyncio

from monitoring import metrics as m
from pipeline import wire
from pipeline.artifacts import load_edge
from pipeline.calibrate import exit_scores
from pipeline.errors import ConfigError
from pipeline.security import HANDSHAKE_FAILED, HANDSHAKE_HINT, PLAINTEXT_LOOPBACK, Security
from pipeline.wire import Codec, DType, Refusal, WireError

__all__ = ["EdgeConfig", "Outcome", "EdgeProducer", "run_producer", "DTYPES", "CODECS"]

DTYPES = {"float32": DType.FLOAT32, "float16": DType.FLOAT16, "int8": DType.INT8}
CODECS = {"lz4": Codec.LZ4, "none": Codec.NONE}
CAPTURE_QUEUE_FRAMES = 256      # frames between the capture thread and the head (files, replay)
LIVE_QUEUE_FRAMES = 2           # ... for cameras and streams: stale frames are dropped upstream
REFUSAL_REASON = {Refusal.BUSY: "busy", Refusal.WRONG_MODEL: "wrong_model",
                  Refusal.BAD_REQUEST: "bad_request", Refusal.NO_WORKER: "no_worker"}
PATHS = ("exit", "offload", "fallback")
FALLBACK_REASONS = (*REFUSAL_REASON.values(), "deadline", "unreachable")
REQUEST_STATUSES = ("answered", "refused", "deadline", "unreachable")


@dataclass
class EdgeConfig:
    broker: str = "tcp://127.0.0.1:5555"   # the broker's frontend
    deadline_ms: float = 100.0             # wait this long for the server, then answer locally
    dtype: str = "int8"                    # features on the wire: float32 | float16 | int8
    codec: str = "lz4"                     # lz4 (only when it shrinks) | none
    producer_id: int = 0
    results: str | None = None             # append one JSON line per frame here
    send_queue: int = 1000                 # requests ZeroMQ may hold while the link is down
    max_pack: int = 64                     # frames per request when several are waiting
    threads: int = 1                       # torch threads: more spin and starve the loop
    security: Security = PLAINTEXT_LOOPBACK

    def validate(self) -> "EdgeConfig":
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.codec not in CODECS:
            raise ConfigError(f"--codec {self.codec!r}: choose one of {', '.join(CODECS)}")
        if self.deadline_ms <= 0:
            raise ConfigError(f"--deadline-ms {self.deadline_ms} must be positive")
        self.security.check([self.broker], "edge")
        if not 1 <= self.max_pack <= wire.MAX_FRAMES_PER_REQUEST:
            raise ConfigError(f"--max-pack {self.max_pack} must be in "
                              f"1..{wire.MAX_FRAMES_PER_REQUEST}")
        return self


@dataclass
class Outcome:
    """The one final answer for a frame (a JSONL line)."""
    frame: int
    source: str
    path: str                    # exit | offload | fallback
    cls: int
    confidence: float
    label: int | None
    reason: str | None           # why a fallback happened
    capture_ts: float            # wall clock at capture (time.time())
    head_ms: float
    latency_ms: float            # capture -> final answer
    uplink_bytes: int = 0        # bytes this frame's request put on the wire
    worker: str | None = None
    queue_us: int | None = None
    tail_us: int | None = None
    batch: int | None = None


@dataclass
class Pending:
    """One request in flight: the frames it packs and their local exit answers."""
    frames: list
    exit_cls: list[int]
    exit_conf: list[float]
    head_ms: float
    deadline: float              # monotonic
    uplink_bytes: int            # the whole message; each frame is charged its share


@dataclass
class Summary:
    frames: int = 0
    paths: Counter = field(default_factory=Counter)
    fallback_reasons: Counter = field(default_factory=Counter)
    duplicates: int = 0
    correct: int = 0
    labelled: int = 0


def _shares(p: Pending) -> list[int]:
    """Split a message's bytes over its frames so that the shares sum to the message."""
    n = len(p.frames)
    return [p.uplink_bytes // n + (i < p.uplink_bytes % n) for i in range(n)]


class EdgeProducer:
    def __init__(self, artifact_dir: str, cfg: EdgeConfig, ctx: zmq.asyncio.Context | None = None):
        self.cfg = cfg.validate()
        edge = load_edge(artifact_dir)
        self.head, self.threshold, self.score = edge.head.eval(), edge.threshold, edge.score
        self.model_tag = wire.model_tag(edge.model_id)
        self.dtype, self.codec = DTYPES[cfg.dtype], CODECS[cfg.codec]
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = cfg.send_queue
        self.sock.identity = f"edge-{cfg.producer_id}-{os.getpid()}".encode()
        cfg.security.client_socket(self.sock)
        self.monitor = self.sock.get_monitor_socket(HANDSHAKE_FAILED) if cfg.security.curve \
            else None
        self.sock.connect(cfg.broker)
        self.pending: dict[int, Pending] = {}
        self.next_msg_id = 1
        self.summary = Summary()
        try:
            self.results = open(cfg.results, "a") if cfg.results else None
        except OSError as e:
            raise ConfigError(f"cannot write results to {cfg.results}: {e.strerror}") from None
        producer = str(cfg.producer_id)  # metric children bound once: no lookups per frame
        self.m_frames = {p: m.EDGE_FRAMES.labels(producer, p) for p in PATHS}
        self.m_latency = {p: m.EDGE_LATENCY.labels(producer, p) for p in PATHS}
        self.m_head = m.EDGE_HEAD.labels(producer)
        self.m_fallbacks = {r: m.EDGE_FALLBACKS.labels(producer, r) for r in FALLBACK_REASONS}
        self.m_requests = {r: m.EDGE_REQUESTS.labels(producer, r) for r in REQUEST_STATUSES}
        self.m_uplink = m.EDGE_UPLINK_BYTES.labels(producer)
        self.m_feature = m.EDGE_FEATURE_BYTES.labels(producer)
        self.m_payload = m.EDGE_PAYLOAD_BYTES.labels(producer)
        self.m_duplicates = m.EDGE_DUPLICATES.labels(producer)

    # -- the one place a frame is finished ----------------------------------------------------

    def finalize(self, outcome: Outcome) -> None:
        s = self.summary
        s.frames += 1
        s.paths[outcome.path] += 1
        self.m_frames[outcome.path].inc()
        self.m_latency[outcome.path].observe(outcome.latency_ms / 1000)
        if outcome.reason:
            s.fallback_reasons[outcome.reason] += 1
            self.m_fallbacks[outcome.reason].inc()
        if outcome.label is not None:
            s.labelled += 1
            s.correct += int(outcome.cls == outcome.label)
        if self.results:
            self.results.write(json.dumps(outcome.__dict__) + "\n")

    def fallback(self, msg_id: int, reason: str) -> None:
        p = self.pending.pop(msg_id, None)
        if p is None:
            return
        status = reason if reason in ("deadline", "unreachable") else "refused"
        self.m_requests[status].inc()
        now = time.time()
        for f, cls, conf, share in zip(p.frames, p.exit_cls, p.exit_conf, _shares(p)):
            self.finalize(Outcome(f.frame_id, f.source, "fallback", cls, conf, f.label, reason,
                                  f.capture_ts, p.head_ms, (now - f.capture_ts) * 1000, share))

    # -- coroutines -----------------------------------------------------------------------------

    async def run(self, source) -> Summary:
        # A live source keeps only its newest frame itself; a deep queue here would undo that.
        frames: queue.Queue = queue.Queue(LIVE_QUEUE_FRAMES if getattr(source, "live", False)
                                          else CAPTURE_QUEUE_FRAMES)
        arrived = asyncio.Event()
        loop = asyncio.get_running_loop()
        capture = threading.Thread(target=self._capture, args=(source, frames, arrived, loop),
                                   daemon=True, name="capture")
        capture.start()
        receiver = asyncio.create_task(self._receive())
        expirer = asyncio.create_task(self._expire())
        watcher = asyncio.create_task(self._watch_handshake())
        try:
            await self._process(frames, arrived)
            while self.pending:  # last answers, bounded by their deadlines
                await asyncio.sleep(0.005)
        finally:
            for task in (receiver, expirer, watcher):
                task.cancel()
            await asyncio.gather(receiver, expirer, watcher, return_exceptions=True)
            if self.monitor is not None:
                self.sock.disable_monitor()
                self.monitor.close()
            if self.results:
                self.results.close()
            self.sock.close()
        return self.summary

    def _capture(self, source, frames: queue.Queue, arrived: asyncio.Event, loop) -> None:
        """Thread: read frames and hand them over; blocks only when the head falls behind."""
        try:
            for frame in source.frames():
                frames.put(frame)
                loop.call_soon_threadsafe(arrived.set)
        finally:
            frames.put(None)
            loop.call_soon_threadsafe(arrived.set)

    async def _next_frames(self, frames: queue.Queue, arrived: asyncio.Event) -> list:
        """Every frame waiting now (up to max_pack), or wait for one; None ends the source."""
        while True:
            arrived.clear()
            batch = []
            while len(batch) < self.cfg.max_pack:
                try:
                    batch.append(frames.get_nowait())
                except queue.Empty:
                    break
            if batch:
                return batch
            await arrived.wait()

    async def _process(self, frames: queue.Queue, arrived: asyncio.Event) -> None:
        deadline_s = self.cfg.deadline_ms / 1000
        while True:
            batch = await self._next_frames(frames, arrived)
            done = batch[-1] is None
            batch = [f for f in batch if f is not None]
            if batch:
                await self._handle(batch, deadline_s)
            if done:
                return

    async def _handle(self, batch: list, deadline_s: float) -> None:
        """Head + exit on the frames that are waiting; answer or pack the unsure into one
        request (packing adds no wait: only frames already here go together)."""
        start = time.perf_counter()
        with torch.inference_mode():
            x = torch.from_numpy(np.stack([f.pixels for f in batch]))  # (B, 784)
            exit_logits, features = self.head(x)
        scores = exit_scores(exit_logits, self.score)
        exit_cls = exit_logits.argmax(1).tolist()
        head_ms = (time.perf_counter() - start) * 1000 / len(batch)
        for _ in batch:
            self.m_head.observe(head_ms / 1000)
        now, unsure = time.time(), []
        for i, f in enumerate(batch):
            if scores[i] >= self.threshold:
                self.finalize(Outcome(f.frame_id, f.source, "exit", exit_cls[i],
                                      float(scores[i]), f.label, None, f.capture_ts, head_ms,
                                      (now - f.capture_ts) * 1000))
            else:
                unsure.append(i)
        if not unsure:
            return
        msg_id, self.next_msg_id = self.next_msg_id, self.next_msg_id + 1
        offloaded = [batch[i] for i in unsure]
        request = wire.encode_request(msg_id, self.cfg.producer_id, self.model_tag,
                                      int(offloaded[0].capture_ts * 1e6),
                                      [f.frame_id for f in offloaded],
                                      features[unsure].numpy(), self.dtype, self.codec)
        sent = wire.wire_bytes(request)
        self.pending[msg_id] = Pending(offloaded, [exit_cls[i] for i in unsure],
                                       [float(scores[i]) for i in unsure], head_ms,
                                       time.monotonic() + deadline_s, sent)
        try:
            await self.sock.send_multipart(request, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.pending[msg_id].uplink_bytes = 0
            self.fallback(msg_id, "unreachable")
            return
        self.m_uplink.inc(sent)
        self.m_feature.inc(len(unsure) * features.shape[1] * wire.ITEMSIZE[self.dtype])
        self.m_payload.inc(len(request[1]))

    async def _receive(self) -> None:
        while True:
            if not await self.sock.poll(100, zmq.POLLIN):
                continue
            frames = await self.sock.recv_multipart()
            try:
                answer = wire.decode_answer(frames)
            except WireError as e:
                m.BAD_MESSAGES.labels("edge", e.reason).inc()
                continue
            if answer.msg_id not in self.pending:
                self.summary.duplicates += 1  # late, or a second answer after a redelivery
                self.m_duplicates.inc()
                continue
            if isinstance(answer, wire.Error):
                self.fallback(answer.msg_id, REFUSAL_REASON[answer.reason])
                continue
            if len(answer.classes) != len(self.pending[answer.msg_id].frames):
                m.BAD_MESSAGES.labels("edge", "shape").inc()  # other frames': deadline decides
                continue
            p = self.pending.pop(answer.msg_id)
            self.m_requests["answered"].inc()
            now = time.time()
            for f, cls, conf, share in zip(p.frames, answer.classes.tolist(),
                                           answer.confidences.tolist(), _shares(p)):
                self.finalize(Outcome(f.frame_id, f.source, "offload", cls, conf, f.label, None,
                                      f.capture_ts, p.head_ms, (now - f.capture_ts) * 1000,
                                      share, answer.worker_id, answer.queue_us,
                                      answer.tail_us, answer.batch))

    async def _watch_handshake(self) -> None:
        """A rejected key looks like a silent broker (libzmq #2227): say it once."""
        if self.monitor is None:
            return
        await self.monitor.recv_multipart()
        print(f"E: edge {self.cfg.producer_id}: {HANDSHAKE_HINT}", file=sys.stderr, flush=True)

    async def _expire(self) -> None:
        step = min(0.01, self.cfg.deadline_ms / 4000)
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            for msg_id in [m for m, p in self.pending.items() if p.deadline <= now]:
                self.fallback(msg_id, "deadline")


class Shard:
    """Every count-th frame of a source, starting at index: M producers share one replay."""

    def __init__(self, source, index: int, count: int):
        self.source, self.index, self.count = source, index, count
        self.live = source.live

    def frames(self):
        return (f for f in self.source.frames() if f.frame_id % self.count == self.index)

    def close(self) -> None:
        self.source.close()


def run_producer(artifact_dir: str, cfg: EdgeConfig, spec: str, fps: float | None = None,
                 limit: int | None = None, data_dir: str | None = None,
                 shard: tuple[int, int] | None = None, loop: bool = False) -> Summary:
    """Process entry point for one producer: open the source, run it to its end."""
    from pipeline.sources import open_source

    count = shard[1] if shard else 1
    source = open_source(spec, fps=fps * count if fps else None, limit=limit,
                         data_dir=data_dir, loop=loop)
    if shard:
        source = Shard(source, *shard)

    torch.set_num_threads(cfg.threads)

    async def main():
        producer = EdgeProducer(artifact_dir, cfg)
        return await producer.run(source)

    try:
        summary = asyncio.run(main())
    finally:
        source.close()
    print_summary(summary)
    return summary


def print_summary(s: Summary, file=sys.stderr) -> None:
    acc = f", accuracy {100 * s.correct / s.labelled:.2f}%" if s.labelled else ""
    print(f"I: edge: {s.frames} frames: {dict(s.paths)}, fallbacks {dict(s.fallback_reasons)}, "
          f"duplicates {s.duplicates}{acc}", file=file, flush=True)
