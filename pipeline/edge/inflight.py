"""The edge's requests in flight, and the rule that every frame gets exactly one answer.

A pure object (h11's shape): no sockets, no torch, no asyncio; the clock comes in as `now`
(monotonic seconds). The producer feeds it events and turns what comes out into outcomes:

    open(frames, exit answers, uplink bytes, now) -> msg_id     a request was sent
    answer(reply)  -> Resolution                                a worker answered
    refuse(error)  -> Resolution                                broker or worker refused
    reply_fault(reply, classes) -> reason | None                before either: believable?
    fail(msg_id, "unreachable")  -> Resolution                  the send itself failed
    expire(now)    -> [Resolution]                              deadlines that passed
    next_deadline()                                             when expire has work next

The rule: a request leaves the table exactly once, and only the event that removes it
finalizes its frames. Whatever comes later for the same msg_id (a second answer after a
redelivery, a late reply after the deadline, a refusal after the answer) finds nothing and
resolves as DUPLICATE with no finals. A reply that cannot be true (a frame count other
than its request's, a msg_id this table never gave out, or what `reply_fault` finds: a class
the model lacks, a confidence outside [0, 1]) is REJECTED with its reason and finalizes
nothing: a broken or hostile peer cannot answer for a frame, the request stays, and its
deadline decides.

Every request gets the same deadline_s, so insertion order is deadline order: the first entry
is always the next to expire, and `expire` stops at the first live one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence

from pipeline.protocol.wire import MAX_MSG_ID, REFUSAL_NAMES, UNKNOWN_CLASS, Error, Reply

__all__ = ["InFlight", "Resolution", "Status", "Final", "DEADLINE", "UNREACHABLE",
           "SHED", "FALLBACK_REASONS", "BAD_REPLY_REASONS", "reply_fault"]

DEADLINE = "deadline"          # no answer in time: the exit's answer stands
UNREACHABLE = "unreachable"    # the request could not even be queued for sending
SHED = "shed"                  # an unfamiliar frame while the server's share is cut: unknown
FALLBACK_REASONS = (*REFUSAL_NAMES.values(), DEADLINE, UNREACHABLE, SHED)
# Why a reply was not believed (the metric's reason label)
CLASS_RANGE = "class_range"            # a class index the model does not have
CONFIDENCE_RANGE = "confidence_range"  # not in [0, 1] (the decoder already refuses NaN, Inf)
ANSWER_COUNT = "answer_count"          # not one answer per frame of the request
UNKNOWN_MSG_ID = "unknown_msg_id"      # an id this edge never sent
BAD_REPLY_REASONS = (CLASS_RANGE, CONFIDENCE_RANGE, ANSWER_COUNT, UNKNOWN_MSG_ID)


class Status(Enum):
    ANSWERED = "answered"      # the server's answers are final
    REFUSED = "refused"        # an ERROR: the exit's answers are final
    DEADLINE = DEADLINE
    UNREACHABLE = UNREACHABLE
    DUPLICATE = "duplicate"    # nothing in flight under that id (any more): discarded
    REJECTED = "rejected"      # a reply that cannot be true (its reason says why): discarded


@dataclass(frozen=True, slots=True)
class Final:
    """The one final answer for one frame."""
    frame: Any                 # the source's frame (frame_id, source, label, capture_ts)
    path: str                  # offload (the server answered) | fallback (the exit did)
    cls: int
    confidence: float
    reason: str | None         # why a fallback happened
    uplink_bytes: int          # this frame's share of its request on the wire
    exit_cls: int = 0          # the exit's answer as given at `open` (the fallback's class)


@dataclass(frozen=True, slots=True)
class Resolution:
    msg_id: int
    status: Status
    finals: tuple[Final, ...] = ()
    reply: Reply | None = None
    note: Any = None           # what the caller attached at `open` (the edge: head time)
    reason: str | None = None  # REJECTED: one of BAD_REPLY_REASONS


@dataclass(slots=True)
class _Request:
    frames: Sequence[Any]
    exit_cls: Sequence[int]
    exit_conf: Sequence[float]
    deadline: float
    uplink_bytes: int
    note: Any


def reply_fault(reply: Reply, classes: int) -> str | None:
    """Why the fields of `reply` cannot be a model's answer whatever it answers (a class
    index of `classes` or more that is not UNKNOWN_CLASS, a confidence outside [0, 1]), or
    None."""
    if ((reply.classes >= classes) & (reply.classes != UNKNOWN_CLASS)).any():
        return CLASS_RANGE
    c = reply.confidences
    if not ((c >= 0) & (c <= 1)).all():
        return CONFIDENCE_RANGE
    return None


def shares(total: int, n: int) -> list[int]:
    """Split a message's bytes over its frames so that the shares sum to the message."""
    return [total // n + (i < total % n) for i in range(n)]


class InFlight:
    def __init__(self, deadline_s: float):
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s}")
        self.deadline_s = deadline_s
        self._requests: dict[int, _Request] = {}   # insertion order = deadline order
        self._next_id = 1
        self._wrapped = False   # every u32 id has been given out once

    def __len__(self) -> int:
        return len(self._requests)

    def open(self, frames: Sequence[Any], exit_cls: Sequence[int], exit_conf: Sequence[float],
             uplink_bytes: int, now: float, note: Any = None) -> int:
        """Register a request for `frames` with their exit answers; returns its msg_id."""
        if not frames or not len(frames) == len(exit_cls) == len(exit_conf):
            raise ValueError("a request needs one exit answer per frame, and frames")
        msg_id = self.take_id()  # u32 on the wire: wraps to 1, long after any request with
        # that id has been answered or expired
        self._requests[msg_id] = _Request(frames, exit_cls, exit_conf, now + self.deadline_s,
                                          uplink_bytes, note)
        return msg_id

    def next_id(self) -> int:
        """The msg_id the next `open` returns (to encode the request before opening it)."""
        return self._next_id

    def take_id(self) -> int:
        """A msg_id no request in the table will have, for a message outside it (a shadow)."""
        msg_id = self._next_id
        self._next_id = msg_id % MAX_MSG_ID + 1
        self._wrapped = self._wrapped or self._next_id == 1
        return msg_id

    def issued(self, msg_id: int) -> bool:
        """Whether this table ever gave out `msg_id` (a late answer's id was; a forged one
        may not have been)."""
        return self._wrapped or 1 <= msg_id < self._next_id

    def next_deadline(self) -> float | None:
        for request in self._requests.values():
            return request.deadline
        return None

    def answer(self, reply: Reply) -> Resolution:
        request = self._requests.get(reply.msg_id)
        if request is None and not self.issued(reply.msg_id):
            return Resolution(reply.msg_id, Status.REJECTED, reason=UNKNOWN_MSG_ID)
        if request is None:   # the reply rides along: a late answer still says the server
            return Resolution(reply.msg_id, Status.DUPLICATE, reply=reply)   # is there
        if len(reply.classes) != len(request.frames):
            return Resolution(reply.msg_id, Status.REJECTED, reason=ANSWER_COUNT)
        del self._requests[reply.msg_id]
        finals = tuple(Final(f, "offload", int(c), float(p), None, b, int(e))
                       for f, c, p, b, e in zip(request.frames, reply.classes.tolist(),
                                                reply.confidences.tolist(),
                                                shares(request.uplink_bytes, len(request.frames)),
                                                request.exit_cls))
        return Resolution(reply.msg_id, Status.ANSWERED, finals, reply, request.note)

    def refuse(self, error: Error) -> Resolution:
        if not self.issued(error.msg_id):
            return Resolution(error.msg_id, Status.REJECTED, reason=UNKNOWN_MSG_ID)
        return self._fall_back(error.msg_id, Status.REFUSED, REFUSAL_NAMES[error.reason])

    def fail(self, msg_id: int, reason: str = UNREACHABLE) -> Resolution:
        """The request never left: its frames fall back, and carried no bytes."""
        request = self._requests.get(msg_id)
        if request is not None:
            request.uplink_bytes = 0
        return self._fall_back(msg_id, Status.UNREACHABLE, reason)

    def expire(self, now: float) -> list[Resolution]:
        due = []
        for msg_id, request in self._requests.items():
            if request.deadline > now:
                break
            due.append(msg_id)
        return [self._fall_back(msg_id, Status.DEADLINE, DEADLINE) for msg_id in due]

    def _fall_back(self, msg_id: int, status: Status, reason: str) -> Resolution:
        request = self._requests.pop(msg_id, None)
        if request is None:
            return Resolution(msg_id, Status.DUPLICATE)
        finals = tuple(Final(f, "fallback", int(c), float(p), reason, b, int(c))
                       for f, c, p, b in zip(request.frames, request.exit_cls, request.exit_conf,
                                             shares(request.uplink_bytes, len(request.frames))))
        return Resolution(msg_id, status, finals, None, request.note)
