"""Start and stop groups of processes: a broker, N tail workers, M edge producers.

Processes are spawned, not forked: ZeroMQ contexts and torch thread pools must be created in
the child (one context per process, created after the process starts). Stopping sends
SIGTERM first (workers drain, producers finish), then SIGKILL what did not leave in time.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import signal
import sys
import time

from monitoring.exposition import mark_dead
from pipeline.errors import UserError

__all__ = ["ProcessGroup", "guarded", "check_exits", "USER_ERROR_EXIT", "stop_on_sigterm",
           "wait_until", "NotReady", "START_TIMEOUT_S", "STOP_TIMEOUT_S"]

USER_ERROR_EXIT = 2
STOP_TIMEOUT_S = 5.0
# Spawn, import torch, load a model, connect: seconds on an idle machine, several times that
# on a busy one. Waiting is on readiness; this only bounds a start that will never come.
START_TIMEOUT_S = 180.0


class NotReady(UserError):
    """Something awaited did not happen in time, or a process it depended on exited."""


def _alive(proc) -> bool:
    """multiprocessing.Process or subprocess.Popen."""
    return proc.is_alive() if hasattr(proc, "is_alive") else proc.poll() is None


def wait_until(predicate, timeout_s: float, what: str, procs=()) -> None:
    """Block until `predicate()` is true: the one way anything here waits on an event in
    another process. Fails at once if a process in `procs` exits first, and after timeout_s
    (a bound for a start that will never come, not a pace)."""
    deadline = time.monotonic() + timeout_s
    pause_s = 0.005
    while not predicate():
        dead = [getattr(p, "name", None) or str(p.args) for p in procs if not _alive(p)]
        if dead:
            raise NotReady(f"{', '.join(dead)} exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise NotReady(f"{what}: not seen within {timeout_s:.0f} s")
        time.sleep(pause_s)
        pause_s = min(2 * pause_s, 0.1)


def guarded(target, *args) -> None:
    """Child entry point: logs as its launcher does (SPLITEXIT_LOG_LEVEL); a user error is
    one line on stderr and exit status 2."""
    from pipeline.log import setup

    setup()
    try:
        target(*args)
    except UserError as e:
        print(f"splitexit: error: {e}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
    except KeyboardInterrupt:
        pass


def stop_on_sigterm() -> None:
    """A launcher treats SIGTERM like Ctrl-C: its children drain and it exits cleanly."""
    def interrupt(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def check_exits(procs: list) -> None:
    """After children ended: a user error was already printed by the child, exit the same
    way without repeating it; a crash is a one-line error naming the process. SIGTERM is
    how a launcher stops its children: one that it ended before it could drain (still
    starting) did not fail."""
    codes = {p.name: p.exitcode for p in procs}
    if USER_ERROR_EXIT in codes.values():
        sys.exit(USER_ERROR_EXIT)
    crashed = {name: code for name, code in codes.items()
               if code not in (0, None, -signal.SIGTERM)}
    if crashed:
        raise UserError(f"processes failed: {crashed} (exit codes; see their output above)")


class ProcessGroup:
    def __init__(self):
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.Process] = []

    def start(self, name: str, target, *args) -> multiprocessing.Process:
        proc = self.ctx.Process(target=guarded, args=(target, *args), name=name, daemon=False)
        proc.start()
        self.procs.append(proc)
        return proc

    def alive(self) -> list[multiprocessing.Process]:
        return [p for p in self.procs if p.is_alive()]

    def failed(self) -> list[multiprocessing.Process]:
        return [p for p in self.procs if p.exitcode not in (None, 0, -signal.SIGTERM)]

    def stop(self, procs: list | None = None, timeout_s: float = STOP_TIMEOUT_S) -> None:
        procs = self.procs if procs is None else procs
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: drain
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
            mark_dead(p.pid)  # its live gauges leave the merged /metrics

    def wait(self, procs: list, tick_s: float = 0.2, on_tick=None) -> None:
        """Block until every process in `procs` has exited (woken by their exits), calling
        on_tick at least every tick_s meanwhile."""
        while True:
            alive = [p.sentinel for p in procs if p.is_alive()]
            if not alive:
                return
            if on_tick:
                on_tick()
            multiprocessing.connection.wait(alive, timeout=tick_s if on_tick else None)


def start_server(group: ProcessGroup, artifacts: str, workers: int, worker,
                 registry, broker=None, names: list[str] | None = None) -> dict:
    """Start a broker (if `broker`, a BrokerConfig, is given) and `workers` tail workers, and
    return once each worker is ready (the broker has confirmed it), as read from `registry`
    (the launcher's multiprocess metrics). Returns {name: process}."""
    from monitoring.exposition import readiness
    from workers.broker import run_broker
    from workers.tail_worker import run_worker

    names = names or [f"worker-{i}" for i in range(workers)]
    procs = {}
    if broker is not None:
        procs["broker"] = group.start("broker", run_broker, broker)
    for name in names:
        procs[name] = group.start(name, run_worker, str(artifacts), worker, name)
    expected = {"worker": len(names)} | ({"broker": 1} if broker is not None else {})
    wait_until(readiness(registry, expected), START_TIMEOUT_S,
               f"{len(names)} workers confirmed by the broker", list(procs.values()))
    return procs
