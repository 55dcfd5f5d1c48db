"""The server side's runtime settings, and their defaults: declared here once; the CLI and
`splitexit up` read their defaults from these dataclasses."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError
from pipeline.protocol.endpoints import BACKEND, FRONTEND, split_endpoints
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

    @classmethod
    def from_args(cls, args: argparse.Namespace, default_timeout_ms: float | None = None,
                  **given: Any) -> "BrokerConfig":
        """The settings pipeline.options.add_broker_addresses parsed (--queue-timeout-ms
        unset: `default_timeout_ms`, else the default), and `given` for those a command
        decides itself (security); validated."""
        ms = args.queue_timeout_ms if args.queue_timeout_ms is not None else default_timeout_ms
        return cls(frontend=args.frontend, backend=args.backend, max_queue=args.max_queue,
                   queue_timeout_s=cls.queue_timeout_s if ms is None else ms / 1000,
                   max_held_bytes=_megabytes(args.max_held_mb), **given).validate()

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
        self.security.check([self.frontend, self.backend], "broker")
        return self


@dataclass
class WorkerConfig:
    broker: str = BACKEND                  # the brokers' backends, comma-separated
    max_batch: int = 64                    # frames per tail call
    max_wait_ms: float = 0.0               # oldest request's wait before a partial batch runs;
                                           # 0: run as soon as the worker is free
    credit: int = 0                        # requests held at once; 0 = 2 x max_batch
    threads: int = 1                       # torch threads per worker process
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    security: Security = PLAINTEXT_LOOPBACK

    @classmethod
    def from_args(cls, args: argparse.Namespace, **given: Any) -> "WorkerConfig":
        """The settings pipeline.options.add_worker_options parsed, and `given` for those a
        command decides itself (broker, security); validated."""
        return cls(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                   threads=args.threads, **given).validate()

    def validate(self) -> "WorkerConfig":
        """The one check of a worker's settings."""
        if self.max_batch < 1 or self.max_wait_ms < 0:
            raise ConfigError(f"--max-batch {self.max_batch} must be >= 1 and --max-wait-ms "
                              f"{self.max_wait_ms:g} >= 0")
        if self.credit < 0 or self.threads < 1:
            raise ConfigError(f"credit {self.credit} must be >= 0 (0: twice --max-batch) and "
                              f"--threads {self.threads} >= 1")
        _check_heartbeats(self.heartbeat_interval_s, self.heartbeat_liveness)
        try:
            brokers = split_endpoints(self.broker)
        except ValueError as e:
            raise ConfigError(f"--broker {e}") from None
        self.security.check(brokers, "worker")
        return self


def _megabytes(mb: float) -> int:
    if not math.isfinite(mb):
        raise ConfigError(f"--max-held-mb {mb}: a number of MiB, > 0")
    return int(mb * (1 << 20))


def _check_heartbeats(interval_s: float, liveness: int) -> None:
    if not interval_s > 0 or liveness < 1:
        raise ConfigError(f"heartbeats every {interval_s:g} s, {liveness} missed before a peer "
                          f"is dead: the interval must be positive and liveness at least 1")
