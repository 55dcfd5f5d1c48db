"""The head on the edge, per frame at batch 1: torch (what the edge ran before) against the
torch-free NumPy head, for the paper's sparse head, its dense twin and the recommended
default; and the edge process itself: resident memory and time from start to first answer.

    python benchmarks/edge_head.py            # runs/paper-sparse, runs/paper-dense, runs/default
    python benchmarks/edge_head.py --frames 2000 --repeats 5

Missing artifact folders are trained first (`splitexit train NAME`). One thread everywhere.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")       # NumPy's BLAS and torch: one thread,
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as on the edge

import numpy as np  # noqa: E402

from pipeline.edge.numpy_head import load_numpy_head  # noqa: E402
from pipeline.model.config import FASHION_MNIST_DIR  # noqa: E402
from pipeline.model.data import load_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HEADS = ("paper-sparse", "paper-dense", "default")
TWIN = {"paper-sparse": "paper-dense", "paper-dense": "paper-dense", "default": "paper-dense"}

# One edge process answering one frame: imports, artifact, head, first answer, exit. The
# torch-free one is the real producer (no broker, 1 ms deadline); the torch one is what the
# producer did before: the same libraries plus torch, and the head from edge.pt.
# Peak resident memory of this process image. Not getrusage's ru_maxrss: Linux carries the
# forking parent's peak across exec into it (a torch-sized parent made every child ~360 MiB).
PEAK = """
def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""
TORCH_EDGE = PEAK + """
import sys, asyncio, torch, zmq.asyncio, prometheus_client
torch.set_num_threads(1)
from pipeline.model.artifacts import load_edge
from pipeline.model.calibrate import exit_scores
from pipeline.model.data import load_dataset
edge = load_edge(sys.argv[1])
x = torch.from_numpy(load_dataset(sys.argv[2], val_size=5000).test.images[:1]).float() / 255
with torch.inference_mode():
    logits, features = edge.head(x)
print(int(exit_scores(logits, edge.score)[0] >= edge.threshold), peak_kib())
"""
NUMPY_EDGE = PEAK + """
import sys
from pipeline.edge.config import EdgeConfig
from pipeline.edge.producer import run_producer
summary = run_producer(sys.argv[1], EdgeConfig("tcp://127.0.0.1:9", deadline_ms=1.0),
                       "dataset", None, 1, sys.argv[2])
print(summary.frames, peak_kib())
assert "torch" not in sys.modules
"""


def per_frame_us(fn, frames: np.ndarray, repeats: int) -> float:
    """Best of `repeats` passes over the frames, one frame a call (the edge's batch of one)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(len(frames)):
            fn(frames[i:i + 1])
        best = min(best, (time.perf_counter() - start) / len(frames))
    return best * 1e6


def process_start(script: str, art: Path, data: str, runs: int = 3) -> tuple[float, float]:
    """(seconds from start to the first answer, resident MiB): best of `runs` processes."""
    best_s, rss = float("inf"), 0.0
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", script, str(art), data], cwd=ROOT,
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        best_s = min(best_s, time.perf_counter() - start)
        rss = int(out.stdout.split()[1]) / 1024
    return best_s, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs", help="folder holding the trained heads")
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from pipeline.model.artifacts import load_edge

    torch.set_num_threads(1)
    frames = load_dataset(args.data, val_size=5000).test.images[:args.frames]
    frames = frames.astype(np.float32) / 255
    rows = {}
    for name in HEADS:
        art = Path(args.runs) / name
        if not (art / "edge.npz").is_file():
            print(f"I: training {name} into {art}", flush=True)
            subprocess.run([sys.executable, "-m", "pipeline.cli", "train", name, "--out",
                            str(art), "--quiet", "--data", args.data], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
        torch_head, numpy_head = load_edge(art).head.eval(), load_numpy_head(art)
        x = torch.from_numpy(frames)

        def run_torch(f, head=torch_head):
            with torch.inference_mode():
                return head(torch.from_numpy(f))

        run_torch(frames[:1])
        numpy_head(frames[:1])
        assert np.allclose(numpy_head(frames)[1], torch_head(x)[1].detach().numpy(), atol=1e-5)
        stored = load_numpy_head(art, dense_max_elements=0)  # the tables as in the file
        macs = sum(j.macs for j in stored.layers) + stored.exit.macs
        rows[name] = {"macs": macs, "torch": per_frame_us(run_torch, frames, args.repeats),
                      "numpy": per_frame_us(numpy_head, frames, args.repeats),
                      "torch_edge": process_start(TORCH_EDGE, art, args.data),
                      "numpy_edge": process_start(NUMPY_EDGE, art, args.data)}
        print(f"I: {name}: {rows[name]}", flush=True)

    print(f"\nhead + exit per frame at batch 1, 1 thread, {args.frames} Fashion-MNIST test "
          f"frames, best of {args.repeats}")
    print("| head | MACs | vs dense twin MACs | torch µs | NumPy µs | NumPy vs torch | "
          "torch vs dense twin | NumPy vs dense twin |\n|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        twin = rows[TWIN[name]]
        print(f"| {name} | {r['macs']} | {twin['macs'] / r['macs']:.1f}x fewer | "
              f"{r['torch']:.1f} | {r['numpy']:.1f} | {r['torch'] / r['numpy']:.2f}x | "
              f"{twin['torch'] / r['torch']:.2f}x | {twin['numpy'] / r['numpy']:.2f}x |")
    print("\nan edge process answering its first frame (best of 3 processes)")
    print("| head | torch edge: s to first answer | RSS MiB | torch-free edge: s | RSS MiB |"
          "\n|---|---|---|---|---|")
    for name, r in rows.items():
        (ts, trss), (ns, nrss) = r["torch_edge"], r["numpy_edge"]
        print(f"| {name} | {ts:.2f} | {trss:.0f} | {ns:.2f} | {nrss:.0f} |")


if __name__ == "__main__":
    main()
