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

import asyncio
import atexit
import os
import re
import shutil
import socket
import tempfile
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

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
# The HTTP server's bounds: a request head must arrive whole within HEAD_TIMEOUT_S and
# HEAD_BYTES (a scrape's is ~200 bytes); at most MAX_CONNECTIONS wait for theirs at once;
# SCRAPE_THREADS build answers (a collection is milliseconds, Prometheus scrapes one at a time).
HEAD_TIMEOUT_S = 5.0
HEAD_BYTES = 8192
MAX_CONNECTIONS = 64
SCRAPE_THREADS = 2
# What prometheus-client names the file each process writes (values.py: TYPE_PID.db, a
# gauge's TYPE being gauge_MODE): a folder's other files, a user's inventory.db included,
# are never read or deleted.
METRIC_FILE = re.compile(r"(counter|histogram|summary|gauge_[a-z]+)_\d+\.db")


def is_metric_file(path: Path) -> bool:
    return path.is_file() and METRIC_FILE.fullmatch(path.name) is not None


class MetricsError(Exception):
    """A metrics port or folder the user must change; the message says how."""


class MetricsServer:
    """/metrics, /ready and /healthz on one port. The port is bound when this is built, so
    a taken port fails before anything else happens; serving starts with `start`.

    One asyncio loop in one thread holds every connection until its request head is in;
    only then does a small pool of SCRAPE_THREADS build the answer. A peer that connects
    and sends nothing, or a byte at a time, costs a socket and a coroutine, never a thread,
    and is closed after HEAD_TIMEOUT_S; at most MAX_CONNECTIONS wait for their head at once,
    the longest waiting one closed to make room, so a scraper that asks at once is served
    while others stall."""

    def __init__(self, port: int, addr: str = DEFAULT_ADDR):
        try:
            self._sock = socket.create_server(
                (addr, port), family=socket.AF_INET6 if ":" in addr else socket.AF_INET)
        except OSError as e:
            raise MetricsError(f"cannot serve metrics on {addr}:{port} ({e.strerror}); choose "
                               f"another --metrics-port, or 0 for none") from None
        self.addr, self.port = addr, self._sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._pool = ThreadPoolExecutor(SCRAPE_THREADS, thread_name_prefix="metrics-scrape")
        self._waiting: dict[asyncio.Task, None] = {}   # reading their head, oldest first
        self._thread: threading.Thread | None = None

    def start(self, registry: CollectorRegistry = REGISTRY,
              ready: Callable[[], bool] = lambda: True) -> "MetricsServer":
        self._ready, self._metrics = ready, make_wsgi_app(registry)
        serving = asyncio.run_coroutine_threadsafe(asyncio.start_server(
            self._connection, sock=self._sock, limit=HEAD_BYTES), self._loop)
        # in its own thread, so that a caller with an asyncio loop of its own may start it
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="metrics-http")
        self._thread.start()
        self._serving = serving.result()
        return self

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._waiting) >= MAX_CONNECTIONS:
            next(iter(self._waiting)).cancel()          # the one waiting longest
        self._waiting[task] = None
        try:
            try:
                async with asyncio.timeout(HEAD_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
            finally:
                self._waiting.pop(task, None)
            answer = await self._loop.run_in_executor(self._pool, self._answer, head)
            writer.write(answer)
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                await writer.drain()
        except (TimeoutError, asyncio.CancelledError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, ConnectionError):
            pass                                        # a stalled or vanished peer
        finally:
            writer.transport.abort()

    def _answer(self, head: bytes) -> bytes:
        """One HTTP/1.1 response (Connection: close) to a request head, via the WSGI apps."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        method, target, _ = parts
        fields = dict(line.partition(":")[::2] for line in lines[1:] if ":" in line)
        fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
        path, _, query = target.partition("?")
        environ = {"REQUEST_METHOD": method, "PATH_INFO": urllib.parse.unquote(path),
                   "QUERY_STRING": query, "HTTP_ACCEPT": fields.get("accept", ""),
                   "HTTP_ACCEPT_ENCODING": fields.get("accept-encoding", "")}
        reply: list = []
        try:
            body = b"".join(self._app(environ, lambda status, headers: reply.extend(
                (status, headers))))
            status, headers = reply
        except Exception as e:   # a failing collector must not take the server down
            status, headers = "500 Internal Server Error", [("Content-Type", "text/plain")]
            body = f"collection failed: {type(e).__name__}: {e}\n".encode()
        text = "".join(f"{k}: {v}\r\n" for k, v in headers if k.lower() != "content-length")
        return (f"HTTP/1.1 {status}\r\n{text}Content-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode("latin-1") + \
            (b"" if method == "HEAD" else body)

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path in ("/ready", "/healthz"):
            ok = path == "/healthz" or self._ready()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not ready\n"]
        return self._metrics(environ, start_response)

    def close(self) -> None:
        if self._thread is not None:
            async def stop() -> None:
                self._serving.close()
                for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                    task.cancel()
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(HEAD_TIMEOUT_S)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(HEAD_TIMEOUT_S)
        if not self._loop.is_running():
            self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sock.close()


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
        files = list(folder.iterdir())
        foreign = sorted(p.name for p in files if p.name != LOCK_FILE and not is_metric_file(p))
        if foreign:
            raise MetricsError(f"--metrics-dir {folder} holds files that are not splitexit "
                               f"metric files ({foreign[0]}, ...); give an empty or new folder")
        for stale in files:  # a previous run's metric files: they would add up
            if stale.name != LOCK_FILE:
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
        for entry in os.scandir(self._path):
            if METRIC_FILE.fullmatch(entry.name) is None:
                continue
            try:
                if entry.stat().st_size >= 8:   # the 8-byte used-size header is there
                    files.append(entry.path)
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
