"""The edge's budget controller: moves the exit threshold online so that what the edge sends
holds one target while the server pool, the uplink and the scene change under it.

A pure object, like the in-flight table: no sockets, no clock of its own (`now` comes in,
monotonic seconds), so tests drive it with synthetic score streams. The producer calls

    observe(scores, now) -> threshold    a batch's calibrated exit scores: offload the frames
                                          scoring below the threshold returned
    sent(frames, offloaded, wire_bytes, now)   what that batch put on the wire
    refused(reason, now)                  a request came back unanswered (busy, no_worker,
                                          deadline, unreachable)
    answered(now, queued, free_credit, server_s)   the server answered a request, and how
                                          loaded it was (wire.Reply's load hint, and the
                                          worker's queue + tail time)

How it decides:
- Which frames: the least confident `ratio` of recent frames. A sorted window of the last
  `window` scores gives the threshold that would have offloaded exactly that ratio of them
  (quantile tracking: exact on the window, no gain to tune, follows a drifting scene within
  one window). Until `min_frames` scores arrived, the trained threshold stands.
- The ratio is the smallest of the target and the server cap:
    target: the offload ratio asked for, or for an uplink budget, budget / (frames/s x
    bytes per offloaded frame), both measured over the last `rate_window_s`;
    server cap: AIMD, as TCP's congestion window, cut from what the server actually served
    over the last second (its capacity, when it is saturated), not from what was sent:
    to 0.9 of it when most answers of a hold say the pool is saturated (requests queued at
    the broker, no free credit, a quarter of the deadline spent in the worker, or an
    answer after its deadline: the load hint, before anything is refused); to 0.7 after
    a busy refusal or a missed deadline; to `floor` for no worker, an unreachable broker,
    or a second cut with no answer since the first. Then nothing is cut again for
    `hold_s`: refusals of requests sent before the cut are still arriving, and counting
    them again would spiral to zero (the hysteresis). After each hold whose answers all
    found room, the cap doubles (back up from the floor) or creeps up by `creep` of the
    target, 8x slower within 15 % of the capacity found (CUBIC's plateau), and it stops
    binding at the target.
- Bounds: never more than the target allows, never less than `floor`: a trickle of requests
  that notices when the server is back.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable

__all__ = ["Controller", "ControllerConfig", "State", "OVERLOAD_REASONS", "OUTAGE_REASONS",
           "OFFLOAD_ALL"]

OFFLOAD_ALL = 1.5                              # above every score: offload every frame
OVERLOAD_REASONS = ("busy", "deadline")        # the server is there, but too slow for us
OUTAGE_REASONS = ("no_worker", "unreachable")  # nobody to serve: fall to the floor
SATURATED_MIN_ANSWERS = 4      # a hold's answers before "most found a queue" means anything
SATURATED_DEADLINE_SHARE = 0.25  # an answer that spent this much of the deadline in a worker
REFUSED_DECREASE = 0.7         # of what it served: a refusal or a missed deadline, past it
SATURATED_DECREASE = 0.9       # ... a queue, no refusal yet: slow down, not as far
NEAR_OVERLOAD = 0.85           # within 15 % of where the server last pushed back ...
NEAR_OVERLOAD_SLOWDOWN = 8     # ... the cap creeps this many times slower
CAPACITY_WINDOW_S = 1.0        # the server's throughput is measured over this
# Other refusals (wrong_model, bad_request) say nothing about load: they do not move it.


class State(IntEnum):
    """What the controller is doing (exported as a number, the values are the contract)."""
    TRACKING = 0     # holding the target
    BACKING_OFF = 1  # the server cap was just cut: waiting out the hold
    RECOVERING = 2   # the server cap binds and climbs back


@dataclass(frozen=True)
class ControllerConfig:
    target_offload: float | None = None   # a fraction of frames, or
    uplink_budget: float | None = None    # bytes per second on the uplink (one of the two)
    window: int = 1000                    # scores the threshold is a quantile of
    min_frames: int = 50                  # scores before it moves the trained threshold
    rate_window_s: float = 2.0            # frames/s and bytes per frame are measured over this
    hold_s: float = 0.25                  # after a cut, refusals are not counted again
    floor: float = 0.005                  # the least offload ratio: the probe trickle
    creep: float = 0.125                  # additive increase per quiet hold, of the target
    deadline_s: float = math.inf          # the edge's deadline: answers near it are a warning

    def check(self) -> "ControllerConfig":
        """ValueError naming the parameter for a setting that cannot work (the edge's config
        names its flags; pipeline.edge.config)."""
        if (self.target_offload is None) == (self.uplink_budget is None):
            raise ValueError("give one target: target_offload or uplink_budget")
        if self.target_offload is not None and not 0 < self.target_offload <= 1:
            raise ValueError(f"target_offload {self.target_offload}: a fraction of frames "
                             f"in (0, 1]")
        if self.uplink_budget is not None and not 0 < self.uplink_budget < math.inf:
            raise ValueError(f"uplink_budget {self.uplink_budget}: bytes per second, > 0")
        if not 1 <= self.min_frames <= self.window:
            raise ValueError(f"min_frames {self.min_frames} must be in 1..window {self.window}")
        if self.rate_window_s <= 0 or self.hold_s <= 0 or not 0 < self.floor < 1 \
                or not 0 < self.creep <= 1:
            raise ValueError("rate_window_s and hold_s must be positive, floor and creep "
                             "fractions in (0, 1)")
        return self


class Controller:
    def __init__(self, cfg: ControllerConfig, trained_threshold: float,
                 bytes_per_offload_hint: float = 100.0):
        self.cfg = cfg.check()
        self.threshold = trained_threshold
        self.ratio = cfg.target_offload if cfg.target_offload is not None else 1.0
        self.state = State.TRACKING
        self.cap: float | None = None        # the server cap, None while it does not bind
        self._trained = trained_threshold
        self._window: deque[float] = deque()
        self._sorted: list[float] = []
        self._sent: deque[tuple[float, int, int, int]] = deque()   # (now, frames, off, bytes)
        self._frames = self._offloaded = self._bytes = 0           # sums over _sent
        self._started: float | None = None
        self._bytes_per_offload = bytes_per_offload_hint
        self._hold_until = -math.inf
        self._since_review = -math.inf  # the server's answers are reviewed once per hold
        self._answers = 0               # answers since the last review: the server is there
        self._saturated = 0             # ... of them, saying the pool is saturated
        self._answered_since_cut = True
        self._resume = 0.0              # doubling stops here (where the cap was cut to)
        self._overloaded_at = 0.0       # the ratio the server could take when it pushed back
        self._served: deque[tuple[float, int]] = deque()   # (now, frames answered)

    # -- events -----------------------------------------------------------------------------

    def observe(self, scores: Iterable[float], now: float) -> float:
        """Add a batch's scores to the window; the threshold for this batch."""
        if self._started is None:
            self._started = now
        for s in scores:
            s = float(s)
            self._window.append(s)
            bisect.insort(self._sorted, s)
            if len(self._window) > self.cfg.window:
                old = self._window.popleft()
                del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._review(now)
        self.ratio = self._target_ratio(now)
        if self.cap is not None:
            self.ratio = min(self.ratio, self.cap)
        self.threshold = self._quantile(self.ratio)
        return self.threshold

    def sent(self, frames: int, offloaded: int, wire_bytes: int, now: float) -> None:
        self._sent.append((now, frames, offloaded, wire_bytes))
        self._frames += frames
        self._offloaded += offloaded
        self._bytes += wire_bytes
        horizon = now - self.cfg.rate_window_s
        while self._sent and self._sent[0][0] < horizon:
            _, f, o, b = self._sent.popleft()
            self._frames -= f
            self._offloaded -= o
            self._bytes -= b
        if self._offloaded:
            self._bytes_per_offload = self._bytes / self._offloaded

    def refused(self, reason: str, now: float) -> None:
        if reason not in OUTAGE_REASONS + OVERLOAD_REASONS or now < self._hold_until:
            return
        # A second cut without one answer since the first: nobody is serving at all.
        self._cut(now, reason in OUTAGE_REASONS
                  or (self.cap is not None and not self._answered_since_cut), REFUSED_DECREASE)

    def answered(self, now: float, queued: int = 0, free_credit: int = 1,
                 server_s: float = 0.0, late: bool = False, frames: int = 1) -> None:
        """An answer, with the load hint it came with: the broker's queue and free credit as
        it forwarded it, and the seconds the request spent in its worker. Any request waiting
        at the broker, no credit left, half the deadline gone inside the worker, or the
        answer arriving after its deadline (`late`) means the pool is saturated: one more
        frame a second and deadlines are missed. A late answer still says it is there, and
        its `frames` count in what the server can serve."""
        self._served.append((now, frames))
        self._answers += 1
        self._saturated += (late or queued > 0 or free_credit <= 0
                            or server_s > SATURATED_DEADLINE_SHARE * self.cfg.deadline_s)
        self._answered_since_cut = True
        if self._overloaded(now):   # at once: a queue grows by the hold's length meanwhile
            self._cut(now, False, SATURATED_DECREASE)

    def retarget(self, target_offload: float | None = None,
                 uplink_budget: float | None = None) -> None:
        """A new target mid-stream (the uplink is shared now, or freed); the window stays."""
        self.cfg = ControllerConfig(**{**self.cfg.__dict__, "target_offload": target_offload,
                                       "uplink_budget": uplink_budget}).check()

    # -- what the events decide -------------------------------------------------------------

    def _target_ratio(self, now: float) -> float:
        if self.cfg.target_offload is not None:
            return self.cfg.target_offload
        span = min(self.cfg.rate_window_s, now - self._started)
        if span <= 0 or not self._frames:
            return self.ratio   # no rate measured yet: keep what we had
        frames_per_s = self._frames / span
        return max(self.cfg.floor, min(1.0, self.cfg.uplink_budget
                                       / (frames_per_s * self._bytes_per_offload)))

    def _cut(self, now: float, outage: bool, decrease: float) -> None:
        sending = self.ratio if not self._frames else min(self.ratio,
                                                          self._offloaded / self._frames)
        # What the server could take: the frames it answered over the last second, as a
        # share of the frames seen then (saturated, its throughput is its capacity).
        self._overloaded_at = min(sending, self._served_ratio(now))
        self._resume = max(self.cfg.floor, self._overloaded_at * decrease)
        self.cap = self.cfg.floor if outage else self._resume
        self.state = State.BACKING_OFF
        self._hold_until = now + self.cfg.hold_s
        self._since_review, self._answers, self._saturated = now, 0, 0
        self._answered_since_cut = False

    def _served_ratio(self, now: float) -> float:
        horizon = now - CAPACITY_WINDOW_S
        while self._served and self._served[0][0] < horizon:
            self._served.popleft()
        frames = sum(f for t, f, _, _ in self._sent if t >= horizon)
        served = sum(f for _, f in self._served)
        return served / frames if frames and served >= SATURATED_MIN_ANSWERS else math.inf

    def _overloaded(self, now: float) -> bool:
        """Most answers since the last review say the pool is saturated (outside a hold)."""
        return (now >= self._hold_until and self._answers >= SATURATED_MIN_ANSWERS
                and 2 * self._saturated >= self._answers)

    def _review(self, now: float) -> None:
        """Once per hold: a cap climbs only after a hold whose answers all found room, and
        stops binding at the target."""
        if now < self._since_review + self.cfg.hold_s:
            return
        answers, saturated = self._answers, self._saturated
        self._since_review, self._answers, self._saturated = now, 0, 0
        if self.cap is None or not answers or saturated:
            return          # no evidence the server has room: hold the cap where it is
        target = self._target_ratio(now)
        if self.cap < self._resume:
            self.cap = min(self._resume, 2 * self.cap)
        elif NEAR_OVERLOAD * self._overloaded_at <= self.cap \
                <= self._overloaded_at / NEAR_OVERLOAD:
            self.cap += self.cfg.creep * target / NEAR_OVERLOAD_SLOWDOWN
        else:
            self.cap += self.cfg.creep * target
        self.state = State.RECOVERING
        if self.cap >= target:
            self.cap, self.state = None, State.TRACKING

    def _quantile(self, ratio: float) -> float:
        n = len(self._sorted)
        if n < self.cfg.min_frames:
            return self._trained
        k = round(ratio * n)
        return OFFLOAD_ALL if k >= n else self._sorted[k] if k else 0.0
