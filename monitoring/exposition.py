"""Serving /metrics and the health paths, for one process or for a launcher's children.

    /metrics   Prometheus exposition (merged over the children in multiprocess mode)
    /ready     200 once the process (a launcher: every child it waits for) is ready, else 503;
               what a Kubernetes readiness probe calls
    /healthz   200 while the process runs (a liveness probe)

A launcher binds its port first (`MetricsServer`), then claims its folder of per-process
metric files (`claim_metrics_dir`) and only then spawns children: prometheus-client picks its
storage when it is first imported, and spawned children import it fresh, so they see
PROMETHEUS_MULTIPROC_DIR and write their files there. A launcher refused for a taken port
has therefore touched nothing. Counters of finished children stay in the sum, so totals
survive the processes that made them; `mark_dead` drops a finished child's live gauges.

A folder is a launcher's own while it runs (a lock file holds its pid). It never deletes a
folder it did not create, nor files that are not metric files: a folder that holds anything
else, or that another live launcher holds, is refused with a one-line error.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import tempfile
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.multiprocess import MultiProcessCollector

from monitoring.metrics import READY

__all__ = ["MetricsError", "MetricsServer", "claim_metrics_dir", "multiprocess_registry",
           "readiness", "total", "mark_dead", "MULTIPROC_ENV", "DEFAULT_ADDR", "LOCK_FILE",
           "METRICS_PORTS"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_ADDR = "127.0.0.1"  # metrics stay on loopback unless asked otherwise
# Each command's default port (configs/prometheus.yml scrapes these).
METRICS_PORTS = {"up": 9100, "broker": 9101, "workers": 9102, "edge": 9103}
LOCK_FILE = "splitexit-launcher.pid"
METRIC_FILE_SUFFIX = ".db"  # what prometheus-client writes per process (counter_123.db, ...)


class MetricsError(Exception):
    """A metrics port or folder the user must change; the message says how."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        """No access log: a scrape a second must not fill stderr."""


class MetricsServer:
    """/metrics, /ready and /healthz on one port. The port is bound when this is built, so
    a taken port fails before anything else happens; serving starts with `start`."""

    def __init__(self, port: int, addr: str = DEFAULT_ADDR):
        try:
            self.httpd = make_server(addr, port, self._app, _ThreadingServer,
                                     handler_class=_QuietHandler)
        except OSError as e:
            raise MetricsError(f"cannot serve metrics on {addr}:{port} ({e.strerror}); choose "
                               f"another --metrics-port, or 0 for none") from None
        self.addr, self.port = addr, self.httpd.server_port

    def start(self, registry: CollectorRegistry = REGISTRY,
              ready: Callable[[], bool] = lambda: True) -> "MetricsServer":
        self._ready, self._metrics = ready, make_wsgi_app(registry)
        threading.Thread(target=self.httpd.serve_forever, daemon=True,
                         name="metrics-http").start()
        return self

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path in ("/ready", "/healthz"):
            ok = path == "/healthz" or self._ready()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not ready\n"]
        return self._metrics(environ, start_response)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of a sample over every series whose labels include `labels` (0 if none)."""
    return sum(s.value for family in registry.collect() for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def readiness(registry: CollectorRegistry, expected: dict[str, int]) -> Callable[[], bool]:
    """Ready when `splitexit_ready{role}` reaches the expected count for every role (a
    launcher of n workers: {"worker": n})."""
    def ready() -> bool:
        return all(total(registry, READY, role=role) >= n for role, n in expected.items())
    return ready


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_metrics_dir(path: str | Path | None) -> Path:
    """Make `path` (None: a fresh temporary folder) this launcher's folder of per-process
    metric files and point this process and its future children at it."""
    if path is None:
        folder = Path(tempfile.mkdtemp(prefix="splitexit-metrics-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # ours: made just now
    else:
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise MetricsError(f"--metrics-dir {folder} is a file; give a folder")
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / LOCK_FILE
        if lock.exists():
            try:
                holder = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _pid_alive(holder):
                raise MetricsError(f"--metrics-dir {folder} belongs to a running launcher "
                                   f"(pid {holder}); give another folder")
        foreign = sorted(p.name for p in folder.iterdir()
                         if p.name != LOCK_FILE and not (p.is_file() and p.suffix ==
                                                         METRIC_FILE_SUFFIX))
        if foreign:
            raise MetricsError(f"--metrics-dir {folder} holds files that are not splitexit "
                               f"metric files ({foreign[0]}, ...); give an empty or new folder")
        for stale in folder.glob(f"*{METRIC_FILE_SUFFIX}"):  # a previous run's: they add up
            stale.unlink()
        lock.write_text(f"{os.getpid()}\n")
        atexit.register(lambda: lock.unlink(missing_ok=True))
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


class _StartedFilesCollector(MultiProcessCollector):
    """Reads only metric files that exist in full. prometheus-client creates a child's file
    empty and then sizes it; a collection that lands in between would fail on 0 bytes
    (struct.error), so a child starting up must not break a scrape of its siblings."""

    def collect(self):
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(path) >= 8:   # the 8-byte used-size header is there
                    files.append(path)
            except FileNotFoundError:            # a dead process's live gauge, just removed
                continue
        return self.merge(files, accumulate=True)


def multiprocess_registry(folder: str | Path) -> CollectorRegistry:
    """A registry that reads the children's files in `folder` at every collection."""
    registry = CollectorRegistry()
    _StartedFilesCollector(registry, path=str(folder))
    return registry


def mark_dead(pid: int) -> None:
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
