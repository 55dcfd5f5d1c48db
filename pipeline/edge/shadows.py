"""Shadows: frames the exit answered, also sent to the server to measure the exit in
production. A pure object, like the in-flight table (no sockets; `now` comes in).

A shadow's frame is already final (its exit answer stands and is never changed), so a shadow
has no deadline and no fallback: its answer, whenever it comes, is one more measurement of
whether the exit and the tail agree. It is never an offload: it is not in the in-flight
table, not in the offload counts, not in what the budget controller holds. Shadows are the
first thing dropped under load: the producer sends none while the controller backs off or
while `max_outstanding` are unanswered, and the broker refuses one unless a worker has free
credit and nothing waits in its queue.

    pick(n_exited) -> [i]             which of a batch's exited frames to shadow (systematic
                                      sampling: every 1/fraction-th exited frame, no RNG)
    open(msg_id, exit_classes, now)   their request was sent
    answer(reply) / refuse(error)     True when the msg_id was a shadow's
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.protocol.wire import Error, Reply

__all__ = ["Shadows", "ShadowCounts", "SHADOW_TIMEOUT_S", "MAX_OUTSTANDING"]

SHADOW_TIMEOUT_S = 10.0    # unanswered this long (a restarted broker forgot it): dropped
MAX_OUTSTANDING = 256      # unanswered shadows at most; beyond, none are sent


@dataclass
class ShadowCounts:
    sent: int = 0
    answered: int = 0
    dropped: int = 0           # refused by the broker, or never answered
    agreed: int = 0            # answered, and the tail's class is the exit's
    exit_correct: float = 0.0  # sum over answered: the tail's confidence where they agree

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.answered if self.answered else None

    @property
    def exit_accuracy(self) -> float | None:
        """The exit's accuracy on the frames it answers, with the tail as the judge: where
        they agree the exit is right as often as the tail is (its calibrated confidence);
        where they disagree it is counted wrong (a lower bound by the tail's error there)."""
        return self.exit_correct / self.answered if self.answered else None


class Shadows:
    def __init__(self, fraction: float, max_outstanding: int = MAX_OUTSTANDING):
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction {fraction}: a fraction of exited frames in [0, 1]")
        self.fraction = fraction
        self.max_outstanding = max_outstanding
        self.counts = ShadowCounts()
        self._credit = 0.0                           # systematic sampling's accumulator
        self._open: dict[int, tuple[tuple[int, ...], float]] = {}   # msg_id -> (classes, t)

    def pick(self, n_exited: int) -> list[int]:
        """Indices (among a batch's n exited frames) to shadow, about `fraction` of them."""
        picked = []
        for i in range(n_exited):
            self._credit += self.fraction
            if self._credit >= 1.0:
                self._credit -= 1.0
                picked.append(i)
        return picked

    def room(self, now: float) -> bool:
        """Whether a shadow may be sent now (after dropping the long unanswered: the table
        is in sending order, so they are at its front)."""
        for msg_id, (_, sent_at) in list(self._open.items()):
            if now - sent_at <= SHADOW_TIMEOUT_S:
                break
            self.drop(msg_id)
        return len(self._open) < self.max_outstanding

    def skip(self, frames: int) -> None:
        """Frames picked but not sent (the server is loaded): dropped, first of all."""
        self.counts.dropped += frames

    def open(self, msg_id: int, exit_classes: list[int], now: float) -> None:
        self._open[msg_id] = (tuple(exit_classes), now)
        self.counts.sent += len(exit_classes)

    def answer(self, reply: Reply) -> bool:
        entry = self._open.get(reply.msg_id)
        if entry is None or len(entry[0]) != len(reply.classes):
            return False
        del self._open[reply.msg_id]
        c = self.counts
        for exit_cls, tail_cls, tail_conf in zip(entry[0], reply.classes.tolist(),
                                                 reply.confidences.tolist()):
            c.answered += 1
            if exit_cls == tail_cls:
                c.agreed += 1
                c.exit_correct += tail_conf
        return True

    def close(self) -> None:
        """The stream ended: shadows still unanswered count as dropped (the edge does not
        wait on measurements)."""
        for msg_id in list(self._open):
            self.drop(msg_id)

    def refuse(self, error: Error) -> bool:
        return self.drop(error.msg_id)

    def drop(self, msg_id: int) -> bool:
        """The shadow was refused, or never left: dropped."""
        entry = self._open.pop(msg_id, None)
        if entry is None:
            return False
        self.counts.dropped += len(entry[0])
        return True
