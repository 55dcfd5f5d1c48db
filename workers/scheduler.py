"""The broker's rules as a pure object: admission, the queue, expiry, credit, dispatch,
heartbeats and redelivery. Events in, sends out; no sockets, the clock passed in as `now`.

    request(edge, msg_id, parts, now, shadow) an edge's request: BUSY if the queue is full
                                             (a shadow: unless a worker has free credit)
    reply(worker, edge, msg_id, answer, now) a worker's answer: forward it with the load
                                             stamped in, free the credit
    ready / heartbeat / disconnect(worker)   a worker's control messages
    worker_gone(worker, now)                 a send to it failed: it vanished
    tick(now)                                queue expiry (NO_WORKER), silent workers purged
    heartbeats()                             one HEARTBEAT per known worker

Each returns the sends to make, as (FRONTEND | BACKEND, [peer identity, *parts]).

Guarantees: a request goes only to a worker with free credit; every request in flight is
remembered with its worker, and when a worker misses its heartbeats (or re-announces itself,
or cannot be sent to) what it held goes back to the front of the queue for another worker (a
redelivery). The queue is bounded: when it is full the edge gets BUSY at once and answers
locally, instead of the queue growing. A request that waited longer than `queue_timeout_s`
is answered NO_WORKER: its edge gave up long ago. No state is kept per edge, so an edge that
vanishes costs nothing.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from pipeline.protocol import wire
from pipeline.protocol.wire import Refusal

__all__ = ["Scheduler", "WorkerTable", "Worker", "Counts", "FRONTEND", "BACKEND"]

FRONTEND, BACKEND = 0, 1   # which socket a send goes out of


@dataclass
class Worker:
    identity: bytes
    credit: int                  # requests it may hold at once
    expiry: float                # monotonic time it is declared dead without traffic
    inflight: dict = field(default_factory=dict)   # (edge, msg_id) -> request parts
    draining: bool = False
    served: int = 0

    @property
    def free(self) -> int:
        return 0 if self.draining else self.credit - len(self.inflight)


class WorkerTable:
    """Live workers, their credit and what each holds."""

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

    def dispatch(self, worker: Worker, key: tuple, parts: list) -> None:
        worker.inflight[key] = parts
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
class Counts:
    """Running totals; the broker exports them as metrics once a loop pass."""
    requests: int = 0
    dispatched: int = 0
    replies: int = 0
    busy: int = 0
    shadows_refused: int = 0   # shadows turned away: no free credit, or a queue
    expired: int = 0
    redelivered: int = 0
    late_replies: int = 0


class Scheduler:
    def __init__(self, max_queue: int, queue_timeout_s: float, liveness_s: float):
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.table = WorkerTable(liveness_s)
        self.queue: collections.deque = collections.deque()  # (edge, msg_id, parts, since)
        self.counts = Counts()

    # -- edges ----------------------------------------------------------------------------------

    def request(self, edge: bytes, msg_id: int, parts: list, now: float,
                shadow: bool = False) -> list:
        """Queue a request and dispatch what credit allows. A shadow (a frame its exit
        already answered) never waits: it is taken only by free credit, else refused."""
        self.counts.requests += 1
        if shadow and (self.queue or not self.table.free_credit):
            self.counts.shadows_refused += 1
            return [(FRONTEND, [edge] + wire.encode_error(
                msg_id, Refusal.BUSY, "shadows go only to free credit"))]
        if len(self.queue) >= self.max_queue:
            self.counts.busy += 1
            return [(FRONTEND, [edge] + wire.encode_error(
                msg_id, Refusal.BUSY, f"broker queue full ({self.max_queue})"))]
        self.queue.append((edge, msg_id, parts, now))
        return self._dispatch(now)

    # -- workers --------------------------------------------------------------------------------

    def reply(self, worker: bytes, edge: bytes, msg_id: int, answer: bytes, now: float) -> list:
        """Forward an answer (a late one too: the edge discards what it already finalized)."""
        self.table.seen(worker, now)
        if not self.table.complete(worker, (edge, msg_id)):
            self.counts.late_replies += 1
        self.counts.replies += 1
        sends = self._dispatch(now)   # the freed credit first: the load stamped is what's left
        return [(FRONTEND, [edge, wire.stamp_load(answer, len(self.queue),
                                                  self.table.free_credit)])] + sends

    def ready(self, worker: bytes, credit: int, now: float) -> list:
        """Confirm with a HEARTBEAT at once (the worker's readiness), then give it work."""
        self._redeliver(self.table.ready(worker, credit, now), now)
        return [(BACKEND, [worker] + wire.HEARTBEAT)] + self._dispatch(now)

    def heartbeat(self, worker: bytes, now: float) -> list:
        if self.table.seen(worker, now):
            return []
        # A worker we declared dead (or never met): it must announce itself again.
        return [(BACKEND, [worker] + wire.DISCONNECT)]

    def disconnect(self, worker: bytes, now: float) -> list:
        """The worker drains: nothing new goes to it; it leaves once it answered the rest."""
        self.table.drain(worker)
        return []

    def worker_gone(self, worker: bytes, now: float) -> list:
        self._redeliver(self.table.remove(worker), now)
        return self._dispatch(now)

    # -- time -----------------------------------------------------------------------------------

    def tick(self, now: float) -> list:
        self._redeliver(self.table.purge(now), now)   # workers that went silent
        return self._dispatch(now)

    def heartbeats(self) -> list:
        return [(BACKEND, [identity] + wire.HEARTBEAT) for identity in self.table.workers]

    # -- rules ----------------------------------------------------------------------------------

    def _dispatch(self, now: float) -> list:
        sends = []
        while self.queue:
            edge, msg_id, parts, since = self.queue[0]
            if now - since > self.queue_timeout_s:
                self.queue.popleft()
                self.counts.expired += 1
                sends.append((FRONTEND, [edge] + wire.encode_error(
                    msg_id, Refusal.NO_WORKER, "no worker free in time")))
                continue
            worker = self.table.pick()
            if worker is None:
                break
            self.queue.popleft()
            self.counts.dispatched += 1
            self.table.dispatch(worker, (edge, msg_id), parts)
            sends.append((BACKEND, [worker.identity, edge] + parts))
        return sends

    def _redeliver(self, lost: list, now: float) -> None:
        """Requests a lost worker held go first in line, keeping their order."""
        for (edge, msg_id), parts in reversed(lost):
            self.queue.appendleft((edge, msg_id, parts, now))
        self.counts.redelivered += len(lost)
