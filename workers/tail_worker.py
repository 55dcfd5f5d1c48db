"""A tail worker: takes offloaded features from the broker, batches them, runs the tail once.

Loop shape (zguide Paranoid Pirate worker): poll with a timeout -> read what arrived ->
run a batch when it is due -> heartbeat -> reconnect if the broker went silent.

Dynamic batching mirrors Triton's knobs: a batch runs when it holds `max_batch` frames or
its oldest request has waited `max_wait_ms`, whichever comes first (`batch_due`, pure).
Credit: the worker tells the broker how many requests it may hold at once, so the broker
never queues work on a busy worker while another is idle.

SIGTERM drains: the worker says DISCONNECT (the broker sends nothing new), answers what it
holds and what is still in transit for a short grace period, then exits. Anything it could
not answer is redelivered by the broker when the worker's heartbeats stop.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import zmq

from monitoring import metrics as m
from pipeline import wire
from pipeline.artifacts import load_server
from pipeline.broker import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS
from pipeline.security import PLAINTEXT_LOOPBACK, Security, watch_handshake
from pipeline.wire import Kind, Refusal, WireError

__all__ = ["WorkerConfig", "TailWorker", "batch_due", "run_worker"]

RECONNECT_INITIAL_S = 0.25
RECONNECT_MAX_S = 4.0
DRAIN_GRACE_S = 0.5


@dataclass
class WorkerConfig:
    broker: str = "tcp://127.0.0.1:5556"   # the broker's backend
    max_batch: int = 64                    # frames per tail call
    max_wait_ms: float = 2.0               # oldest request's wait before a partial batch runs
    credit: int = 0                        # requests held at once; 0 = 2 x max_batch
    threads: int = 1                       # torch threads per worker process
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    security: Security = PLAINTEXT_LOOPBACK


def batch_due(frames: int, oldest_arrival: float | None, max_batch: int, max_wait_s: float,
              now: float) -> bool:
    """Run now if the batch is full, or its oldest request has waited long enough."""
    if not frames:
        return False
    return frames >= max_batch or now - oldest_arrival >= max_wait_s


class TailWorker:
    def __init__(self, artifact_dir: str, cfg: WorkerConfig, worker_id: str | None = None,
                 ctx: zmq.Context | None = None):
        self.cfg = cfg
        cfg.security.check([cfg.broker], "worker")
        server = load_server(artifact_dir)
        self.tail = server.tail.eval()
        self.model_id = server.model_id
        self.model_tag = wire.model_tag(server.model_id)
        model = server.config.model
        self.width = model.widths[model.split]
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.credit = cfg.credit or 2 * cfg.max_batch
        self.ctx = ctx or zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.watching = False
        self.pending: list = []          # (edge, Request, arrival)
        self.pending_frames = 0
        self.running = True
        self.draining_since: float | None = None
        self.refused: dict[str, int] = {}
        self.batches = 0
        self.frames = 0
        w = self.worker_id  # metric children bound once
        self.m_ok = m.WORKER_REQUESTS.labels(w, "ok")
        self.m_frames, self.m_tail = m.WORKER_FRAMES.labels(w), m.WORKER_TAIL.labels(w)
        self.m_batch, self.m_queue = m.WORKER_BATCH.labels(w), m.WORKER_QUEUE.labels(w)

    # -- connection ---------------------------------------------------------------------------

    def connect(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.identity = self.worker_id.encode()
        self.cfg.security.client_socket(self.sock)
        if self.cfg.security.curve and not self.watching:
            watch_handshake(self.sock, f"worker {self.worker_id}")
            self.watching = True
        self.sock.connect(self.cfg.broker)
        self.sock.send_multipart(wire.encode_ready(self.worker_id, self.model_tag, self.credit))

    def drain(self) -> None:
        """Stop taking work (SIGTERM): tell the broker, finish what is held, then leave."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()
            if self.sock is not None:
                self.sock.send_multipart(wire.DISCONNECT)

    # -- main loop ------------------------------------------------------------------------------

    def run(self) -> None:
        torch.set_num_threads(self.cfg.threads)
        self.connect()
        interval = self.cfg.heartbeat_interval_s
        max_wait_s = self.cfg.max_wait_ms / 1000
        liveness = self.cfg.heartbeat_liveness
        reconnect_s = RECONNECT_INITIAL_S
        heartbeat_at = time.monotonic() + interval
        while True:
            now = time.monotonic()
            if self.draining_since is not None and not self.pending and \
                    now - self.draining_since >= DRAIN_GRACE_S:
                return
            wake = heartbeat_at
            if self.pending:
                wake = min(wake, self.pending[0][2] + max_wait_s)
            if self.sock.poll(max(0.0, wake - now) * 1000, zmq.POLLIN):
                liveness = self.cfg.heartbeat_liveness
                reconnect_s = RECONNECT_INITIAL_S
                self._receive()
            now = time.monotonic()
            oldest = self.pending[0][2] if self.pending else None
            if batch_due(self.pending_frames, oldest, self.cfg.max_batch, max_wait_s, now) or \
                    (self.draining_since is not None and self.pending):
                self._run_batch()
            if now >= heartbeat_at:
                heartbeat_at = now + interval
                self.sock.send_multipart(wire.HEARTBEAT)
                liveness -= 1
                if liveness <= 0 and self.draining_since is None:
                    print(f"W: worker {self.worker_id}: broker silent, reconnecting in "
                          f"{reconnect_s:.2f} s", file=sys.stderr, flush=True)
                    time.sleep(reconnect_s)
                    reconnect_s = min(2 * reconnect_s, RECONNECT_MAX_S)
                    self.connect()
                    liveness = self.cfg.heartbeat_liveness

    def _receive(self, limit: int = 1000) -> None:
        for _ in range(limit):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 3:
                self._on_request(frames[0], frames[1:])
                continue
            try:
                control = wire.decode_control(frames)
            except WireError as e:
                self._count(e.reason)
                continue
            if control == Kind.DISCONNECT and self.draining_since is None:
                # The broker forgot us (it restarted, or thought us dead): announce again.
                self.sock.send_multipart(
                    wire.encode_ready(self.worker_id, self.model_tag, self.credit))

    def _on_request(self, edge: bytes, frames: list) -> None:
        try:
            request = wire.decode_request(frames)
        except WireError as e:
            self._count(e.reason)
            try:
                _, msg_id = wire.peek(frames[0])
            except WireError:
                return  # not even a header: nothing to answer
            self._refuse(edge, msg_id, Refusal.BAD_REQUEST, e.detail)
            return
        if request.model_tag != self.model_tag:
            self._count("wrong_model")
            self._refuse(edge, request.msg_id, Refusal.WRONG_MODEL,
                         f"worker serves model {self.model_id}, request is for model "
                         f"{request.model_tag.hex()}")
            return
        if request.features.shape[1] != self.width:
            self._count("shape")
            self._refuse(edge, request.msg_id, Refusal.BAD_REQUEST,
                         f"model {self.model_id} takes {self.width} features, got "
                         f"{request.features.shape[1]}")
            return
        self.pending.append((edge, request, time.monotonic()))
        self.pending_frames += len(request.frame_ids)

    def _refuse(self, edge: bytes, msg_id: int, reason: Refusal, detail: str) -> None:
        self.sock.send_multipart([edge] + wire.encode_error(msg_id, reason, detail))

    def _count(self, reason: str) -> None:
        """A refused or dropped request; `reason` is a WireError reason or wrong_model."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        m.WORKER_REQUESTS.labels(self.worker_id, reason).inc()
        if reason != "wrong_model":
            m.BAD_MESSAGES.labels("worker", reason).inc()

    def _run_batch(self) -> None:
        """Run the tail once over up to max_batch frames; reply to each request."""
        taken, frames = [], 0
        while self.pending and (not taken or frames + len(self.pending[0][1].frame_ids)
                                <= self.cfg.max_batch):
            item = self.pending.pop(0)
            taken.append(item)
            frames += len(item[1].frame_ids)
        self.pending_frames -= frames
        start = time.monotonic()
        x = torch.from_numpy(np.concatenate([r.features for _, r, _ in taken]))
        with torch.inference_mode():
            probs = torch.softmax(self.tail(x), dim=1)
            confidence, classes = probs.max(dim=1)
        end = time.monotonic()
        tail_us = int((end - start) * 1e6)
        classes, confidence = classes.numpy(), confidence.numpy()
        row = 0
        self.m_tail.observe(end - start)
        self.m_batch.observe(frames)
        self.m_frames.inc(frames)
        for edge, request, arrival in taken:
            n = len(request.frame_ids)
            self.m_ok.inc()
            self.m_queue.observe(start - arrival)
            self.sock.send_multipart([edge] + wire.encode_reply(
                request.msg_id, self.worker_id, classes[row:row + n], confidence[row:row + n],
                int((start - arrival) * 1e6), tail_us, frames))
            row += n
        self.batches += 1
        self.frames += frames


def run_worker(artifact_dir: str, cfg: WorkerConfig, worker_id: str | None = None) -> None:
    """Process entry point: run until SIGTERM (drain) or SIGINT."""
    worker = TailWorker(artifact_dir, cfg, worker_id)
    signal.signal(signal.SIGTERM, lambda *_: worker.drain())
    signal.signal(signal.SIGINT, lambda *_: worker.drain())
    print(f"I: worker {worker.worker_id}: model {worker.model_id}, broker {cfg.broker}, "
          f"max_batch {cfg.max_batch}, max_wait {cfg.max_wait_ms} ms", file=sys.stderr,
          flush=True)
    try:
        worker.run()
    finally:
        if worker.sock is not None:
            worker.sock.close()
        print(f"I: worker {worker.worker_id}: {worker.frames} frames in {worker.batches} "
              f"batches, refused {worker.refused}", file=sys.stderr, flush=True)
