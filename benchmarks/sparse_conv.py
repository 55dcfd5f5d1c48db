"""SparseConv2d against its dense twin (nn.Conv2d), on the clock, in torch and in NumPy.

Prints, per shape and batch: multiply-adds, median time of a forward and of a training step
(forward + backward) for the sparse conv and for nn.Conv2d, the sparse/dense time ratio
beside the ideal (the density), and the NumPy twin's forward (pipeline/edge/numpy_conv.py,
what a torch-free edge would run) against a dense NumPy conv of the same code path.

    python -m benchmarks.sparse_conv             # 2 threads
    python -m benchmarks.sparse_conv --threads 1
    python -m benchmarks.sparse_conv --heads runs/conv-sparse runs/conv-dense
    python -m benchmarks.sparse_conv --tiny      # the two small shapes, batch 1, brief timings

With --heads: whole trained heads instead (head + exit + bottleneck, what an edge runs on an
offloaded frame), per frame at batch 1 and 64 on Fashion-MNIST test frames: the NumPy head
from edge.npz, and torch's (the gather + grouped conv of inference) from edge.pt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # NumPy's BLAS on one thread, as on an edge

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils import benchmark  # noqa: E402

from benchmarks import add_tiny  # noqa: E402
from pipeline.edge.numpy_conv import input_major, sparse_conv2d  # noqa: E402
from pipeline.model.config import FASHION_MNIST_DIR  # noqa: E402
from pipeline.model.sparse_conv import SparseConv2d  # noqa: E402

# (name, C_in, C_out, channel fan-out, kernel, side): shapes a small camera head would have.
SHAPES = [
    ("8->32 @25% 14x14", 8, 32, 8, 3, 14),
    ("32->32 @12.5% 7x7", 32, 32, 4, 3, 7),
    ("32->64 @12.5% 28x28", 32, 64, 8, 3, 28),
    ("64->64 @6.25% 28x28", 64, 64, 4, 3, 28),
]
BATCHES = (1, 64)


TIMED_S, NUMPY_REPEATS = 0.3, 7   # --tiny: far less


def timed(fn, seconds: float | None = None) -> float:
    """Median seconds per call."""
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(
        min_run_time=TIMED_S if seconds is None else seconds).median


def numpy_timed(fn, repeats: int | None = None) -> float:
    times = []
    for _ in range(NUMPY_REPEATS if repeats is None else repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def heads(dirs: list[str], data: str, batches=BATCHES) -> None:
    import json
    from pathlib import Path

    from pipeline.edge.numpy_head import load_numpy_head
    from pipeline.model.artifacts import load_edge
    from pipeline.floor.data import load_test_split

    pixels = load_test_split(data).images[:256].astype(np.float32) / 255
    print("| head | MACs (every frame + offloaded only) | batch | NumPy ms/frame | torch "
          "ms/frame |\n|---|---|---|---|---|")
    for folder in dirs:
        numpy_head, torch_head = load_numpy_head(folder), load_edge(folder).head.eval()
        s = json.loads((Path(folder) / "metrics.json").read_text())["structure"]
        macs = f"{s['edge_macs'] - s['uplink_macs']} + {s['uplink_macs']}"
        for batch in batches:
            x = pixels[:batch]
            np_s = timed(lambda: numpy_head(x))
            with torch.inference_mode():
                t = torch.from_numpy(x)
                torch_s = timed(lambda: torch_head(t))
            print(f"| {Path(folder).name} | {macs} | {batch} | {np_s * 1e3 / batch:.3f} | "
                  f"{torch_s * 1e3 / batch:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", nargs="+", metavar="DIR", help="trained folders to time")
    ap.add_argument("--data", default=FASHION_MNIST_DIR, help="--heads' test frames")
    add_tiny(ap)
    args = ap.parse_args()
    shapes, batches = SHAPES, BATCHES
    if args.tiny:
        global TIMED_S, NUMPY_REPEATS
        TIMED_S, NUMPY_REPEATS, shapes, batches = 0.01, 1, SHAPES[:2], BATCHES[:1]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads\n")
    if args.heads:
        return heads(args.heads, args.data, batches)
    print("| shape | batch | MACs sparse / dense | fwd sparse ms | fwd dense ms | ratio "
          "(ideal) | step sparse ms | step dense ms | ratio | NumPy fwd sparse ms | "
          "NumPy fwd dense ms |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for name, c_in, c_out, fan_out, k, side in shapes:
        sparse = SparseConv2d(c_in, c_out, fan_out, k, padding=k // 2, seed=0)
        dense = torch.nn.Conv2d(c_in, c_out, k, padding=k // 2)
        density = sparse.fan_in / c_in
        np_weight = sparse.weight.detach().numpy()
        np_index = sparse.indices.numpy()
        np_bias = sparse.bias.detach().numpy()
        dense_weight = dense.weight.detach().numpy()
        dense_index = np.tile(np.arange(c_in), (c_out, 1))
        for batch in batches:
            x = torch.randn(batch, c_in, side, side)
            with torch.inference_mode():
                fwd = [timed(lambda m=m: m(x)) for m in (sparse, dense)]
            xg = x.clone().requires_grad_()
            step = [timed(lambda m=m: m(xg).sum().backward()) for m in (sparse, dense)]
            xn = x.numpy()
            np_fwd = [numpy_timed(lambda w=w, i=i, p=input_major(w, i, c_in):
                                  sparse_conv2d(xn, w, i, np_bias, 1, k // 2, p))
                      for w, i in ((np_weight, np_index), (dense_weight, dense_index))]
            macs = sparse.macs(side, side)
            print(f"| {name} | {batch} | {macs / 1e3:.0f}k / {macs / density / 1e3:.0f}k | "
                  f"{fwd[0] * 1e3:.3f} | {fwd[1] * 1e3:.3f} | {fwd[0] / fwd[1]:.2f} "
                  f"({density:.3f}) | {step[0] * 1e3:.2f} | {step[1] * 1e3:.2f} | "
                  f"{step[0] / step[1]:.2f} | {np_fwd[0] * 1e3:.2f} | {np_fwd[1] * 1e3:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
