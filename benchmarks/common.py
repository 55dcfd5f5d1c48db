"""What the runtime benchmarks share: free loopback ports, a broker with N workers, results."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from monitoring.exposition import claim_metrics_dir, multiprocess_registry
from workers.config import BrokerConfig, WorkerConfig
from workers.pool import ProcessGroup, start_server


# The recommended default as it was before the bandwidth work (issue #12): a dense 400-100-10
# tail, float features on the uplink, 30 % offloaded. Benchmarks that searched from it, or
# compare against it, start from configs/default.toml with these overrides.
DEFAULT_BEFORE_BANDWIDTH = ["model.widths=[800, 400, 100, 10]", "model.fan_out=[2, 100, 10]",
                            "model.uplink_bits=0", "train.rate_weight=0.0",
                            "calibrate.target_offload=0.3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_registry = None


def metrics():
    """The benchmark's processes write their metrics to a temporary folder of its own, as
    under a launcher; this registry reads them (readiness, counts)."""
    global _registry
    if _registry is None:
        _registry = multiprocess_registry(claim_metrics_dir(None))
    return _registry


def start_pool(group: ProcessGroup, artifacts, workers: int,
               max_wait_ms: float = WorkerConfig.max_wait_ms):
    """A broker and `workers` tail workers (w0, w1, ...) on fresh loopback ports, returned
    once the broker has confirmed every worker. Returns (frontend, backend, {name: process})."""
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    procs = start_server(group, artifacts, workers, WorkerConfig(back, 64, max_wait_ms),
                         metrics(), broker=BrokerConfig(front, back),
                         names=[f"w{i}" for i in range(workers)])
    return front, back, procs


def read_jsonl(*paths: Path) -> list[dict]:
    return [json.loads(line) for path in paths for line in Path(path).read_text().splitlines()]
