"""What the runtime benchmarks share: free loopback ports, a broker with N workers, results."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from pipeline.broker import BrokerConfig, run_broker
from workers.pool import ProcessGroup
from workers.tail_worker import WorkerConfig, run_worker

WORKER_START_S = 2.5  # spawn + torch import + READY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pool(group: ProcessGroup, artifacts, workers: int, max_wait_ms: float = 2.0):
    """A broker and `workers` tail workers (w0, w1, ...) on fresh loopback ports, ready.
    Returns (frontend, backend, {name: process})."""
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    procs = {"broker": group.start("broker", run_broker, BrokerConfig(front, back))}
    for i in range(workers):
        procs[f"w{i}"] = group.start(f"w{i}", run_worker, str(artifacts),
                                     WorkerConfig(back, 64, max_wait_ms), f"w{i}")
    time.sleep(WORKER_START_S)
    return front, back, procs


def read_jsonl(*paths: Path) -> list[dict]:
    return [json.loads(line) for path in paths for line in Path(path).read_text().splitlines()]
