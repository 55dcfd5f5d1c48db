"""Start and stop groups of processes: a broker, N tail workers, M edge producers.

Processes are spawned, not forked: ZeroMQ contexts and torch thread pools must be created in
the child (one context per process, created after the process starts). Stopping sends
SIGTERM first (workers drain, producers finish), then SIGKILL what did not leave in time.

A child dies with its launcher, however the launcher ends (SIGKILL included): see
`die_with_parent`, which every child runs first. A supervisor that restarts a killed
launcher then finds the ports free, not held by orphans.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time

from monitoring.exposition import HEAD_TIMEOUT_S, mark_dead
from pipeline.errors import UserError

__all__ = ["ProcessGroup", "guarded", "check_exits", "USER_ERROR_EXIT", "stop_on_sigterm",
           "wait_until", "NotReady", "START_TIMEOUT_S", "STOP_TIMEOUT_S", "LAUNCHER_STOP_BOUND_S",
           "die_with_parent"]

USER_ERROR_EXIT = 2
STOP_TIMEOUT_S = 5.0          # a child's time to drain after SIGTERM; then SIGKILL
# A launcher asked to stop (SIGTERM, SIGINT) exits within this, its children gone: they get
# STOP_TIMEOUT_S, then the launcher closes its metrics server (at most 2 x HEAD_TIMEOUT_S
# for a scrape in flight). `edge -n` adds its --deadline-ms (a producer answers what it holds).
LAUNCHER_STOP_BOUND_S = STOP_TIMEOUT_S + 2 * HEAD_TIMEOUT_S
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


PR_SET_PDEATHSIG = 1          # <linux/prctl.h>
ORPHAN_POLL_S = 0.2           # the fallback's period, where there is no PR_SET_PDEATHSIG
# Looked up once, here: a Popen preexec_fn runs between fork and exec, no place for dlopen.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid: int) -> None:
    """Make this process die (SIGKILL) when its parent does, however the parent ends.

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL) asks the kernel to kill us when the *thread*
    that created us exits, so launchers start their children from their main thread, which
    lives as long as they do (ProcessGroup.start is only called there). The parent may have
    died before the prctl ran (we would be re-parented already and never signalled): if our
    parent is no longer `parent_pid`, we exit at once.
    Elsewhere (no prctl): a daemon thread polls os.getppid() every ORPHAN_POLL_S and kills
    this process once it changes, so a child outlives its launcher by at most that.
    Also usable as a subprocess.Popen preexec_fn, `partial(die_with_parent, os.getpid())`
    (Linux only: the fallback's thread would not survive the exec)."""
    if _prctl is not None:
        if _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent_pid:
            os._exit(1)     # the launcher is gone already: nothing to serve, nobody to tell
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(ORPHAN_POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def guarded(target, *args) -> None:
    """Child entry point: dies with its launcher (`die_with_parent`); logs as its launcher
    does (SPLITEXIT_LOG_LEVEL); a user error is one line on stderr and exit status 2."""
    die_with_parent(multiprocessing.parent_process().pid)
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
    """A launcher treats SIGTERM like Ctrl-C: its children drain and it exits cleanly, within
    STOP_TIMEOUT_S (then ProcessGroup.stop kills what is left). SIGINT is handled explicitly
    too: a launcher started as a background job of a script inherits SIGINT *ignored*, and
    Python then leaves it ignored, so `kill -INT` did nothing and a test that stopped `up`
    that way killed it after 20 s, leaving its broker and workers behind."""
    def interrupt(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


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
        """Start `target(*args)` in a spawned child that dies with this process. Call it from
        the launcher's main thread: the child's death signal fires when the thread that
        started it exits (see `die_with_parent`)."""
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
                 registry, broker=None, names: list[str] | None = None,
                 brokers: list | None = None) -> dict:
    """Start the brokers (`broker`, a BrokerConfig, or `brokers`, several) and `workers`
    tail workers, and return once each is ready (a worker: a broker has confirmed it), as
    read from `registry` (the launcher's multiprocess metrics). Returns {name: process}."""
    from monitoring.exposition import readiness
    from workers.broker import run_broker
    from workers.tail_worker import run_worker

    names = names or [f"worker-{i}" for i in range(workers)]
    brokers = brokers or ([broker] if broker is not None else [])
    procs = {}
    for i, b in enumerate(brokers):
        name = "broker" if len(brokers) == 1 else f"broker-{i}"
        procs[name] = group.start(name, run_broker, b)
    for name in names:
        procs[name] = group.start(name, run_worker, str(artifacts), worker, name)
    expected = {"worker": len(names)} | ({"broker": len(brokers)} if brokers else {})
    wait_until(readiness(registry, expected), START_TIMEOUT_S,
               f"{len(names)} workers confirmed by the broker", list(procs.values()))
    return procs
