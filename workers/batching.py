"""A worker's dynamic batching as a pure object: which requests run together, and when.

Triton's knobs: a batch runs when it holds `max_batch` frames or its oldest request has
waited `max_wait_s`, whichever comes first. With max_wait_s = 0 (the default) a batch runs
as soon as the worker is free, and what arrives while the tail runs forms the next batch:
batches grow with load and an idle worker adds no wait. A request (one edge message, which
may pack several frames) is never split across batches.
"""

from __future__ import annotations

import collections
from typing import Any

__all__ = ["Batcher"]


class Batcher:
    def __init__(self, max_batch: int, max_wait_s: float):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._pending: collections.deque = collections.deque()   # (item, frames, arrival)
        self.frames = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, item: Any, frames: int, now: float) -> None:
        self._pending.append((item, frames, now))
        self.frames += frames

    def next_due(self) -> float | None:
        """When the oldest request's wait runs out (None: nothing pending)."""
        return self._pending[0][2] + self.max_wait_s if self._pending else None

    def due(self, now: float, draining: bool = False) -> bool:
        """Run now: full, waited long enough, or the worker is leaving."""
        if not self._pending:
            return False
        return draining or self.frames >= self.max_batch or now >= self.next_due()

    def take(self) -> list[tuple[Any, float]]:
        """The oldest requests that fit in max_batch frames (always at least one), with
        their arrival times."""
        taken, frames = [], 0
        while self._pending and (not taken or frames + self._pending[0][1] <= self.max_batch):
            item, n, arrival = self._pending.popleft()
            taken.append((item, arrival))
            frames += n
        self.frames -= frames
        return taken
