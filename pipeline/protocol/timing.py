"""The protocol's clock: heartbeats, liveness and reconnect back-off, in one place.

Broker and workers heartbeat each other every HEARTBEAT_INTERVAL_S; a peer that stays silent
for HEARTBEAT_LIVENESS intervals is declared dead (zguide's Paranoid Pirate rule). Any
traffic counts as a heartbeat. The values are the same on both sides because both import
them from here (the ppqueue/ppworker trap: two copies drift).

Every duration carries its unit in its name and is in seconds; conversion to milliseconds
happens once, at the `poll` call.
"""

from __future__ import annotations

__all__ = ["HEARTBEAT_INTERVAL_S", "HEARTBEAT_LIVENESS", "DRAIN_GRACE_S", "Backoff",
           "backoff_delays"]

HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_LIVENESS = 4          # silent intervals before a peer is declared dead (2 s)
DRAIN_GRACE_S = 0.5             # a draining worker still answers what arrives this long
RECONNECT_START_S = 0.25        # a worker's first wait before reconnecting; doubles per try
RECONNECT_MAX_S = 4.0


def backoff_delays(attempts: int, start_s: float, max_s: float) -> list[float]:
    """Waits before each retry: doubling, capped, so a dead peer is not hammered and a brief
    outage is not waited out for long."""
    return [min(start_s * 2 ** i, max_s) for i in range(attempts)]


class Backoff:
    """An unbounded doubling back-off: `next()` is the wait before this retry, `reset()`
    after any sign of life."""

    def __init__(self, start_s: float = RECONNECT_START_S, max_s: float = RECONNECT_MAX_S):
        self.start_s, self.max_s = start_s, max_s
        self._wait_s = start_s

    def next(self) -> float:
        wait_s = self._wait_s
        self._wait_s = min(2 * self._wait_s, self.max_s)
        return wait_s

    def reset(self) -> None:
        self._wait_s = self.start_s
