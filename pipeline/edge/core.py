"""The edge's rules in one pure object: which frame the exit answers, which are offloaded,
which are shadowed, and what every answer, refusal and deadline makes of them.

No sockets, no asyncio, no metrics, no clock (h11's shape, as the parts it combines): the
I/O shell (pipeline.edge.async_edge.AsyncEdge) runs the head, encodes and sends, and feeds
the core what happened, with `now` in monotonic seconds; what comes back are outcomes to
hand out, and counts for one exporter to copy into metrics. So every rule that combines the
in-flight table, the budget controller, the shadows and the choice of broker is testable
in-process (tests/test_edge_core.py).

    decide(frames, exit_cls, scores, head_ms, now, unfamiliar) -> Plan
                                                             the batch: exit answers (final),
                                                             frames to offload, to shadow,
                                                             and the broker for both
    next_msg_id(); open_request(plan, wire_bytes, now)       the request is about to go
    request_sent(plan, msg_id, sent, wire_bytes, feature_bytes, payload_bytes, now)
                                                             -> [Outcome]
                                                             it went (or could not: fallback)
    open_shadow(plan, now) -> msg_id; shadow_sent(msg_id, wire_bytes | None)
    receive(answer, now) -> [Outcome]                        a Reply or an Error arrived
    expire(now) -> [Outcome]; next_deadline()                deadlines that passed, the next
    close()                                                  the stream ended
    brokers.link_up(i, now) / link_down(i)                   what a broker's socket saw

A frame the edge's unfamiliarity score flagged (pipeline.floor.unfamiliar) is never the
exit's to answer: it is offloaded whatever its confidence, its fallback is `unknown`, and the
budget controller counts it as an offload (it sees the frame at the lowest score). The tail
answers it with a class, or `unknown` by its own score (wire.UNKNOWN_CLASS). While the
controller has cut the server's share (backing off, recovering), flagged frames are shed
first: answered `unknown` at once (a fallback, reason `shed`), so an outage costs no
deadline and no bytes for them, and the probes that find the server again stay the
controller's own.

How an ended request counts for its broker: answered or refused as busy / bad_request /
wrong_model, it works; a deadline, a failed send or `no_worker` is a strike against it
(pipeline.edge.brokers).

An outcome's latency is the shell's to stamp when it hands the answer out (wall clock, as the
frame's capture time): the core does not read clocks.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pipeline.edge.brokers import Brokers
from pipeline.edge.controller import Controller, ControllerConfig, State
from pipeline.edge.inflight import SHED, InFlight, Resolution, Status, reply_fault
from pipeline.edge.results import UNKNOWN, UNKNOWN_NAME, Outcome
from pipeline.edge.shadows import Shadows
from pipeline.protocol.wire import REFUSAL_NAMES, UNKNOWN_CLASS, Error, Refusal, Reply

if TYPE_CHECKING:
    from pipeline.edge.source_base import Frame

__all__ = ["EdgeCore", "Plan", "REQUEST_STATUSES", "COUNTS", "UNFAMILIAR_WHERE"]

REQUEST_STATUSES = tuple(s.value for s in (Status.ANSWERED, Status.REFUSED, Status.DEADLINE,
                                           Status.UNREACHABLE))
# The running counts in EdgeCore.counts (the exporter maps each to its counter)
FAILED = (Status.DEADLINE, Status.UNREACHABLE)   # with a no_worker refusal: a broker's strike
NO_WORKER = REFUSAL_NAMES[Refusal.NO_WORKER]
UNFAMILIAR_WHERE = ("edge", "tail")   # whose score flagged a frame: the metric's label
COUNTS = ("duplicates", "exit_confidence", "uplink_bytes", "feature_bytes", "payload_bytes",
          "shadow_bytes", *(f"requests.{s}" for s in REQUEST_STATUSES),
          *(f"unfamiliar.{w}" for w in UNFAMILIAR_WHERE))
# What the controller sees of a flagged frame: no confidence, below every threshold it sets
UNFAMILIAR_SCORE = 0.0


@dataclass(frozen=True, slots=True)
class Plan:
    """What one batch of frames comes to, decided at once."""
    frames: Sequence[Frame]
    exit_cls: list[int]
    scores: np.ndarray
    head_ms: float
    threshold: float
    local: list[Outcome]                             # final now: the exit's, and shed frames'
    offload: list[int] = field(default_factory=list)   # indices to send in one request
    shadow: list[int] = field(default_factory=list)    # indices of exited frames to shadow
    broker: int = 0                                  # where both go (Brokers' index)


class EdgeCore:
    def __init__(self, threshold: float, deadline_s: float, class_names: Sequence[str], *,
                 controller: ControllerConfig | None = None, shadow: float = 0.0,
                 brokers: Brokers | None = None, bytes_per_offload_hint: float = 100.0):
        self.trained_threshold = threshold
        self.class_names = list(class_names)
        self.inflight = InFlight(deadline_s)
        self.controller = controller and Controller(controller, threshold,
                                                    bytes_per_offload_hint)
        self.shadows = Shadows(shadow) if shadow else None
        self.brokers = brokers or Brokers(["the broker"], "")
        self.sent_to: Counter[int] = Counter()       # broker -> requests sent to it
        self.counts: Counter[str] = Counter(dict.fromkeys(COUNTS, 0))
        self.bad_replies: Counter[str] = Counter()   # reason -> replies not believed

    def __len__(self) -> int:
        """Requests in flight."""
        return len(self.inflight)

    @property
    def threshold(self) -> float:
        """The trained threshold, or the controller's latest."""
        return self.controller.threshold if self.controller else self.trained_threshold

    # -- a batch --------------------------------------------------------------------------

    def decide(self, frames: Sequence[Frame], exit_cls: list[int], scores: np.ndarray,
               head_ms: float, now: float, unfamiliar: np.ndarray | None = None) -> Plan:
        """The sure frames' final answers (the exit's), the unsure and the unfamiliar to
        offload, and of the sure the few to shadow: none while the controller backs off or
        shadows wait."""
        shed: list[int] = []
        if unfamiliar is not None and unfamiliar.any():
            self.counts["unfamiliar.edge"] += int(unfamiliar.sum())
            scores = np.where(unfamiliar, UNFAMILIAR_SCORE, scores)
            exit_cls = [UNKNOWN if u else c for c, u in zip(exit_cls, unfamiliar.tolist())]
            if self.controller and self.controller.state is not State.TRACKING:
                shed = np.flatnonzero(unfamiliar).tolist()
        else:
            unfamiliar = np.zeros(len(frames), bool)
        if self.controller:   # shed frames are not the controller's to offload
            threshold = self.controller.observe(scores[~unfamiliar] if shed else scores, now)
        else:
            threshold = self.trained_threshold
        sure = (scores >= threshold) & ~unfamiliar
        exited = np.flatnonzero(sure).tolist()
        local = [self._outcome(frames[i], "exit", exit_cls[i], float(scores[i]), None,
                               head_ms) for i in exited]
        local += [self._outcome(frames[i], "fallback", UNKNOWN, UNFAMILIAR_SCORE, SHED, head_ms,
                                unfamiliar=True) for i in shed]
        self.counts["exit_confidence"] += float(scores[exited].sum()) if exited else 0.0
        sent = ~sure
        sent[shed] = False
        offload, shadow = np.flatnonzero(sent).tolist(), self._pick_shadows(exited, now)
        plan = Plan(frames, exit_cls, scores, head_ms, threshold, local, offload, shadow,
                    self.brokers.pick(now) if offload or shadow else 0)
        if not plan.offload and self.controller:
            self.controller.sent(len(frames), 0, 0, now)
        return plan

    def _pick_shadows(self, exited: list[int], now: float) -> list[int]:
        if self.shadows is None or not exited:
            return []
        picked = [exited[j] for j in self.shadows.pick(len(exited))]
        if picked and (not self.shadows.room(now) or (
                self.controller and self.controller.state is not State.TRACKING)):
            self.shadows.skip(len(picked))   # the server is loaded: shadows go first
            return []
        return picked

    def next_msg_id(self) -> int:
        """The id `open_request` will give (to encode the request before opening it)."""
        return self.inflight.next_id()

    def open_request(self, plan: Plan, wire_bytes: int, now: float) -> int:
        """The plan's offloaded frames wait for the server from now: before the send, so
        that no answer can find them missing."""
        return self.inflight.open([plan.frames[i] for i in plan.offload],
                                  [plan.exit_cls[i] for i in plan.offload],
                                  [float(plan.scores[i]) for i in plan.offload],
                                  wire_bytes, now, note=(plan.head_ms, plan.broker))

    def request_sent(self, plan: Plan, msg_id: int, sent: bool, wire_bytes: int,
                     feature_bytes: int, payload_bytes: int, now: float) -> list[Outcome]:
        """The request went out, or could not be queued (the link is down and the send queue
        full): then its frames fall back at once, and it carried no bytes."""
        outcomes = [] if sent else self._resolve(self.inflight.fail(msg_id), now)
        if sent:
            self.sent_to[plan.broker] += 1
            self.counts["uplink_bytes"] += wire_bytes
            self.counts["feature_bytes"] += feature_bytes
            self.counts["payload_bytes"] += payload_bytes
        if self.controller:
            self.controller.sent(len(plan.frames), len(plan.offload), wire_bytes if sent else 0,
                                 now)
        return outcomes

    def open_shadow(self, plan: Plan, now: float) -> int:
        """A msg_id for the plan's shadows, counted as sent from now."""
        msg_id = self.inflight.take_id()
        self.shadows.open(msg_id, [plan.exit_cls[i] for i in plan.shadow], now)
        return msg_id

    def shadow_sent(self, msg_id: int, wire_bytes: int | None) -> None:
        """None: the shadow could not be queued, and is dropped."""
        if wire_bytes is None:
            self.shadows.drop(msg_id)
        else:
            self.counts["shadow_bytes"] += wire_bytes

    # -- what comes back ------------------------------------------------------------------

    def receive(self, answer: Reply | Error, now: float) -> list[Outcome]:
        """A decoded answer from the broker. One that cannot be true (a class the model
        lacks, a confidence outside [0, 1], another frame count, an id never sent) is
        counted in `bad_replies` and finalizes nothing: its frames wait for their deadline."""
        refused = isinstance(answer, Error)
        fault = None if refused else reply_fault(answer, len(self.class_names))
        if fault:
            self.bad_replies[fault] += 1
            return []
        if self.shadows is not None and (
                self.shadows.refuse(answer) if refused else self.shadows.answer(answer)):
            return []
        return self._resolve(self.inflight.refuse(answer) if refused
                             else self.inflight.answer(answer), now)

    def next_deadline(self) -> float | None:
        return self.inflight.next_deadline()

    def expire(self, now: float) -> list[Outcome]:
        """The exit's answers for the requests whose deadline has passed."""
        return [o for r in self.inflight.expire(now) for o in self._resolve(r, now)]

    def close(self) -> None:
        """The stream ended: unanswered shadows count as dropped."""
        if self.shadows is not None:
            self.shadows.close()

    def _resolve(self, r: Resolution, now: float) -> list[Outcome]:
        """What the in-flight table decided, for the counts, the controller and the frames."""
        if r.status is Status.DUPLICATE:
            self.counts["duplicates"] += 1   # late, or a second answer after a redelivery
            if self.controller and r.reply:
                self._answered(r.reply, now, late=True)
            return []
        if r.status is Status.REJECTED:
            self.bad_replies[r.reason] += 1
            return []
        self.counts[f"requests.{r.status.value}"] += 1
        head_ms, broker = r.note
        reason = r.finals[0].reason
        if r.status in FAILED or reason == NO_WORKER:
            self.brokers.failed(broker, now)
        else:
            self.brokers.answered(broker)
        if self.controller:
            if r.status is Status.ANSWERED:
                self._answered(r.reply, now)
            else:
                self.controller.refused(reason, now)
        reply = r.reply
        server = (reply.worker_id, reply.queue_us, reply.tail_us, reply.batch) if reply else ()
        outcomes = [self._outcome(f.frame, f.path, f.cls, f.confidence, f.reason, head_ms,
                                  f.uplink_bytes, *server, unfamiliar=f.exit_cls == UNKNOWN)
                    for f in r.finals]
        self.counts["unfamiliar.tail"] += sum(o.path == "offload" and o.unknown
                                              for o in outcomes)
        return outcomes

    def _answered(self, reply: Reply, now: float, late: bool = False) -> None:
        """Tell the controller the server answered, and the load the answer came with."""
        self.controller.answered(now, reply.queued, reply.free_credit,
                                 (reply.queue_us + reply.tail_us) / 1e6, late,
                                 len(reply.classes))

    def _outcome(self, frame: Frame, path: str, cls: int, confidence: float,
                 reason: str | None, head_ms: float, *server, unfamiliar: bool = False
                 ) -> Outcome:
        if cls in (UNKNOWN, UNKNOWN_CLASS):
            cls, name = UNKNOWN, UNKNOWN_NAME
        else:
            name = self.class_names[cls] if 0 <= cls < len(self.class_names) else None
        return Outcome(frame.frame_id, frame.source, path, cls, confidence, frame.label, reason,
                       frame.capture_ts, head_ms, 0.0, *server, class_name=name,
                       unfamiliar=unfamiliar)
