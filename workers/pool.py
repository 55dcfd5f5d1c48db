"""Start and stop groups of processes: a broker, N tail workers, M edge producers.

Processes are spawned, not forked: ZeroMQ contexts and torch thread pools must be created in
the child (one context per process, created after the process starts). Stopping sends
SIGTERM first (workers drain, producers finish), then SIGKILL what did not leave in time.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import time

from monitoring.exposition import mark_dead
from pipeline.errors import UserError

__all__ = ["ProcessGroup", "guarded", "check_exits", "USER_ERROR_EXIT", "stop_on_sigterm"]

USER_ERROR_EXIT = 2

STOP_TIMEOUT_S = 5.0


def guarded(target, *args) -> None:
    """Child entry point: a user error is one line on stderr and exit status 2."""
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
    way without repeating it; a crash is a one-line error naming the process."""
    codes = {p.name: p.exitcode for p in procs}
    if USER_ERROR_EXIT in codes.values():
        sys.exit(USER_ERROR_EXIT)
    crashed = {name: code for name, code in codes.items() if code not in (0, None)}
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

    def wait(self, procs: list, poll_s: float = 0.2, on_tick=None) -> None:
        """Block until every process in `procs` has exited, calling on_tick between polls."""
        while any(p.is_alive() for p in procs):
            if on_tick:
                on_tick()
            time.sleep(poll_s)
