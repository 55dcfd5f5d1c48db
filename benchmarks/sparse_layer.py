"""SparseLinear against nn.Linear and against masked dense (what the paper's code does).

Prints, per shape, thread count and batch: median time of forward and of a training step
(forward + backward), the speedup over nn.Linear, and the ideal 1/density next to it.
The "kernel=..." rows force one kernel, to show why SparseLinear.kernel_for picks the one it
does for each shape and batch (the thresholds at the top of pipeline/sparse.py).

    python benchmarks/sparse_layer.py                # all shapes, 1 and 2 threads
    python benchmarks/sparse_layer.py --threads 1 --quick
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn
from torch.utils import benchmark

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
KERNELS = ("dense", "gather", "csr", "bag", "native")


class MaskedDense(nn.Module):
    """Dense weight times a fixed 0/1 mask: sparse in value only, dense in storage and time."""

    def __init__(self, layer: SparseLinear):
        super().__init__()
        self.weight = nn.Parameter(layer.dense_weight())
        self.register_buffer("mask", (self.weight != 0).float())
        self.bias = nn.Parameter(layer.bias.detach().clone())

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


@contextlib.contextmanager
def forced_kernel(layer: nn.Module, name: str | None):
    if name is None:
        yield
        return
    layer.kernel_for = lambda batch, training: name
    try:
        yield
    finally:
        del layer.kernel_for


def time_it(fn, threads: int, min_run_time: float) -> float:
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return t.blocked_autorange(min_run_time=min_run_time).median


def measure(module: nn.Module, batch: int, n_in: int, threads: int, min_run_time: float):
    x = torch.randn(batch, n_in)
    xg = x.clone().requires_grad_(True)

    def forward():
        with torch.inference_mode():
            module(x)

    def train_step():
        module.zero_grad(set_to_none=True)
        module(xg).sum().backward()

    return time_it(forward, threads, min_run_time), time_it(train_step, threads, min_run_time)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quick", action="store_true", help="shorter timing runs (noisier)")
    ap.add_argument("--only", choices=["layers", "heads"], help="run one of the two tables")
    args = ap.parse_args()
    min_run_time = 0.05 if args.quick else 0.3
    torch.manual_seed(0)

    print(f"torch {torch.__version__}; medians; speedup = nn.Linear time / this time")
    header = ("| shape | thr | batch | impl | fwd µs | fwd speedup | step µs | step speedup "
              "| ideal 1/ρ |")
    print(header)
    print("|---" * 9 + "|")
    shapes = [] if args.only == "heads" else SHAPES
    for name, n_in, n_out, fan_out in shapes:
        layer = SparseLinear(n_in, n_out, fan_out, seed=0)
        dense = nn.Linear(n_in, n_out)
        masked = MaskedDense(layer)
        ideal = n_in / layer.fan_in
        for threads in args.threads:
            for batch in BATCHES:
                base_f, base_s = measure(dense, batch, n_in, threads, min_run_time)
                rows = [("nn.Linear", dense, None), ("masked dense", masked, None),
                        ("SparseLinear", layer, None)]
                rows += [(f"kernel={k}", layer, k) for k in KERNELS]
                for impl, module, kernel in rows:
                    if module is dense:
                        f, s = base_f, base_s
                    else:
                        with forced_kernel(module, kernel):
                            f, s = measure(module, batch, n_in, threads, min_run_time)
                    print(f"| {name} | {threads} | {batch} | {impl} | {f * 1e6:.1f} | "
                          f"{base_f / f:.2f}x | {s * 1e6:.1f} | {base_s / s:.2f}x | {ideal:.1f}x |")
    if args.only != "layers":
        compare_heads(args.threads, min_run_time)


def compare_heads(threads_list, min_run_time) -> None:
    """The edge's whole job per frame: preprocess + first junction + exit, sparse vs dense."""
    heads = {name: Head(load_config(name).model).eval() for name in
             ("paper-dense", "paper-sparse", "default")}
    print("\n| head | thr | batch | fwd µs | fwd speedup vs paper-dense | step µs | "
          "step speedup |")
    print("|---" * 7 + "|")
    for threads in threads_list:
        for batch in BATCHES:
            base = None
            for name, head in heads.items():
                f, s = measure(HeadOutputs(head), batch, 784, threads, min_run_time)
                base = base or (f, s)
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
