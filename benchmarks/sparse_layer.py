"""SparseLinear against nn.Linear and against masked dense (what the paper's code does).

Prints, per shape, thread count and batch: the time of forward and of a training step
(forward + backward; see `measure` for which statistic), the speedup over nn.Linear, and the
ideal 1/density next to it.
"SparseLinear (auto: k)" is what ships: the kernel k that SparseLinear chose by timing
(pipeline/model/kernel_choice.py); the "kernel=..." rows force each kernel it could choose
from. "vs best" is the fastest kernel row's time over this row's time, in the same run (the
goal: auto >= 0.9x at every shape and batch); the summary line gives its minimum.

    python -m benchmarks.sparse_layer                # all shapes, 1 and 2 threads
    python -m benchmarks.sparse_layer --only layers --threads 1 --quick
    python -m benchmarks.sparse_layer --fresh ...    # choose again, ignoring earlier choices
    python -m benchmarks.sparse_layer --threads 1 --cpu-time ...   # busy machine: CPU time
    python -m benchmarks.sparse_layer --tiny     # the paper's shapes, 1 thread, brief timings
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from typing import Callable

import pipeline  # noqa: F401  (before torch: it sets OpenMP's wait policy, as the CLI does)
import torch
from torch import nn

from benchmarks import add_tiny, apply_tiny
from pipeline.model.config import load_config
from pipeline.model.split_model import Head
from pipeline.model.sparse import SparseLinear

# (name, N_in, N_out, fan_out): the paper's three junctions and a large 5%-dense one.
SHAPES = [
    ("paper L1 800->40", 800, 40, 2),
    ("paper L2 40->40", 40, 40, 9),
    ("paper L3 40->10", 40, 10, 10 - 1),
    ("large 2048^2 @5%", 2048, 2048, 102),
]
BATCHES = (1, 256)


class MaskedDense(nn.Module):
    """Dense weight times a fixed 0/1 mask: sparse in value only, dense in storage and time."""

    def __init__(self, layer: SparseLinear):
        super().__init__()
        self.weight = nn.Parameter(layer.dense_weight())
        self.register_buffer("mask", (self.weight != 0).float())
        self.bias = nn.Parameter(layer.bias.detach().clone())

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


CLOCK = time.perf_counter  # --cpu-time: time.thread_time
SAMPLE_S = 0.0005  # a sample repeats a fast call to last about this long (as kernel_choice)


def calls(module: nn.Module, kernel: str | None, batch: int, n_in: int):
    """(forward, training step) of a module, with `kernel` forced on a SparseLinear."""
    x = torch.randn(batch, n_in)
    xg = x.clone().requires_grad_(True)
    sparse = isinstance(module, SparseLinear)

    def forward():
        if sparse:
            module.force = kernel
        with torch.inference_mode():
            module(x)

    def train_step():
        if sparse:
            module.force = kernel
        module.zero_grad(set_to_none=True)
        module(xg).sum().backward()

    return forward, train_step


def measure(rows: dict[tuple, Callable[[], None]], budget_s: float,
            min_rounds: int) -> dict[tuple, float]:
    """Seconds per call of each row. Rounds interleave the rows sample by sample (a sample
    repeats a fast call to last SAMPLE_S) until min_rounds and budget_s are both reached, so
    load on a shared machine that comes and goes hits every row alike; each round runs them
    in a new order, so that no row always follows the same one (a row that flushes the caches
    or hands memory back to the system slows the next: a 2048x2048 masked dense step before
    it made the native forward 1.7x slower). As in the kernel choice (kernel_choice.py), a
    row's time on one thread is its fastest sample (another process's turn, or the caches it
    left cold, are not the row's cost), on more its median (on busy cores a multi-threaded
    row's fastest sample is its idle time; the median is what a training pays)."""
    statistic = min if torch.get_num_threads() == 1 else statistics.median
    reps = {}
    for name, fn in rows.items():
        fn()  # untimed: plans, first-touch allocations, caches flushed by the last row
        t = CLOCK()
        fn()
        reps[name] = max(1, min(1000, int(SAMPLE_S / max(CLOCK() - t, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in rows}
    order = random.Random(0)
    start, round_ = time.perf_counter(), 0
    while round_ < min_rounds or time.perf_counter() - start < budget_s:
        for name in order.sample(list(rows), len(rows)):
            fn, n = rows[name], reps[name]
            t = CLOCK()
            for _ in range(n):
                fn()
            samples[name].append((CLOCK() - t) / n)
        round_ += 1
    return {name: statistic(s) for name, s in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quick", action="store_true", help="shorter timing runs (noisier)")
    ap.add_argument("--only", choices=["layers", "heads"], help="run one of the two tables")
    ap.add_argument("--cpu-time", action="store_true",
                    help="with --threads 1: time the thread's CPU time, not wall time (steadier "
                         "on a shared machine: time given to other processes is not counted)")
    ap.add_argument("--fresh", action="store_true",
                    help="time the kernel choices again in an empty cache (rebuilds the kernel)")
    add_tiny(ap)
    args = ap.parse_args()
    apply_tiny(ap, args, threads=[1])
    if args.cpu_time:
        if args.threads != [1]:
            ap.error("--cpu-time needs --threads 1: a parallel kernel's cost is its wall time")
        global CLOCK
        CLOCK = time.thread_time
    if args.fresh:
        os.environ["SPLITEXIT_CACHE"] = tempfile.mkdtemp(prefix="splitexit-bench-")
    budget_s, min_rounds = (3.0, 15) if args.quick else (8.0, 25)
    if args.tiny:
        budget_s, min_rounds = 0.0, 1
    torch.manual_seed(0)

    print(f"torch {torch.__version__}; {'CPU' if args.cpu_time else 'wall'} time, "
          f"interleaved samples ({budget_s:.0f} s and at least {min_rounds} rounds a cell), "
          f"the fastest on 1 thread, the median on more; "
          f"speedup = nn.Linear time / this time; vs best = fastest kernel row / this row")
    header = ("| shape | thr | batch | impl | fwd µs | fwd speedup | fwd vs best | step µs "
              "| step speedup | step vs best | ideal 1/ρ |")
    print(header)
    print("|---" * 11 + "|")
    worst, wrong = [], []  # the auto row, and the forced row of the kernel it chose
    shapes = [] if args.only == "heads" else SHAPES[:3] if args.tiny else SHAPES
    for name, n_in, n_out, fan_out in shapes:
        layer = SparseLinear(n_in, n_out, fan_out, seed=0)
        dense = nn.Linear(n_in, n_out)
        masked = MaskedDense(layer)
        ideal = n_in / layer.fan_in
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in BATCHES:
                # What ships: the choice is made (or read) first, outside the timing.
                choice = prime(layer, batch, n_in)
                impls = {"nn.Linear": (dense, None), "masked dense": (masked, None),
                         f"SparseLinear (auto: {choice[0]} / {choice[1]})": (layer, None)}
                impls.update((f"kernel={k}", (layer, k))
                             for k in layer.candidates(batch, training=True))
                rows = {}
                for impl, (module, kernel) in impls.items():
                    rows[impl, 0], rows[impl, 1] = calls(module, kernel, batch, n_in)
                seconds = measure(rows, budget_s, min_rounds)
                layer.force = None
                times = {impl: (seconds[impl, 0], seconds[impl, 1]) for impl in impls}
                best = [min(t[i] for k, t in times.items() if k.startswith("kernel="))
                        for i in (0, 1)]
                base_f, base_s = times["nn.Linear"]
                for impl, (f, s) in times.items():
                    print(f"| {name} | {threads} | {batch} | {impl} | {f * 1e6:.1f} | "
                          f"{base_f / f:.2f}x | {best[0] / f:.2f}x | {s * 1e6:.1f} | "
                          f"{base_s / s:.2f}x | {best[1] / s:.2f}x | {ideal:.1f}x |")
                    if impl.startswith("SparseLinear"):
                        worst.append((min(best[0] / f, best[1] / s), name, threads, batch))
                chosen = [times[f"kernel={k}"] for k in choice]
                wrong.append((min(best[0] / chosen[0][0], best[1] / chosen[1][1]), name,
                               threads, batch))
    for what, ratios in (("automatic choice (its own row)", worst),
                         ("chosen kernel's forced row", wrong)):
        if ratios:
            ratio, name, threads, batch = min(ratios)
            print(f"{what} vs the best kernel of this run: worst {ratio:.2f}x ({name}, "
                  f"{threads} thread(s), batch {batch}); goal >= 0.90x")
    if args.only != "layers":
        print()
        compare_heads(args.threads, budget_s, min_rounds)


def prime(layer: SparseLinear, batch: int, n_in: int) -> tuple[str, str]:
    """Make (or read) the layer's kernel choices for this batch; (forward, step) kernels."""
    x = torch.randn(batch, n_in)
    with torch.inference_mode():
        layer(x)
    layer(x.requires_grad_()).sum().backward()
    return layer.kernel_for(batch, False), layer.kernel_for(batch, True)


def compare_heads(threads_list, budget_s: float, min_rounds: int) -> None:
    """The edge's whole job per frame: preprocess + first junction + exit, sparse vs dense."""
    heads = {name: HeadOutputs(Head(load_config(name).model).eval()) for name in
             ("paper-dense", "paper-sparse", "default")}
    print("\n| head | thr | batch | fwd µs | fwd speedup vs paper-dense | step µs | "
          "step speedup |")
    print("|---" * 7 + "|")
    for threads in threads_list:
        torch.set_num_threads(threads)
        for batch in BATCHES:
            rows = {}
            for name, head in heads.items():
                rows[name, 0], rows[name, 1] = calls(head, None, batch, 784)
            seconds = measure(rows, budget_s, min_rounds)
            base = seconds["paper-dense", 0], seconds["paper-dense", 1]
            for name in heads:
                f, s = seconds[name, 0], seconds[name, 1]
                print(f"| {name} | {threads} | {batch} | {f * 1e6:.1f} | {base[0] / f:.2f}x | "
                      f"{s * 1e6:.1f} | {base[1] / s:.2f}x |")


class HeadOutputs(nn.Module):
    """A head's (exit logits, features) summed into one tensor, so a step can backprop."""

    def __init__(self, head: Head):
        super().__init__()
        self.head = head

    def forward(self, x):
        exit_logits, features = self.head(x)
        return exit_logits.sum() + features.sum()


if __name__ == "__main__":
    main()
