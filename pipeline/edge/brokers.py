"""Which broker an edge sends its next request to, when it knows several: a pure object
(no sockets; `now` comes in, monotonic seconds), fed what the links and the answers say.

The pattern is the ZeroMQ Guide's Freelance (chapter 4, "brokerless reliability", model
three) with Majordomo's brokers as the servers: brokers know nothing of each other, every
worker serves every broker, and each edge keeps its own view of which brokers are alive.

    preference       every edge ranks the brokers by a hash of (its id, the endpoint)
                     (rendezvous hashing): the same list in any order gives one edge the same
                     ranking, different edges different ones, so load spreads evenly, and the
                     edges of a broker that dies spread evenly over the rest
    pick(now)        the first broker in that ranking that is live, or whose probe is due
                     (then one request tests it); if none, the first linked one, else the
                     first (its frames fall back by their deadline, as with one broker)
    link_up / link_down      the socket's handshake succeeded / its connection dropped
    answered(i)      any answer or refusal that says the broker works: it is live
    failed(i, now)   a request to it expired, or it had no worker: after `strikes` in a row
                     it is down, and probed every `retry_s` until one is answered

A broker that comes back (its link up again after a drop) is on probation: a restarted broker
takes edges before its workers have rejoined it, so it is used again once a probe is answered,
not at the handshake. At the first handshake there is nothing to distrust: it is live.

A request in flight to a broker that goes down keeps its deadline: its frames fall back as
they would with one broker; only new requests go elsewhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Brokers", "STRIKES", "RETRY_S"]

STRIKES = 3        # requests in a row that found no answer: the broker is down
RETRY_S = 1.0      # a broker down by strikes (its link still up) is probed this often


@dataclass
class _Broker:
    endpoint: str
    linked: bool = False          # the handshake succeeded, the connection stands
    strikes: int = 0              # requests in a row without an answer
    down_since: float | None = None   # down by strikes (the link may still stand)
    probe_at: float = 0.0         # when a down broker may get one request to test it
    ever_linked: bool = False


class Brokers:
    def __init__(self, endpoints: Sequence[str], edge_id: str, strikes: int = STRIKES,
                 retry_s: float = RETRY_S):
        if not endpoints:
            raise ValueError("an edge needs at least one broker")
        if len(set(endpoints)) != len(endpoints):
            raise ValueError(f"a broker is listed twice: {', '.join(endpoints)}")
        if strikes < 1 or retry_s <= 0:
            raise ValueError(f"strikes {strikes} must be >= 1 and retry_s {retry_s} > 0")
        self.strikes, self.retry_s = strikes, retry_s
        self.brokers = [_Broker(e) for e in endpoints]
        self.order = sorted(range(len(endpoints)),
                            key=lambda i: hashlib.blake2b(f"{edge_id}\0{endpoints[i]}"
                                                          .encode(), digest_size=8).digest())

    def __len__(self) -> int:
        return len(self.brokers)

    def endpoint(self, i: int) -> str:
        return self.brokers[i].endpoint

    def live(self, i: int) -> bool:
        """Linked, and not down by strikes. (A broker never linked yet is not live: the
        first requests go to it anyway while no other is, see `pick`.)"""
        b = self.brokers[i]
        return b.linked and b.down_since is None

    def pick(self, now: float) -> int:
        """The broker for the next request: the preferred one that is live, unless a more
        preferred one is due a probe."""
        for i in self.order:
            b = self.brokers[i]
            if self.live(i):
                return i
            if b.linked and now >= b.probe_at:   # down, link up: this request tests it
                b.probe_at = now + self.retry_s
                return i
        linked = [i for i in self.order if self.brokers[i].linked]
        return linked[0] if linked else self.order[0]

    def link_up(self, i: int, now: float) -> None:
        b = self.brokers[i]
        b.linked = True
        if b.ever_linked:   # a return: on probation until a probe is answered
            b.down_since, b.probe_at = b.down_since or now, now
        b.ever_linked = True

    def link_down(self, i: int) -> None:
        self.brokers[i].linked = False

    def answered(self, i: int) -> None:
        b = self.brokers[i]
        b.strikes, b.down_since = 0, None

    def failed(self, i: int, now: float) -> None:
        b = self.brokers[i]
        b.strikes += 1
        if b.strikes >= self.strikes and b.down_since is None:
            b.down_since, b.probe_at = now, now + self.retry_s
