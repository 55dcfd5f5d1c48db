"""Serving /metrics: one process on its own registry, or a launcher for all its children.

A launcher calls `use_multiprocess_dir` before it spawns anything: prometheus-client picks
its storage when it is first imported, and spawned children import it fresh, so they see the
variable and write per-process files into the directory. The launcher's endpoint merges the
files (`MultiProcessCollector`); `mark_dead` drops a finished child's live gauges. Counters of
finished children stay in the sum, so totals survive the processes that made them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.errors import UserError

__all__ = ["MULTIPROC_ENV", "use_multiprocess_dir", "serve", "mark_dead", "DEFAULT_ADDR"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_ADDR = "127.0.0.1"  # metrics stay on loopback unless asked otherwise


def use_multiprocess_dir(path: str | Path) -> Path:
    """Wipe and create the directory, and point this process and its children at it."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)  # stale files from a previous run would add up
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def serve(port: int, addr: str = DEFAULT_ADDR) -> None:
    """Serve /metrics in a background thread; merged from children in multiprocess mode."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = None
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    try:
        if registry is None:
            start_http_server(port, addr)
        else:
            start_http_server(port, addr, registry=registry)
    except OSError as e:
        raise UserError(f"cannot serve metrics on {addr}:{port} ({e.strerror}); choose "
                        f"another --metrics-port, or 0 for none") from None


def mark_dead(pid: int) -> None:
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
