"""The broker's rules as a pure object: admission, the queue, expiry, credit, dispatch,
heartbeats and redelivery. Events in, sends out; no sockets, the clock passed in as `now`.

    request(edge, msg_id, parts, now, shadow) an edge's request: BUSY if the queue or the
                                             byte budget is full (a shadow: unless a worker
                                             has free credit); a msg_id already in flight
                                             from that edge is refused, never overwritten
    reply(worker, edge, msg_id, answer, now) a worker's answer: forwarded only if that
                                             worker holds that request, else dropped
    ready / heartbeat / disconnect(worker)   a worker's control messages
    worker_gone(worker, now)                 a send to it failed: it vanished
    tick(now)                                expiry (NO_WORKER), silent workers purged
    heartbeats()                             one HEARTBEAT per known worker

Each returns the sends to make, as (FRONTEND | BACKEND, [peer identity, *parts]).

Guarantees: a request goes only to a worker with free credit; every request in flight is
remembered with its worker, and when a worker misses its heartbeats (or re-announces itself,
or cannot be sent to) what it held goes back to the front of the queue for another worker (a
redelivery). Only the worker holding a request may answer it: a reply from a peer that never
sent READY, for a request it was not given, or for one since redelivered or expired is
dropped and counted (`Counts.dropped`). The queue is bounded in count and, with what workers
hold, in bytes: when full the edge gets BUSY at once and answers locally. A request older
than `queue_timeout_s` -- queued or in a worker's hands; its arrival time is kept across
redeliveries -- is answered NO_WORKER: its edge gave up long ago.

Peers that take work and never answer: credit is capped (MAX_CREDIT), a worker that has not
answered yet gets at most START_CREDIT requests (one more per answer), what expired in its
hands still counts against its credit until it answers it, and a worker that holds work but
answers nothing for a liveness period is dropped like one that stopped heartbeating (its
requests redelivered). No state is kept per edge, so an edge that vanishes costs nothing.
"""

from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass, field

from pipeline.protocol import wire
from pipeline.protocol.wire import Refusal
from workers.config import MAX_CREDIT, START_CREDIT

__all__ = ["Scheduler", "WorkerTable", "Worker", "Request", "Counts", "FRONTEND", "BACKEND",
           "DROP_REASONS"]

FRONTEND, BACKEND = 0, 1   # which socket a send goes out of

# Why a worker's reply was not forwarded (a metric label each):
DROP_REASONS = ("unknown_worker",   # the peer is not a live worker: never READY, or dropped
                "not_held",         # it was not given that request, or it went to another
                "late")             # it held it, but the request expired in its hands first


@dataclass(slots=True, eq=False)
class Request:
    edge: bytes
    msg_id: int
    parts: list
    since: float                 # arrival at the broker: the deadline is since + timeout
    size: int                    # bytes held for it
    worker: bytes | None = None  # who holds it; None while queued

    @property
    def key(self) -> tuple:
        return self.edge, self.msg_id


@dataclass
class Worker:
    identity: bytes
    credit: int                  # requests it may hold at once (capped at MAX_CREDIT)
    expiry: float                # monotonic time it is declared dead without traffic
    inflight: dict = field(default_factory=dict)   # (edge, msg_id) -> Request, in order
    late: set = field(default_factory=set)  # keys that expired in its hands, answer owed
    owing_since: float | None = None  # since when it has owed an answer and given none
    answered: int = 0
    draining: bool = False
    served: int = 0

    @property
    def held(self) -> int:
        """Requests it was given and has not answered (expired ones included)."""
        return len(self.inflight) + len(self.late)

    @property
    def free(self) -> int:
        """Requests it may be given now: its credit, but only START_CREDIT plus one per answer
        so far (slow start)."""
        if self.draining:
            return 0
        return max(0, min(self.credit, START_CREDIT + self.answered) - self.held)


class WorkerTable:
    """Live workers, their credit and what each holds."""

    def __init__(self, liveness_s: float):
        self.liveness_s = liveness_s
        self.workers: dict[bytes, Worker] = {}

    def ready(self, identity: bytes, credit: int, now: float) -> list:
        """A worker (re)announced itself. If it was known, what it held is lost: redeliver."""
        lost = self.remove(identity)
        self.workers[identity] = Worker(identity, min(credit, MAX_CREDIT),
                                        now + self.liveness_s)
        return lost

    def seen(self, identity: bytes, now: float) -> bool:
        worker = self.workers.get(identity)
        if worker is not None:
            worker.expiry = now + self.liveness_s
        return worker is not None

    def pick(self) -> Worker | None:
        """Of the workers that may take a request now, the one with the most credit left
        (ties: the one that served least). Ranked by credit, not by what slow start allows,
        so that a worker's answers do not draw all the work to it at low load."""
        best, best_rank = None, None
        for w in self.workers.values():
            rank = (w.credit - w.held, -w.served)
            if w.free > 0 and (best is None or rank > best_rank):
                best, best_rank = w, rank
        return best

    def dispatch(self, worker: Worker, request: Request, now: float) -> None:
        if worker.owing_since is None:
            worker.owing_since = now
        request.worker = worker.identity
        worker.inflight[request.key] = request
        worker.served += 1

    def answer(self, identity: bytes, key: tuple, now: float) -> str | None:
        """A reply arrived: None if `identity` holds that request (it may be forwarded),
        else why it is dropped (one of DROP_REASONS)."""
        worker = self.workers.get(identity)
        if worker is None:
            return "unknown_worker"
        if worker.inflight.pop(key, None) is not None:
            worker.answered += 1
            reason = None
        elif key in worker.late:   # a real answer, only too late: it still shows life
            worker.late.discard(key)
            reason = "late"
        else:
            return "not_held"
        worker.owing_since = now if worker.inflight or worker.late else None
        if worker.draining and not worker.inflight:
            del self.workers[identity]
        return reason

    def expire(self, request: Request) -> None:
        """The request's deadline passed in its worker's hands: it leaves the worker, whose
        answer is still owed (and still uses its credit) until it comes."""
        worker = self.workers[request.worker]
        del worker.inflight[request.key]
        worker.late.add(request.key)
        request.worker = None

    def drain(self, identity: bytes) -> None:
        worker = self.workers.get(identity)
        if worker is not None:
            worker.draining = True
            if not worker.inflight:
                del self.workers[identity]

    def remove(self, identity: bytes) -> list[Request]:
        worker = self.workers.pop(identity, None)
        lost = list(worker.inflight.values()) if worker else []
        for request in lost:
            request.worker = None
        return lost

    def purge(self, now: float) -> list[Request]:
        """Drop workers past their expiry, and those that owe answers and gave none for a
        liveness period (heartbeats alone do not keep a worker that never answers); return
        their in-flight requests to redeliver."""
        lost = []
        for identity in [i for i, w in self.workers.items() if w.expiry < now or (
                w.owing_since is not None and now - w.owing_since > self.liveness_s)]:
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
    duplicate: int = 0         # a msg_id already in flight from the same edge
    expired: int = 0           # past their deadline in the queue ...
    expired_held: int = 0      # ... or in a worker's hands
    redelivered: int = 0
    dropped: dict = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))


class Scheduler:
    def __init__(self, max_queue: int, queue_timeout_s: float, liveness_s: float,
                 max_held_bytes: int = 64 << 20):
        if max_queue < 1 or not queue_timeout_s > 0 or not liveness_s > 0 \
                or not max_held_bytes > 0:
            raise ValueError(f"max_queue {max_queue} must be >= 1, and queue_timeout_s "
                             f"{queue_timeout_s:g}, liveness_s {liveness_s:g} and "
                             f"max_held_bytes {max_held_bytes} positive")
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.max_held_bytes = max_held_bytes
        self.table = WorkerTable(liveness_s)
        self.queue: collections.deque[Request] = collections.deque()
        self.requests: dict[tuple, Request] = {}   # everything held, queued or dispatched
        self.held_bytes = 0
        self.deadlines: list = []   # (deadline, seq, key) per dispatch, a heap
        self._seq = 0
        self.counts = Counts()

    # -- edges ----------------------------------------------------------------------------------

    def request(self, edge: bytes, msg_id: int, parts: list, now: float,
                shadow: bool = False) -> list:
        """Queue a request and dispatch what credit allows. A shadow (a frame its exit
        already answered) never waits: it is taken only by free credit, else refused."""
        self.counts.requests += 1
        if (edge, msg_id) in self.requests:
            self.counts.duplicate += 1
            return [(FRONTEND, [edge] + wire.encode_error(
                msg_id, Refusal.BAD_REQUEST, f"msg_id {msg_id} is already in flight"))]
        if shadow and (self.queue or not self.table.free_credit):
            self.counts.shadows_refused += 1
            return [(FRONTEND, [edge] + wire.encode_error(
                msg_id, Refusal.BUSY, "shadows go only to free credit"))]
        size = sum(len(p) for p in parts)
        if len(self.queue) >= self.max_queue or self.held_bytes + size > self.max_held_bytes:
            self.counts.busy += 1
            full = (f"broker queue full ({self.max_queue})" if len(self.queue) >= self.max_queue
                    else f"broker holds {self.held_bytes >> 20} MiB of requests")
            return [(FRONTEND, [edge] + wire.encode_error(msg_id, Refusal.BUSY, full))]
        request = Request(edge, msg_id, parts, now, size)
        self.requests[request.key] = request
        self.held_bytes += size
        self.queue.append(request)
        return self._dispatch(now)

    # -- workers --------------------------------------------------------------------------------

    def reply(self, worker: bytes, edge: bytes, msg_id: int, answer: bytes, now: float) -> list:
        """Forward an answer from the worker holding the request; drop (and count) the rest."""
        self.table.seen(worker, now)
        dropped = self.table.answer(worker, (edge, msg_id), now)
        if dropped is not None:
            self.counts.dropped[dropped] += 1
            return self._dispatch(now) if dropped == "late" else []  # late: credit came back
        self._forget(self.requests[(edge, msg_id)])
        self.counts.replies += 1
        sends = self._dispatch(now)   # the freed credit first: the load stamped is what's left
        return [(FRONTEND, [edge, wire.stamp_load(answer, len(self.queue),
                                                  self.table.free_credit)])] + sends

    def ready(self, worker: bytes, credit: int, now: float) -> list:
        """Confirm with a HEARTBEAT at once (the worker's readiness), then give it work."""
        self._redeliver(self.table.ready(worker, credit, now))
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
        self._redeliver(self.table.remove(worker))
        return self._dispatch(now)

    # -- time -----------------------------------------------------------------------------------

    def tick(self, now: float) -> list:
        sends = self._expire_held(now)
        self._redeliver(self.table.purge(now))   # workers that went silent
        return sends + self._dispatch(now)

    def heartbeats(self) -> list:
        return [(BACKEND, [identity] + wire.HEARTBEAT) for identity in self.table.workers]

    # -- rules ----------------------------------------------------------------------------------

    def _expired(self, request: Request, now: float) -> bool:
        return now - request.since > self.queue_timeout_s

    def _no_worker(self, request: Request) -> tuple:
        self._forget(request)
        return (FRONTEND, [request.edge] + wire.encode_error(
            request.msg_id, Refusal.NO_WORKER, "no worker answered in time"))

    def _forget(self, request: Request) -> None:
        del self.requests[request.key]
        self.held_bytes -= request.size

    def _dispatch(self, now: float) -> list:
        sends = []
        while self.queue:
            request = self.queue[0]
            if self._expired(request, now):
                self.queue.popleft()
                self.counts.expired += 1
                sends.append(self._no_worker(request))
                continue
            worker = self.table.pick()
            if worker is None:
                break
            self.queue.popleft()
            self.counts.dispatched += 1
            self.table.dispatch(worker, request, now)
            self._seq += 1
            heapq.heappush(self.deadlines, (request.since + self.queue_timeout_s, self._seq,
                                            request.key))
            sends.append((BACKEND, [worker.identity, request.edge] + request.parts))
        return sends

    def _expire_held(self, now: float) -> list:
        """Requests whose deadline passed in a worker's hands: NO_WORKER to their edge. The
        heap holds keys, not requests (an answered request's bytes are not kept alive by
        it); a key since answered, queued again, or reused by a newer request is skipped."""
        sends = []
        while self.deadlines and self.deadlines[0][0] < now:
            request = self.requests.get(heapq.heappop(self.deadlines)[2])
            if request is None or request.worker is None or not self._expired(request, now):
                continue
            self.table.expire(request)
            self.counts.expired_held += 1
            sends.append(self._no_worker(request))
        return sends

    def _redeliver(self, lost: list[Request]) -> None:
        """Requests a lost worker held go first in line, keeping their order and their
        arrival time (so their deadline)."""
        self.queue.extendleft(reversed(lost))
        self.counts.redelivered += len(lost)
