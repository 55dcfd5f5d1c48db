"""The server side's runtime settings, and their defaults: declared here once; the CLI and
`splitexit up` read their defaults from these dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.protocol.endpoints import BACKEND, FRONTEND
from pipeline.protocol.security import PLAINTEXT_LOOPBACK, Security
from pipeline.protocol.timing import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS

__all__ = ["BrokerConfig", "WorkerConfig", "MAX_CREDIT", "START_CREDIT"]

# A READY may offer up to 65 536; the broker holds a worker to this many requests at once, so
# one peer cannot attract the pool's whole traffic (a worker's own default is 2 x max_batch).
MAX_CREDIT = 1024
# A worker that has answered nothing yet is given at most this many requests; each answer it
# returns lets it hold one more, up to its credit (TCP's slow start): a peer that heartbeats
# but never answers pins little and attracts little.
START_CREDIT = 8


@dataclass
class BrokerConfig:
    frontend: str = FRONTEND                 # edges connect here
    backend: str = BACKEND                   # workers connect here
    max_queue: int = 1024                    # queued requests before BUSY
    queue_timeout_s: float = 2.0             # older than this (queued, or held by a worker:
                                             # the deadline stays across redelivery): NO_WORKER
    max_held_bytes: int = 64 << 20           # request bytes held, queued or in workers' hands,
                                             # before BUSY (a legal request is at most ~4 MiB)
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    security: Security = PLAINTEXT_LOOPBACK

    def validate(self) -> "BrokerConfig":
        """The one check of a broker's settings (the CLI and `up` check nothing of their own)."""
        if self.max_queue < 1:
            raise ConfigError(f"--max-queue {self.max_queue} must be at least 1")
        if not self.queue_timeout_s > 0:
            raise ConfigError(f"--queue-timeout-ms {self.queue_timeout_s * 1000:g} must be "
                              f"positive")
        if not self.max_held_bytes > 0:
            raise ConfigError(f"--max-held-mb {self.max_held_bytes / (1 << 20):g} must be "
                              f"positive")
        _check_heartbeats(self.heartbeat_interval_s, self.heartbeat_liveness)
        return self


@dataclass
class WorkerConfig:
    broker: str = BACKEND                  # the broker's backend
    max_batch: int = 64                    # frames per tail call
    max_wait_ms: float = 0.0               # oldest request's wait before a partial batch runs;
                                           # 0: run as soon as the worker is free
    credit: int = 0                        # requests held at once; 0 = 2 x max_batch
    threads: int = 1                       # torch threads per worker process
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    security: Security = PLAINTEXT_LOOPBACK

    def validate(self) -> "WorkerConfig":
        """The one check of a worker's settings."""
        if self.max_batch < 1 or self.max_wait_ms < 0:
            raise ConfigError(f"--max-batch {self.max_batch} must be >= 1 and --max-wait-ms "
                              f"{self.max_wait_ms:g} >= 0")
        if self.credit < 0 or self.threads < 1:
            raise ConfigError(f"credit {self.credit} must be >= 0 (0: twice --max-batch) and "
                              f"--threads {self.threads} >= 1")
        _check_heartbeats(self.heartbeat_interval_s, self.heartbeat_liveness)
        return self


def _check_heartbeats(interval_s: float, liveness: int) -> None:
    if not interval_s > 0 or liveness < 1:
        raise ConfigError(f"heartbeats every {interval_s:g} s, {liveness} missed before a peer "
                          f"is dead: the interval must be positive and liveness at least 1")
