"""A tail worker: takes offloaded features from the broker, batches them, runs the tail once.

Loop shape (zguide Paranoid Pirate worker): poll with a timeout -> read what arrived ->
run a batch when it is due -> heartbeat -> reconnect to a broker that went silent.
A worker serves every broker it is given (`--backend tcp://b0:5556,tcp://b1:5556`): one
DEALER, one READY with the full credit, and heartbeats and a back-off of its own per broker,
so a dead broker costs the others nothing (brokers know nothing of each other; the edges
choose among them: pipeline.edge.brokers). Each broker holds it to its credit, so it may hold
up to credit x brokers requests: the full credit per broker lets the survivors use the whole
worker when one broker dies. A reply goes back to the broker that sent the request.
The worker is ready (`splitexit_ready{role="worker"}`) once a broker has answered its
READY; it is not while it reconnects to all of them, or drains.

Dynamic batching (which requests run together, and when) is `workers.batching.Batcher`, a
pure object; this module is the I/O around it.
Credit: the worker tells the broker how many requests it may hold at once, so the broker
never queues work on a busy worker while another is idle.

Decoding never silences the heartbeats. A request's entropy-coded payload is budgeted from
its header before it is decoded (pipeline.protocol.wire), and decoding is linear: the C coder
spends at most 2.7 ms of CPU on the largest legal message of the default's shape (256 frames
x 400 features, 51.7 KB) and 6.4 ms at MAX_CODED_SYMBOLS (256 x 1024, 132 KB), on a busy
2-core machine (benchmarks/decode_worst.py). The Python fallback (no C compiler) spends
0.1 s and 0.25 s of CPU on them, but up to 1.4 s of wall time under load: more than a
heartbeat interval (0.5 s), so a worker also beats between the frames it decodes and between
the messages of a burst (a thousand cheap ones back to back add up as well).

SIGTERM drains: the worker says DISCONNECT (the broker sends nothing new), answers what it
holds and what is still in transit for a short grace period, then exits. Anything it could
not answer is redelivered by the broker when the worker's heartbeats stop.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import time

import numpy as np
import torch
import zmq
from prometheus_client import REGISTRY, CollectorRegistry

from monitoring.metrics import ProcessMetrics, WorkerMetrics, for_registry
from pipeline import __version__
from pipeline.floor import native
from pipeline.model.artifacts import load_server
from pipeline.protocol import wire
from pipeline.protocol.endpoints import split_endpoints
from pipeline.protocol.security import watch_handshake
from pipeline.protocol.timing import DRAIN_GRACE_S, Backoff
from pipeline.protocol.wire import Kind, Refusal, WireError
from workers.batching import Batcher
from workers.config import WorkerConfig

__all__ = ["WorkerConfig", "TailWorker", "run_worker"]

log = logging.getLogger(__name__)

RECEIVE_BURST = 1000   # messages read per wake-up before a due batch runs
# ZMQ_MAXMSGSIZE, checked per frame as it comes off the wire: the largest legal request, and
# room for CURVE's 33 B around it (the routing frame, an edge id, is at most 255 B)
MAX_RECEIVE_BYTES = wire.MAX_REQUEST_BYTES + 256


class BrokerConnection:
    """One broker this worker serves: its socket (None while a reconnect waits out its
    back-off), liveness and heartbeats."""

    def __init__(self, endpoint: str, liveness: int):
        self.endpoint = endpoint
        self.sock: zmq.Socket | None = None
        self.liveness = liveness
        self.backoff = Backoff()
        self.heartbeat_at = 0.0
        self.reconnect_at = 0.0
        self.confirmed = False     # the broker has answered our READY
        self.watching = False      # a handshake monitor runs on the socket


class TailWorker:
    def __init__(self, artifact_dir: str, cfg: WorkerConfig, worker_id: str | None = None,
                 ctx: zmq.Context | None = None, registry: CollectorRegistry = REGISTRY):
        self.cfg = cfg
        cfg.validate()
        server = load_server(artifact_dir)
        self.tail = server.tail.eval()
        self.temperature = server.temperature  # confidences as calibrated on validation
        self.unfamiliarity = server.unfamiliarity   # frames it answers `unknown`, or None
        self.model_id = server.model_id
        self.model_tag = wire.model_tag(server.model_id)
        self.code = server.code  # the model's static uplink code, or None
        self.decoders = native.coder_status() if self.code is not None else "no static code"
        model = server.config.model
        self.width = model.split_width
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.credit = cfg.credit or 2 * cfg.max_batch
        self.ctx = ctx or zmq.Context.instance()
        self.links = [BrokerConnection(e, cfg.heartbeat_liveness)
                      for e in split_endpoints(cfg.broker)]
        self.poller = zmq.Poller()   # the sockets of the links that have one
        self._link_of: dict[zmq.Socket, BrokerConnection] = {}
        self.batcher = Batcher(cfg.max_batch, cfg.max_wait_ms / 1000)
        self.draining_since: float | None = None
        self.refused: dict[str, int] = {}
        self.batches = 0
        self.frames = 0
        self.unknown = 0      # frames answered `unknown`
        w = self.worker_id  # metric children bound once
        self.m = for_registry(WorkerMetrics, registry)
        common = for_registry(ProcessMetrics, registry)
        self.m_ready, self.m_bad = common.ready.labels("worker"), common.bad_messages
        common.build_info.labels("worker", __version__, self.model_id).set(1)
        self.m_handshake_failures = common.handshake_failures.labels("worker")
        self.m_ok = self.m.requests.labels(w, "ok")
        self.m_frames, self.m_tail = self.m.frames.labels(w), self.m.tail.labels(w)
        self.m_batch, self.m_queue = self.m.batch.labels(w), self.m.queue.labels(w)
        self.m_held = self.m.held.labels(w)
        self.ready, self.held = False, 0   # what the gauges say, so only changes are written

    # -- connection ---------------------------------------------------------------------------

    def connect(self, link: BrokerConnection) -> None:
        """(Re)connect to one broker and announce; it confirms with its first message."""
        self.close_link(link)
        link.sock = sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.identity = self.worker_id.encode()
        # libzmq drops a peer that sends a larger frame, before it is read into memory
        sock.maxmsgsize = MAX_RECEIVE_BYTES
        self.cfg.security.client_socket(sock)
        if self.cfg.security.curve and not link.watching:
            watch_handshake(sock, f"worker {self.worker_id}", self.m_handshake_failures.inc)
            link.watching = True
        sock.connect(link.endpoint)
        self.poller.register(sock, zmq.POLLIN)
        self._link_of[sock] = link
        link.liveness = self.cfg.heartbeat_liveness
        link.heartbeat_at = time.monotonic() + self.cfg.heartbeat_interval_s
        self._announce(link)

    def close_link(self, link: BrokerConnection) -> None:
        if link.sock is not None:
            self.poller.unregister(link.sock)
            del self._link_of[link.sock]
            link.sock.close()
            link.sock = None

    def _announce(self, link: BrokerConnection) -> None:
        self._confirm(link, False)
        link.sock.send_multipart(wire.encode_ready(self.worker_id, self.model_tag, self.credit))

    def drain(self) -> None:
        """Stop taking work (SIGTERM): tell the brokers, finish what is held, then leave."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()
            self._set_ready(False)
            for link in self.links:
                if link.sock is not None:
                    link.sock.send_multipart(wire.DISCONNECT)

    # -- main loop ------------------------------------------------------------------------------

    def run(self) -> None:
        torch.set_num_threads(self.cfg.threads)
        for link in self.links:
            self.connect(link)
        while True:
            now = time.monotonic()
            draining = self.draining_since is not None
            if draining and not self.batcher and now - self.draining_since >= DRAIN_GRACE_S:
                return
            wake = min(link.heartbeat_at if link.sock else link.reconnect_at
                       for link in self.links)
            if self.batcher:
                wake = min(wake, self.batcher.next_due())
            for sock, _ in self.poller.poll(max(0.0, wake - now) * 1000):
                link = self._link_of[sock]
                link.liveness = self.cfg.heartbeat_liveness
                link.backoff.reset()
                self._receive(link)
            now = time.monotonic()
            if self.batcher.due(now, draining):
                self._run_batch()
            if len(self.batcher) != self.held:  # once a pass, and only on a change
                self.held = len(self.batcher)
                self.m_held.set(self.held)
            for link in self.links:
                self._keep_alive(link, now)

    def _keep_alive(self, link: BrokerConnection, now: float) -> None:
        """Heartbeat a broker when due; one silent for `liveness` beats is reconnected after
        a back-off (the others are served meanwhile)."""
        if link.sock is None:
            if now >= link.reconnect_at:
                self.connect(link)
            return
        if now < link.heartbeat_at:
            return
        link.heartbeat_at = now + self.cfg.heartbeat_interval_s
        link.sock.send_multipart(wire.HEARTBEAT)
        link.liveness -= 1
        if link.liveness <= 0 and self.draining_since is None:
            wait_s = link.backoff.next()
            log.warning(f"worker {self.worker_id}: broker {link.endpoint} silent, "
                        f"reconnecting in {wait_s:.2f} s")
            self.close_link(link)
            link.reconnect_at = now + wait_s
            self._confirm(link, False)

    def _beat(self) -> None:
        """Heartbeat every broker due one. The main loop beats between polls; this also runs
        between the messages of a burst and between the frames the Python decoder reads, so
        neither a long burst nor the slow fallback decoder makes a live worker look dead."""
        now = time.monotonic()
        for link in self.links:
            if link.sock is not None and now >= link.heartbeat_at:
                link.heartbeat_at = now + self.cfg.heartbeat_interval_s
                link.sock.send_multipart(wire.HEARTBEAT)

    def _confirm(self, link: BrokerConnection, confirmed: bool) -> None:
        """Called per message: work only where a broker's confirmation changed."""
        if link.confirmed == confirmed:
            return
        link.confirmed = confirmed
        self._set_ready(self.draining_since is None and any(c.confirmed for c in self.links))

    def _set_ready(self, ready: bool) -> None:
        if ready != self.ready:  # a metric write only on a change: it may be a file write
            self.ready = ready
            self.m_ready.set(int(ready))

    def _receive(self, link: BrokerConnection) -> None:
        for _ in range(RECEIVE_BURST):
            self._beat()
            try:
                parts = link.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(parts) == 2:  # [edge, request]
                self._confirm(link, True)  # work: the broker knows us
                self._on_request(link, parts[0], parts[1:])
                continue
            try:
                control = wire.decode_control(parts)
            except WireError as e:
                self._count(e.reason)
                continue
            if control == Kind.HEARTBEAT:
                self._confirm(link, True)
            elif control == Kind.DISCONNECT and self.draining_since is None:
                self._announce(link)  # the broker forgot us (it restarted, or thought us dead)

    def _on_request(self, link: BrokerConnection, edge: bytes, parts: list) -> None:
        try:   # the model tag first: another model's payload is never decoded
            request = wire.decode_request(parts, self.code, self._beat, self.model_tag)
        except WireError as e:
            self._count(e.reason)
            try:
                _, msg_id = wire.peek(parts[0])
            except WireError:
                return  # not even a header: nothing to answer
            if e.reason == "wrong_model":
                self._refuse(link, edge, msg_id, Refusal.WRONG_MODEL,
                             f"worker serves model {self.model_id}, {e.detail}")
            else:
                self._refuse(link, edge, msg_id, Refusal.BAD_REQUEST, e.detail)
            return
        if request.features.shape[1] != self.width:
            self._count("shape")
            self._refuse(link, edge, request.msg_id, Refusal.BAD_REQUEST,
                         f"model {self.model_id} takes {self.width} features, got "
                         f"{request.features.shape[1]}")
            return
        self.batcher.add((link, edge, request), len(request.features), time.monotonic())

    def _refuse(self, link: BrokerConnection, edge: bytes, msg_id: int, reason: Refusal,
                detail: str) -> None:
        link.sock.send_multipart([edge] + wire.encode_error(msg_id, reason, detail))

    def _count(self, reason: str) -> None:
        """A refused or dropped request; `reason` is a WireError reason or wrong_model."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self.m.requests.labels(self.worker_id, reason).inc()
        if reason != "wrong_model":
            self.m_bad.labels("worker", reason).inc()

    def _run_batch(self) -> None:
        """Run the tail once over the batch the batcher hands out; reply to each request."""
        taken = self.batcher.take()
        start = time.monotonic()
        x = torch.from_numpy(np.concatenate([r.features for (_, _, r), _ in taken]))
        frames = x.shape[0]
        with torch.inference_mode():
            logits, seen = self.tail.run(x)
            confidence, classes = torch.softmax(logits / self.temperature, dim=1).max(dim=1)
        classes, confidence = classes.numpy().astype(np.uint8), confidence.numpy()
        if self.unfamiliarity is not None:   # its own score: a class, or `unknown`
            unknown = self.unfamiliarity.flagged(seen.numpy())
            classes[unknown], confidence[unknown] = wire.UNKNOWN_CLASS, 0.0
            self.unknown += int(unknown.sum())
        end = time.monotonic()
        tail_us = int((end - start) * 1e6)
        row = 0
        self.m_tail.observe(end - start)
        self.m_batch.observe(frames)
        self.m_frames.inc(frames)
        for (link, edge, request), arrival in taken:
            n = len(request.features)
            self.m_ok.inc()
            self.m_queue.observe(start - arrival)
            if link.sock is not None:   # else it was given up meanwhile: it redelivers
                link.sock.send_multipart([edge] + wire.encode_reply(
                    request.msg_id, self.worker_id, classes[row:row + n],
                    confidence[row:row + n], int((start - arrival) * 1e6), tail_us, frames))
            row += n
        self.batches += 1
        self.frames += frames


def run_worker(artifact_dir: str, cfg: WorkerConfig, worker_id: str | None = None) -> None:
    """Process entry point: run until SIGTERM (drain) or SIGINT."""
    worker = TailWorker(artifact_dir, cfg, worker_id)
    gc.freeze()  # torch and the model live as long as the process: no full collection walks
                 # them (one took ~80 ms mid-stream, a p99 spike for every frame queued behind)
    signal.signal(signal.SIGTERM, lambda *_: worker.drain())
    signal.signal(signal.SIGINT, lambda *_: worker.drain())
    log.info(f"worker {worker.worker_id}: model {worker.model_id}, broker {cfg.broker}, "
             f"max_batch {cfg.max_batch}, max_wait {cfg.max_wait_ms} ms, "
             f"decoders: {worker.decoders}")
    try:
        worker.run()
    finally:
        for link in worker.links:
            worker.close_link(link)
        log.info(f"worker {worker.worker_id}: {worker.frames} frames in {worker.batches} "
                 f"batches, {worker.unknown} answered unknown, refused {worker.refused}")
