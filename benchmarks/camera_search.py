"""The capacity benchmark's table 3: the most 30-fps cameras our broker and its tail workers
serve with every request answered and the hop's p99 within the budget. Each step paces one
camera count's requests from a fresh DEALER and waits until the servers are idle again; the
search doubles, then bisects, and one uplink's steps alternate with the other's so that a
machine getting busier or quieter weighs on both alike."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from benchmarks.hop_clients import answer_of, dealer
from workers.config import BrokerConfig

CAMERA_FPS = 30.0
# After a step's last request: what is not answered by then never will be (the broker answers
# NO_WORKER for anything older than its queue timeout).
DRAIN_S = BrokerConfig.queue_timeout_s + 1.0


@dataclass
class Step:
    cameras: int
    rate: float            # requests/s sent
    sent: int
    replies: int           # answered with a prediction
    p50: float             # ms; refused or unanswered requests count as infinitely late
    p99: float
    ok: bool               # every request answered, p99 within the budget


def paced(address: str, requests: list, cameras: int, args) -> Step:
    """Send cameras x fps x offload requests/s for `seconds` from a fresh DEALER, then wait
    until every one is answered or DRAIN_S passed: each step starts with the servers idle."""
    rate = cameras * CAMERA_FPS * args.offload
    n = max(1, int(rate * args.seconds))
    sent_at = np.full(len(requests) + 1, np.nan)   # by msg_id (1..), while unanswered
    rtts: list[float] = []
    replies = waiting = 0
    sock = dealer(address)

    def receive() -> None:
        nonlocal replies, waiting
        msg_id, reply = answer_of(sock)
        if math.isnan(sent_at[msg_id]):
            return   # a second answer to it counts for nothing
        if reply:
            rtts.append(time.perf_counter() - sent_at[msg_id])
            replies += 1
        sent_at[msg_id] = np.nan
        waiting -= 1

    try:
        start = time.perf_counter()
        for i in range(n):
            due = start + i / rate
            while (now := time.perf_counter()) < due:
                if sock.poll(max(0.0, due - now) * 1000):
                    while sock.poll(0):
                        receive()
            slot = i % len(requests)
            waiting += math.isnan(sent_at[slot + 1])   # else its id's last use goes unanswered
            sent_at[slot + 1] = time.perf_counter()
            sock.send_multipart(requests[slot])
        end = time.perf_counter() + DRAIN_S
        while waiting and (left := end - time.perf_counter()) > 0:
            if sock.poll(left * 1000):
                receive()
    finally:
        sock.close()
    late = np.array(rtts + [math.inf] * (n - len(rtts))) * 1000
    p50, p99 = (float(np.percentile(late, q, method="higher")) for q in (50, 99))  # inf, not nan
    return Step(cameras, rate, n, replies, p50, p99, replies == n and p99 <= args.budget_ms)


class Search:
    """The most cameras that hold the budget: double from the start until a count fails (or
    the maximum held), halve while nothing has held, then bisect between the most that held
    and the fewest that failed until they are within `resolution` of each other. A count
    fails only when all its `tries` failed: on a shared machine one step's p99 can be
    another process's burst, not the servers' limit."""

    def __init__(self, start: int, maximum: int, resolution: float, tries: int):
        self.maximum, self.resolution, self.tries = maximum, resolution, tries
        self.held, self.failed = 0, None
        self.next: int | None = start
        self.steps: list[Step] = []

    def record(self, step: Step) -> None:
        self.steps.append(step)
        n = step.cameras
        if not step.ok and sum(s.cameras == n for s in self.steps) < self.tries:
            return   # self.next stays n: try it again
        if step.ok:
            self.held = max(self.held, n)
        else:
            self.failed = n if self.failed is None else min(self.failed, n)
        if self.failed is None:
            self.next = None if n >= self.maximum else min(2 * n, self.maximum)
        elif self.held == 0:
            self.next = n // 2 or None
        elif self.failed - self.held <= max(1, self.resolution * self.held):
            self.next = None
        else:
            self.next = (self.held + self.failed) // 2

    @property
    def at_capacity(self) -> Step | None:
        """The step at the capacity (the last one run at that count)."""
        return next((s for s in reversed(self.steps) if s.cameras == self.held and s.ok), None)


def cameras(address: str, links: list, args) -> list[Search]:
    """One search per uplink (capacity.Uplink), a step of each in turns (who goes first
    alternates), so that a machine getting busier or quieter weighs on both alike."""
    searches = [Search(args.start_cameras, args.max_cameras, args.resolution, args.tries)
                for _ in links]
    turn = 0
    while any(s.next for s in searches):
        order = list(zip(links, searches))
        for link, search in order[::-1] if turn % 2 else order:
            if search.next:
                step = paced(address, link.requests, search.next, args)
                search.record(step)
                print(f"I: {link.name}: {step.cameras} cameras ({step.rate:.0f} requests/s): "
                      f"{step.replies}/{step.sent} answered, p50 {step.p50:.2f} ms, "
                      f"p99 {step.p99:.2f} ms", flush=True)
        turn += 1
    return searches
