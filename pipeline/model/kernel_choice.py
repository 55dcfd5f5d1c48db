"""Which kernel runs a sparse layer: timed once per machine on first use, then remembered.

Why measure instead of a rule: which kernel wins depends on the CPU (SIMD width, caches),
the torch build, the thread count and the shape, and a rule written on one machine lost on
the next (a native kernel that was 13x faster than nn.Linear where it was written lost to
the PyTorch kernels on an AVX2 machine). So the first call of a shape times every kernel
that can run it for a few steps, side by side, and keeps the fastest.

A choice is remembered in the process and in a JSON file in native.cache_dir(), named by a
hash of what makes timings comparable (CPU model and flags, torch version, how the native
kernel was built, the kernels' and this module's source); the thread count is in each
entry's key. A second process on the same machine reads the choice instead of timing
again. Each choice is logged once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from pipeline.model import ell_native
from pipeline.floor import native

__all__ = ["choose", "time_kernels", "made", "forget", "choices_file"]

log = logging.getLogger(__name__)

ROUNDS = 100        # interleaved samples per kernel, at most (BUDGET_S decides first)
MIN_ROUNDS = 5      # at least: two samples that load spoiled do not decide
SAMPLE_S = 0.0005   # a sample repeats a fast kernel's call to last about this long: short,
                    # so that few samples hold another process's turn on a busy machine
BUDGET_S = 0.25     # after MIN_ROUNDS, stop once timing has taken this long
DROP_SLOWER = 3.0   # after a round, stop timing kernels this many times slower than the best

_lock = threading.Lock()
_memory: dict[str, str] = {}    # key -> kernel, this process
_logged: set[str] = set()
generation = 0                  # bumped by forget(): callers' own memos of choices expire


def time_kernels(run: Callable[[str], None], kernels: list[str]) -> dict[str, float]:
    """Seconds per call of `run(kernel)` for each kernel. A sample repeats a call of tens of
    µs to last SAMPLE_S, so that a timer tick does not decide; rounds interleave the kernels,
    so a burst of load on a shared machine hits them alike, each round in a new order, so
    that none always follows the same kernel (one that flushes the caches or hands memory
    back to the system slows the next); a kernel far behind the best after a round is not
    timed again.
    On one thread the clock is the thread's CPU time, and a kernel's cost its fastest sample:
    time the scheduler gives to other processes is not counted, and what they do to the
    caches only ever adds to a sample, so a choice made on a busy machine (kept for good)
    is the one an idle machine would make.
    On more, it is wall time, and a kernel's cost its median sample: waiting for a thread
    the scheduler holds back is part of a parallel kernel's cost, and on busy cores its
    fastest sample (all its threads ran at once) is its idle time, not what training pays.
    benchmarks/sparse_layer.py reports the same statistics."""
    one = torch.get_num_threads() == 1
    clock, statistic = (time.thread_time, min) if one else (time.perf_counter, statistics.median)
    calls = {}
    for kernel in kernels:
        t = clock()
        run(kernel)  # warm-up: plans, caches, first-touch allocations
        calls[kernel] = max(1, min(100, int(SAMPLE_S / max(clock() - t, 1e-6))))
    samples: dict[str, list[float]] = {kernel: [] for kernel in kernels}
    live = list(kernels)
    order = random.Random(0)  # its own: the global RNG stays untouched
    start = time.perf_counter()
    for round_ in range(ROUNDS):
        for kernel in order.sample(live, len(live)):
            n = calls[kernel]
            t = clock()
            for _ in range(n):
                run(kernel)
            samples[kernel].append((clock() - t) / n)
        fastest = min(statistic(samples[k]) for k in live)
        live = [k for k in live if min(samples[k]) <= DROP_SLOWER * fastest]
        if round_ + 1 >= MIN_ROUNDS and time.perf_counter() - start > BUDGET_S:
            break
    return {kernel: statistic(s) for kernel, s in samples.items()}


def choose(key: str, kernels: list[str], timer: Callable[[], Callable[[str], None]]) -> str:
    """The kernel for `key`: remembered, else read from the cache file, else timed (and
    written there). `kernels` are the candidates; `timer()` makes what is timed: run(kernel),
    one step."""
    kernel = _memory.get(key)
    if kernel in kernels:
        return kernel
    with _lock:
        kernel = _memory.get(key)
        if kernel in kernels:
            return kernel
        entry = _read().get(key)
        if entry and entry.get("kernel") in kernels:
            kernel, how = entry["kernel"], f"chosen earlier on this machine ({choices_file()})"
        else:
            seconds = time_kernels(timer(), kernels)
            kernel = min(kernels, key=seconds.__getitem__)
            how = "timed " + ", ".join(f"{k} {s * 1e6:.0f} µs" for k, s in
                                       sorted(seconds.items(), key=lambda kv: kv[1]))
            _write(key, {"kernel": kernel, "seconds": seconds})
        _memory[key] = kernel
    if key not in _logged:
        _logged.add(key)
        log.info(f"sparse layer {key}: {kernel} kernel ({how})")
    return kernel


def made() -> dict[str, str]:
    """The choices this process has made or read so far: key -> kernel."""
    with _lock:
        return dict(_memory)


def forget() -> None:
    """Drop this process's choices, as a new process would start (the file stays)."""
    global generation
    with _lock:
        _memory.clear()
        _logged.clear()
        generation += 1


def _context() -> str:
    # The kernels' code and how they are timed are part of what a choice was measured on.
    code = b"".join(path.read_bytes() for path in (
        ell_native.SOURCE, Path(__file__), Path(__file__).with_name("sparse.py")))
    return "\n".join([native.cpu_model(), torch.__version__, ell_native.status(),
                      hashlib.sha256(code).hexdigest()])


def choices_file() -> Path:
    """Where this machine's choices are kept (one file per CPU, torch and native kernel)."""
    digest = hashlib.sha256(_context().encode()).hexdigest()[:16]
    return native.cache_dir() / f"kernel-choices-{digest}.json"


def _read() -> dict:
    try:
        data = json.loads(choices_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, unreadable, or half-written by a crash: time again


def _write(key: str, entry: dict) -> None:
    """Merge one entry into the file, replacing it atomically; a read-only cache only costs
    a later process its own timing."""
    path = choices_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read()
        data[key] = entry
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        log.debug(f"cannot keep kernel choices in {path}: {e}")
