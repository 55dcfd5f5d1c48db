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
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import zmq
import zmq.asyncio

from pipeline import wire
from pipeline.artifacts import load_edge
from pipeline.calibrate import exit_scores
from pipeline.errors import ConfigError
from pipeline.wire import Codec, DType, Refusal, WireError

__all__ = ["EdgeConfig", "Outcome", "EdgeProducer", "run_producer", "DTYPES", "CODECS"]

DTYPES = {"float32": DType.FLOAT32, "float16": DType.FLOAT16, "int8": DType.INT8}
CODECS = {"lz4": Codec.LZ4, "none": Codec.NONE}
CAPTURE_QUEUE_FRAMES = 8        # frames between the capture thread and the head
REFUSAL_REASON = {Refusal.BUSY: "busy", Refusal.WRONG_MODEL: "wrong_model",
                  Refusal.BAD_REQUEST: "bad_request", Refusal.NO_WORKER: "no_worker"}


@dataclass
class EdgeConfig:
    broker: str = "tcp://127.0.0.1:5555"   # the broker's frontend
    deadline_ms: float = 100.0             # wait this long for the server, then answer locally
    dtype: str = "int8"                    # features on the wire: float32 | float16 | int8
    codec: str = "lz4"                     # lz4 (only when it shrinks) | none
    producer_id: int = 0
    results: str | None = None             # append one JSON line per frame here
    send_queue: int = 1000                 # requests ZeroMQ may hold while the link is down

    def validate(self) -> "EdgeConfig":
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.codec not in CODECS:
            raise ConfigError(f"--codec {self.codec!r}: choose one of {', '.join(CODECS)}")
        if self.deadline_ms <= 0:
            raise ConfigError(f"--deadline-ms {self.deadline_ms} must be positive")
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
    head_ms: float
    latency_ms: float            # capture -> final answer
    uplink_bytes: int = 0        # bytes this frame's request put on the wire
    worker: str | None = None
    queue_us: int | None = None
    tail_us: int | None = None
    batch: int | None = None


@dataclass
class Pending:
    frame: object
    exit_cls: int
    exit_conf: float
    head_ms: float
    deadline: float              # monotonic
    uplink_bytes: int


@dataclass
class Summary:
    frames: int = 0
    paths: Counter = field(default_factory=Counter)
    fallback_reasons: Counter = field(default_factory=Counter)
    duplicates: int = 0
    bad_answers: int = 0
    uplink_bytes: int = 0
    feature_bytes: int = 0
    correct: int = 0
    labelled: int = 0
    latency_ms: dict = field(default_factory=lambda: {"exit": [], "offload": [], "fallback": []})


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
        self.sock.connect(cfg.broker)
        self.pending: dict[int, Pending] = {}
        self.next_msg_id = 1
        self.summary = Summary()
        self.results = open(cfg.results, "a") if cfg.results else None
        self.capture_done = False

    # -- the one place a frame is finished ----------------------------------------------------

    def finalize(self, outcome: Outcome) -> None:
        s = self.summary
        s.frames += 1
        s.paths[outcome.path] += 1
        if outcome.reason:
            s.fallback_reasons[outcome.reason] += 1
        if outcome.label is not None:
            s.labelled += 1
            s.correct += int(outcome.cls == outcome.label)
        s.latency_ms[outcome.path].append(outcome.latency_ms)
        if self.results:
            self.results.write(json.dumps(outcome.__dict__) + "\n")

    def _local(self, p: Pending, path: str, reason: str | None) -> Outcome:
        f = p.frame
        return Outcome(f.frame_id, f.source, path, p.exit_cls, p.exit_conf, f.label, reason,
                       p.head_ms, (time.time() - f.capture_ts) * 1000, p.uplink_bytes)

    def fallback(self, msg_id: int, reason: str) -> None:
        p = self.pending.pop(msg_id, None)
        if p is not None:
            self.finalize(self._local(p, "fallback", reason))

    # -- coroutines -----------------------------------------------------------------------------

    async def run(self, source) -> Summary:
        queue: asyncio.Queue = asyncio.Queue(CAPTURE_QUEUE_FRAMES)
        loop = asyncio.get_running_loop()
        capture = threading.Thread(target=self._capture, args=(source, queue, loop), daemon=True,
                                   name="capture")
        capture.start()
        receiver = asyncio.create_task(self._receive())
        expirer = asyncio.create_task(self._expire())
        try:
            await self._process(queue)
            while self.pending:  # last answers, bounded by their deadlines
                await asyncio.sleep(0.005)
        finally:
            receiver.cancel()
            expirer.cancel()
            await asyncio.gather(receiver, expirer, return_exceptions=True)
            if self.results:
                self.results.close()
            self.sock.close()
        return self.summary

    def _capture(self, source, queue: asyncio.Queue, loop) -> None:
        """Thread: read frames and hand them to the loop; blocks only on the queue."""
        try:
            for frame in source.frames():
                asyncio.run_coroutine_threadsafe(queue.put(frame), loop).result()
        finally:
            asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

    async def _process(self, queue: asyncio.Queue) -> None:
        deadline_s = self.cfg.deadline_ms / 1000
        while (frame := await queue.get()) is not None:
            start = time.perf_counter()
            with torch.inference_mode():
                x = torch.from_numpy(frame.pixels).view(1, -1)
                exit_logits, features = self.head(x)
            score = float(exit_scores(exit_logits, self.score)[0])
            exit_cls = int(exit_logits.argmax(1))
            head_ms = (time.perf_counter() - start) * 1000
            if score >= self.threshold:
                self.finalize(Outcome(frame.frame_id, frame.source, "exit", exit_cls, score,
                                            frame.label, None, head_ms,
                                            (time.time() - frame.capture_ts) * 1000))
                continue
            msg_id, self.next_msg_id = self.next_msg_id, self.next_msg_id + 1
            request = wire.encode_request(msg_id, self.cfg.producer_id, self.model_tag,
                                          int(frame.capture_ts * 1e6), [frame.frame_id],
                                          features.numpy(), self.dtype, self.codec)
            sent = wire.wire_bytes(request)
            self.pending[msg_id] = Pending(frame, exit_cls, score, head_ms,
                                           time.monotonic() + deadline_s, sent)
            try:
                await self.sock.send_multipart(request, flags=zmq.NOBLOCK)
            except zmq.Again:
                self.pending[msg_id].uplink_bytes = 0
                self.fallback(msg_id, "unreachable")
                continue
            self.summary.uplink_bytes += sent
            self.summary.feature_bytes += features.numel() * 4

    async def _receive(self) -> None:
        while True:
            if not await self.sock.poll(100, zmq.POLLIN):
                continue
            frames = await self.sock.recv_multipart()
            try:
                answer = wire.decode_answer(frames)
            except WireError:
                self.summary.bad_answers += 1
                continue
            if answer.msg_id not in self.pending:
                self.summary.duplicates += 1  # late, or a second answer after a redelivery
                continue
            if isinstance(answer, wire.Error):
                self.fallback(answer.msg_id, REFUSAL_REASON[answer.reason])
                continue
            p = self.pending.pop(answer.msg_id)
            f = p.frame
            self.finalize(Outcome(
                f.frame_id, f.source, "offload", int(answer.classes[0]),
                float(answer.confidences[0]), f.label, None, p.head_ms,
                (time.time() - f.capture_ts) * 1000, p.uplink_bytes, answer.worker_id,
                answer.queue_us, answer.tail_us, answer.batch))

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

    def frames(self):
        return (f for f in self.source.frames() if f.frame_id % self.count == self.index)

    def close(self) -> None:
        self.source.close()


def run_producer(artifact_dir: str, cfg: EdgeConfig, spec: str, fps: float | None = None,
                 limit: int | None = None, data_dir: str | None = None,
                 shard: tuple[int, int] | None = None) -> Summary:
    """Process entry point for one producer: open the source, run it to its end."""
    from pipeline.sources import open_source

    count = shard[1] if shard else 1
    source = open_source(spec, fps=fps * count if fps else None, limit=limit,
                         data_dir=data_dir)
    if shard:
        source = Shard(source, *shard)

    async def main():
        producer = EdgeProducer(artifact_dir, cfg)
        return await producer.run(source)

    try:
        summary = asyncio.run(main())
    finally:
        source.close()
    print_summary(summary)
    return summary


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def print_summary(s: Summary, file=sys.stderr) -> None:
    acc = f", accuracy {100 * s.correct / s.labelled:.2f}%" if s.labelled else ""
    print(f"I: edge: {s.frames} frames: {dict(s.paths)}, fallbacks {dict(s.fallback_reasons)}, "
          f"duplicates {s.duplicates}{acc}", file=file, flush=True)
