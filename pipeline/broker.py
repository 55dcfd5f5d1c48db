"""The broker: edges on one ROUTER, workers on another, requests to workers with free credit.

    edge DEALER --[header, payload]--> frontend ROUTER     backend ROUTER <--READY/HEARTBEAT-- worker
                <--[answer]-----------                     --[edge, header, payload]-->
                                                           <--[edge, answer]-----------

Scheduling lives in `WorkerTable`, a pure object (the clock is passed in, no sockets) so it
is tested without ZeroMQ. The loop around it keeps the zguide Paranoid-Pirate shape: poll
with the heartbeat interval -> backend -> frontend -> dispatch -> purge -> heartbeat.

Guarantees: a request goes only to a worker with free credit; every request in flight is
remembered with its worker, and when a worker misses its heartbeats they go back to the
front of the queue for another worker (a redelivery). The queue is bounded: when it is full
the edge gets BUSY at once and answers locally, instead of the queue growing. A request that
waited longer than `queue_timeout_s` is answered NO_WORKER: its edge gave up long ago. The
broker keeps no state per edge, so an edge that vanishes costs nothing; replies to it are
dropped by the ROUTER.
"""

from __future__ import annotations

import collections
import signal
import sys
import time
from dataclasses import dataclass, field

import zmq

from monitoring import metrics as m
from pipeline.errors import UserError
from pipeline import wire
from pipeline.security import PLAINTEXT_LOOPBACK, Security
from pipeline.wire import Kind, Refusal, WireError

__all__ = ["BrokerConfig", "WorkerTable", "Broker", "run_broker"]

HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_LIVENESS = 4          # missed intervals before a peer is declared dead


@dataclass
class BrokerConfig:
    frontend: str = "tcp://127.0.0.1:5555"   # edges connect here
    backend: str = "tcp://127.0.0.1:5556"    # workers connect here
    max_queue: int = 1024                    # queued requests before BUSY
    queue_timeout_s: float = 2.0             # queued longer than this: NO_WORKER
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    security: Security = PLAINTEXT_LOOPBACK


@dataclass
class Worker:
    identity: bytes
    credit: int                  # requests it may hold at once
    expiry: float                # monotonic time it is declared dead without traffic
    inflight: dict = field(default_factory=dict)   # (edge, msg_id) -> frames
    draining: bool = False
    served: int = 0

    @property
    def free(self) -> int:
        return 0 if self.draining else self.credit - len(self.inflight)


class WorkerTable:
    """Live workers, their credit and what each holds. Pure: time comes in as `now`."""

    def __init__(self, liveness_s: float):
        self.liveness_s = liveness_s
        self.workers: dict[bytes, Worker] = {}

    def ready(self, identity: bytes, credit: int, now: float) -> list:
        """A worker (re)announced itself. If it was known, what it held is lost: redeliver."""
        lost = self.remove(identity)
        self.workers[identity] = Worker(identity, credit, now + self.liveness_s)
        return lost

    def seen(self, identity: bytes, now: float) -> bool:
        worker = self.workers.get(identity)
        if worker is not None:
            worker.expiry = now + self.liveness_s
        return worker is not None

    def pick(self) -> Worker | None:
        """The worker with the most free credit (ties: the one that served least)."""
        best = None
        for w in self.workers.values():
            if w.free > 0 and (best is None or (w.free, -w.served) > (best.free, -best.served)):
                best = w
        return best

    def dispatch(self, worker: Worker, key: tuple, frames: list) -> None:
        worker.inflight[key] = frames
        worker.served += 1

    def complete(self, identity: bytes, key: tuple) -> bool:
        """A reply arrived; False if that worker no longer held the request (late reply)."""
        worker = self.workers.get(identity)
        if worker is None or worker.inflight.pop(key, None) is None:
            return False
        if worker.draining and not worker.inflight:
            del self.workers[identity]
        return True

    def drain(self, identity: bytes) -> None:
        worker = self.workers.get(identity)
        if worker is not None:
            worker.draining = True
            if not worker.inflight:
                del self.workers[identity]

    def remove(self, identity: bytes) -> list:
        worker = self.workers.pop(identity, None)
        return list(worker.inflight.items()) if worker else []

    def purge(self, now: float) -> list:
        """Drop workers past their expiry; return their in-flight requests to redeliver."""
        lost = []
        for identity in [i for i, w in self.workers.items() if w.expiry < now]:
            lost += self.remove(identity)
        return lost

    @property
    def live(self) -> int:
        return len(self.workers)

    @property
    def free_credit(self) -> int:
        return sum(w.free for w in self.workers.values())


@dataclass
class Stats:
    """This process's counts for its exit line; the exported ones are in monitoring.metrics."""
    requests: int = 0
    replies: int = 0
    busy: int = 0
    expired: int = 0
    redelivered: int = 0
    late_replies: int = 0
    bad: collections.Counter = field(default_factory=collections.Counter)


class Broker:
    def __init__(self, cfg: BrokerConfig, ctx: zmq.Context | None = None):
        self.cfg = cfg
        cfg.security.check([cfg.frontend, cfg.backend], "broker")
        self.ctx = ctx or zmq.Context.instance()
        self.frontend, self.backend = self._router(), self._router()
        self.auth = cfg.security.server_sockets(self.ctx, [self.frontend, self.backend])
        self._bind(self.frontend, cfg.frontend)
        self._bind(self.backend, cfg.backend)
        self.table = WorkerTable(cfg.heartbeat_interval_s * cfg.heartbeat_liveness)
        self.queue: collections.deque = collections.deque()  # (edge, msg_id, frames, t)
        self.stats = Stats()
        self.running = True
        self.m_dispatched, self.m_busy, self.m_expired = (
            m.BROKER_REQUESTS.labels(status) for status in ("dispatched", "busy", "expired"))

    def _router(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = 100_000  # far above max_queue
        sock.router_mandatory = 1  # a full or vanished peer raises (counted), never a silent drop
        return sock

    def _to_edge(self, frames: list) -> None:
        """Answer an edge; if it is gone or not reading, count the drop: its deadline decides."""
        try:
            self.frontend.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as e:
            m.BROKER_DROPS.labels("edge_gone" if e.errno == zmq.EHOSTUNREACH
                                  else "edge_full").inc()

    def _to_worker(self, identity: bytes, frames: list) -> bool:
        try:
            self.backend.send_multipart([identity] + frames, zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:
            m.BROKER_DROPS.labels("worker_gone" if e.errno == zmq.EHOSTUNREACH
                                  else "worker_full").inc()
            return False

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
        while self.running:
            timeout_ms = max(0.0, heartbeat_at - time.monotonic()) * 1000
            events = dict(poller.poll(timeout_ms))
            now = time.monotonic()
            if self.backend in events:      # replies and control from workers
                self._drain(self.backend, self._on_backend, now)
            if self.frontend in events:     # requests from edges
                self._drain(self.frontend, self._on_frontend, now)
            self._dispatch(now)
            lost = self.table.purge(now)    # workers that went silent
            if lost:
                self._redeliver(lost, now)
            m.BROKER_QUEUE_DEPTH.set(len(self.queue))  # once a pass, not once a message
            m.BROKER_WORKERS.set(self.table.live)
            m.BROKER_FREE_CREDIT.set(self.table.free_credit)
            if now >= heartbeat_at:
                for identity in list(self.table.workers):
                    self._to_worker(identity, wire.HEARTBEAT)
                heartbeat_at = now + self.cfg.heartbeat_interval_s

    def _drain(self, sock: zmq.Socket, handle, now: float, limit: int = 1000) -> None:
        """Handle what is queued on a socket, a bounded number so neither side starves."""
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(frames, now)

    def _bad(self, component: str, reason: str) -> None:
        self.stats.bad[f"{component}_{reason}"] += 1
        m.BAD_MESSAGES.labels(f"broker_{component}", reason).inc()

    def _on_backend(self, frames: list, now: float) -> None:
        identity = frames[0]
        if len(frames) == 3:  # [worker, edge, answer]
            edge, answer = frames[1], frames[2]
            try:
                kind, msg_id = wire.peek(answer)
            except WireError as e:
                self._bad("backend", e.reason)
                return
            self.table.seen(identity, now)
            if not self.table.complete(identity, (edge, msg_id)):
                self.stats.late_replies += 1  # forwarded anyway: the edge drops duplicates
            self.stats.replies += 1
            self._to_edge([edge, answer])
            return
        if len(frames) != 2:
            self._bad("backend", "malformed")
            return
        try:
            control = wire.decode_control(frames[1:])
        except WireError as e:
            self._bad("backend", e.reason)
            return
        if isinstance(control, wire.Ready):
            self._redeliver(self.table.ready(identity, control.credit, now), now)
        elif control == Kind.HEARTBEAT:
            if not self.table.seen(identity, now):
                # A worker we declared dead (or never met): it must announce itself again.
                self._to_worker(identity, wire.DISCONNECT)
        elif control == Kind.DISCONNECT:
            self.table.drain(identity)

    def _on_frontend(self, frames: list, now: float) -> None:
        edge = frames[0]
        if len(frames) != 3:
            self._bad("frontend", "malformed")
            return
        try:
            kind, msg_id = wire.peek(frames[1])
        except WireError as e:
            self._bad("frontend", e.reason)
            return
        if kind != Kind.REQUEST:
            self._bad("frontend", "kind")
            self._to_edge([edge] + wire.encode_error(
                msg_id, Refusal.BAD_REQUEST, "edges send requests only"))
            return
        self.stats.requests += 1
        if len(self.queue) >= self.cfg.max_queue:
            self.stats.busy += 1
            self.m_busy.inc()
            self._to_edge([edge] + wire.encode_error(
                msg_id, Refusal.BUSY, f"broker queue full ({self.cfg.max_queue})"))
            return
        self.queue.append((edge, msg_id, frames[1:], now))

    def _dispatch(self, now: float) -> None:
        while self.queue:
            edge, msg_id, frames, enqueued_at = self.queue[0]
            if now - enqueued_at > self.cfg.queue_timeout_s:
                self.queue.popleft()
                self.stats.expired += 1
                self.m_expired.inc()
                self._to_edge([edge] + wire.encode_error(
                    msg_id, Refusal.NO_WORKER, "no worker free in time"))
                continue
            worker = self.table.pick()
            if worker is None:
                return
            self.queue.popleft()
            self.m_dispatched.inc()
            self.table.dispatch(worker, (edge, msg_id), frames)
            if not self._to_worker(worker.identity, [edge] + frames):
                # the worker vanished between heartbeats: its work goes elsewhere now
                self._redeliver(self.table.remove(worker.identity), now)

    def _redeliver(self, lost: list, now: float) -> None:
        """Requests a dead worker held go first in line, keeping their order."""
        for (edge, msg_id), frames in reversed(lost):
            self.queue.appendleft((edge, msg_id, frames, now))
        self.stats.redelivered += len(lost)
        m.BROKER_REDELIVERIES.inc(len(lost))

    def close(self) -> None:
        self.frontend.close()
        self.backend.close()
        if self.auth is not None:
            self.auth.stop()


def run_broker(cfg: BrokerConfig) -> None:
    """Run until SIGINT/SIGTERM (the process entry point for `splitexit broker`)."""
    broker = Broker(cfg)

    def stop(*_):
        broker.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"I: broker: edges on {cfg.frontend}, workers on {cfg.backend}", file=sys.stderr,
          flush=True)
    try:
        broker.run()
    finally:
        broker.close()
        s = broker.stats
        print(f"I: broker: {s.requests} requests, {s.replies} replies, {s.busy} busy, "
              f"{s.expired} expired, {s.redelivered} redelivered, bad {dict(s.bad)}",
              file=sys.stderr, flush=True)

