"""The broker: edges on one ROUTER, workers on another, requests to workers with free credit.

    edge DEALER --[header, payload]--> frontend ROUTER   backend ROUTER <--READY/HEARTBEAT-- worker
                <--[answer]-----------                   --[edge, header, payload]-->
                                                         <--[edge, answer]-----------

The rules (admission, queue, expiry, credit, redelivery) live in `workers.scheduler`, a pure
object; this module is the I/O around it, in the zguide Paranoid-Pirate shape: poll with the
heartbeat interval -> backend -> frontend -> tick -> heartbeat. Each message is read, handed
to the scheduler, and the sends it returns are made. Replies to an edge that is gone are
dropped by the ROUTER and counted.

Under CURVE the two ROUTERs authenticate against two allow-lists (ZAP domains "edges" and
"workers"): an edge's key is refused on the backend, a worker's on the frontend. Each ROUTER
refuses a frame larger than the largest legal message on its side (ZMQ_MAXMSGSIZE: libzmq
drops the peer before the frame is read into memory).
"""

from __future__ import annotations

import gc
import logging
import signal
import time

import zmq
from prometheus_client import REGISTRY, CollectorRegistry

from monitoring.metrics import BrokerMetrics, CounterDeltas, ProcessMetrics, for_registry
from pipeline import __version__
from pipeline.errors import UserError
from pipeline.protocol import wire
from pipeline.protocol.wire import Kind, Refusal, WireError
from workers.config import BrokerConfig
from workers.scheduler import DROP_REASONS, FRONTEND as TO_EDGE, Scheduler

__all__ = ["BrokerConfig", "Broker", "run_broker"]

log = logging.getLogger(__name__)

RECEIVE_BURST = 1000   # messages read from one socket before the other gets its turn
# ZMQ_MAXMSGSIZE is checked per frame as it comes off the wire: a CURVE frame carries 33 B of
# box and command name around the message; a routing frame (an edge id) is at most 255 B.
FRAME_SLACK = 256
# splitexit_broker_requests_total{status}, each the scheduler's count of that name
REQUEST_STATUS = ("dispatched", "busy", "shadows_refused", "duplicate", "expired",
                  "expired_held")


class Broker:
    def __init__(self, cfg: BrokerConfig, ctx: zmq.Context | None = None,
                 registry: CollectorRegistry = REGISTRY):
        self.cfg = cfg
        cfg.security.check([cfg.frontend, cfg.backend], "broker")
        self.ctx = ctx or zmq.Context.instance()
        self.frontend = self._router(wire.MAX_REQUEST_BYTES)   # [request]
        self.backend = self._router(wire.MAX_REPLY_BYTES)      # [edge, answer], or control
        self.auth = cfg.security.server_sockets(self.ctx, self.frontend, self.backend)
        self.m = for_registry(BrokerMetrics, registry)   # before binding: close() uses them
        common = for_registry(ProcessMetrics, registry)
        self.m_ready, self.m_bad = common.ready.labels("broker"), common.bad_messages
        common.build_info.labels("broker", __version__, "").set(1)
        self._bind(self.frontend, cfg.frontend)
        self._bind(self.backend, cfg.backend)
        self.scheduler = Scheduler(cfg.max_queue, cfg.queue_timeout_s,
                                   cfg.heartbeat_interval_s * cfg.heartbeat_liveness,
                                   cfg.max_held_bytes)
        self.bad: dict[str, int] = {}
        self.running = True
        m = self.m
        self._counts = CounterDeltas({**{s: m.requests.labels(s) for s in REQUEST_STATUS},
                                      "redelivered": m.redeliveries,
                                      **{f"dropped {r}": m.replies_dropped.labels(r)
                                         for r in DROP_REASONS}})

    def _router(self, max_message_bytes: int) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.maxmsgsize = max_message_bytes + FRAME_SLACK
        sock.sndhwm = sock.rcvhwm = 100_000  # far above max_queue
        sock.router_mandatory = 1  # a full or vanished peer raises (counted), never a silent drop
        return sock

    def _bind(self, sock: zmq.Socket, address: str) -> None:
        try:
            sock.bind(address)
        except zmq.ZMQError as e:
            self.close()
            raise UserError(f"cannot bind {address}: {e.strerror}; is another broker "
                            f"running there?") from None

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self.frontend, zmq.POLLIN)
        heartbeat_at = time.monotonic() + self.cfg.heartbeat_interval_s
        self.m_ready.set(1)  # both ports bound, signals handled: edges and workers may come
        while self.running:
            timeout_ms = max(0.0, heartbeat_at - time.monotonic()) * 1000
            events = dict(poller.poll(timeout_ms))
            now = time.monotonic()
            if self.backend in events:      # replies and control from workers
                self._drain(self.backend, self._on_backend, now)
            if self.frontend in events:     # requests from edges
                self._drain(self.frontend, self._on_frontend, now)
            self._send(self.scheduler.tick(now), now)
            if now >= heartbeat_at:
                self._send(self.scheduler.heartbeats(), now)
                heartbeat_at = now + self.cfg.heartbeat_interval_s
            self._export()  # once a pass, not once a message

    def _drain(self, sock: zmq.Socket, handle, now: float) -> None:
        """Handle what is queued on a socket, a bounded number so neither side starves."""
        for _ in range(RECEIVE_BURST):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._send(handle(parts, now), now)

    def _send(self, sends: list, now: float) -> None:
        """Make the scheduler's sends; a worker that cannot be sent to has vanished."""
        i = 0
        while i < len(sends):
            side, parts = sends[i]
            i += 1
            try:
                (self.frontend if side == TO_EDGE else self.backend).send_multipart(
                    parts, zmq.NOBLOCK)
            except zmq.ZMQError as e:
                gone = e.errno == zmq.EHOSTUNREACH
                if side == TO_EDGE:   # the edge is gone or not reading: its deadline decides
                    self.m.drops.labels("edge_gone" if gone else "edge_full").inc()
                else:
                    self.m.drops.labels("worker_gone" if gone else "worker_full").inc()
                    sends += self.scheduler.worker_gone(parts[0], now)

    def _bad(self, component: str, reason: str) -> list:
        key = f"{component}_{reason}"
        self.bad[key] = self.bad.get(key, 0) + 1
        self.m_bad.labels(f"broker_{component}", reason).inc()
        return []

    def _on_backend(self, parts: list, now: float) -> list:
        worker = parts[0]
        if len(parts) == 3:  # [worker, edge, answer]
            try:
                kind, msg_id = wire.peek(parts[2])
            except WireError as e:
                return self._bad("backend", e.reason)
            if kind not in (Kind.REPLY, Kind.ERROR):
                return self._bad("backend", "kind")
            return self.scheduler.reply(worker, parts[1], msg_id, parts[2], now)
        if len(parts) != 2:
            return self._bad("backend", "malformed")
        try:
            control = wire.decode_control(parts[1:])
        except WireError as e:
            return self._bad("backend", e.reason)
        if isinstance(control, wire.Ready):
            return self.scheduler.ready(worker, control.credit, now)
        if control == Kind.HEARTBEAT:
            return self.scheduler.heartbeat(worker, now)
        return self.scheduler.disconnect(worker, now)

    def _on_frontend(self, parts: list, now: float) -> list:
        edge = parts[0]
        if len(parts) != 2:  # [edge, request]
            return self._bad("frontend", "malformed")
        try:
            kind, msg_id = wire.peek(parts[1])
        except WireError as e:
            return self._bad("frontend", e.reason)
        if kind not in wire.REQUEST_KINDS:
            self._bad("frontend", "kind")
            return [(TO_EDGE, [edge] + wire.encode_error(msg_id, Refusal.BAD_REQUEST,
                                                         "edges send requests only"))]
        return self.scheduler.request(edge, msg_id, parts[1:], now, kind == Kind.SHADOW)

    def _export(self) -> None:
        """Copy the scheduler's counts into the metrics: one write per pass, not per message
        (in multiprocess mode every metric write is a write to a shared file)."""
        c, m = self.scheduler.counts, self.m
        self._counts.export({**{s: getattr(c, s) for s in REQUEST_STATUS},
                             "redelivered": c.redelivered,
                             **{f"dropped {r}": n for r, n in c.dropped.items()}})
        table = self.scheduler.table
        m.queue_depth.set(len(self.scheduler.queue))
        m.workers.set(table.live)
        m.free_credit.set(table.free_credit)

    def close(self) -> None:
        self.m_ready.set(0)
        self.frontend.close()
        self.backend.close()
        if self.auth is not None:
            self.auth.stop()


def run_broker(cfg: BrokerConfig) -> None:
    """Run until SIGINT/SIGTERM (the process entry point for `splitexit broker`)."""
    broker = Broker(cfg)
    gc.freeze()  # what exists now lives as long as the process: full collections skip it

    def stop(*_):
        broker.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(f"broker: edges on {cfg.frontend}, workers on {cfg.backend}")
    try:
        broker.run()
    finally:
        broker.close()
        s = broker.scheduler.counts
        log.info(f"broker: {s.requests} requests, {s.replies} replies, {s.busy} busy, "
                 f"{s.expired + s.expired_held} expired, {s.redelivered} redelivered, "
                 f"{s.duplicate} duplicates, replies dropped {s.dropped}, bad {broker.bad}")

