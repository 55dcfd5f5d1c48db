"""The head on the edge, per frame at batch 1: torch (what the edge ran before) against the
torch-free NumPy head, for the paper's sparse head, its dense twin and the recommended
default; and the edge process itself: resident memory and time from start to first answer.

    python -m benchmarks.edge_head            # runs/paper-sparse, runs/paper-dense, runs/default
    python -m benchmarks.edge_head --frames 2000 --repeats 5
    python -m benchmarks.edge_head --conv runs/bandwidth/conv-sparse-s0 runs/bandwidth/conv-dense-s0
    python -m benchmarks.edge_head --edge default   # only the C edge step beside the C head
    python -m benchmarks.edge_head --tiny --runs DIR --data IDX_DIR   # paper-dense, 1 epoch

The C edge step (`splitexit export --target c`: head, exit score, quantizer, static code,
wire-v4 REQUEST) is timed beside the C head alone in the same program, on the frames the
exit sends up (unsure) and on those it answers: the goal is a step <= 3x the head, -O2.

--conv: trained conv heads only, their float32 C export (called through ctypes, as a
Python edge would) beside the NumPy head: does the C head's time follow the real kernels?

Missing artifact folders are trained first (`splitexit train NAME`). One thread everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")       # NumPy's BLAS and torch: one thread,
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as on the edge

import numpy as np  # noqa: E402

from benchmarks import add_tiny, apply_tiny  # noqa: E402
from benchmarks.c_timing import c_compiler, c_edge, c_head, print_edge_table  # noqa: E402
from pipeline.edge.numpy_head import load_numpy_head  # noqa: E402
from pipeline.export.int8_weights import CALIBRATION_FRAMES  # noqa: E402
from pipeline.model.config import FASHION_MNIST_DIR  # noqa: E402
from pipeline.floor.data import load_dataset  # noqa: E402

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
from pipeline.floor.data import load_test_split
edge = load_edge(sys.argv[1])
x = torch.from_numpy(load_test_split(sys.argv[2]).images[:1].copy()).float() / 255
with torch.inference_mode():
    logits, features = edge.head(x)
print(int(exit_scores(logits, edge.score, edge.temperature)[0] >= edge.threshold), peak_kib())
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


def table_bytes(head) -> dict[str, int]:
    """Values + indices + biases as stored in edge.npz (what the compiled float32 head must
    hold), and the same with int8 values plus a float scale per row (the int8 head's)."""
    with np.load(head.path) as npz:
        stored = {k: npz[k] for k in npz.files if k.endswith((".values", ".indices", ".bias"))}
    float32 = sum(a.nbytes for a in stored.values())
    values = sum(a.nbytes for k, a in stored.items() if k.endswith(".values"))
    rows = sum(len(a) for k, a in stored.items() if k.endswith(".bias"))
    return {"float32": float32, "int8": float32 - values + values // 4 + 4 * rows}


def cpu_mhz() -> float | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1])
    return None


def onnx_runner(art: Path, work: Path):
    """A batch-of-one call into onnxruntime on one thread, or None without the extra."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from pipeline.export.export_onnx import export_onnx

    [path] = export_onnx(art, work / f"{art.name}-onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda f: session.run(None, {"pixels": f})


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


def conv_table(folders: list[Path], data: str, n: int, repeats: int, cflags: list[str],
               work: Path) -> None:
    """Per frame at batch 1: each conv head in NumPy and as its float32 C export, compiled
    with `cflags` and called through ctypes; the C outputs checked against NumPy first."""
    import ctypes

    from pipeline.export.export_c import C_FILE, export_c
    from pipeline.floor.data import load_test_split

    cc = c_compiler()
    if cc is None:
        raise SystemExit("no C compiler (cc/gcc) on this machine")
    p = ctypes.POINTER(ctypes.c_float)
    rows = []
    for art in folders:
        head = load_numpy_head(art)
        if head.input_shape == (1, 28, 28) and Path(data).is_dir():
            frames, source = load_test_split(data).images[:n].astype(np.float32) / 255, \
                "Fashion-MNIST test frames"
        else:
            frames = np.random.default_rng(0).random((n, head.input_size), dtype=np.float32)
            source = "random frames"
        out = work / f"{art.name}-c"
        export_c(art, out, "float32")
        subprocess.run([cc, "-std=c99", *cflags, "-shared", "-fPIC", "-o", str(out / "head.so"),
                        str(out / C_FILE)], check=True)
        lib = ctypes.CDLL(str(out / "head.so"))
        features = np.zeros((len(frames), head.width), np.float32)
        logits = np.zeros((len(frames), head.exit.bias.shape[0]), np.float32)
        calls = [(f.ctypes.data_as(p), g.ctypes.data_as(p), l.ctypes.data_as(p))
                 for f, g, l in zip(frames, features, logits)]
        for call in calls:
            lib.splitexit_head(*call)
        ref_logits, ref_features = head(frames)
        assert np.allclose(logits, ref_logits, atol=1e-4) and \
            np.allclose(features, ref_features, atol=1e-4), f"{art}: C differs from NumPy"
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for call in calls:
                lib.splitexit_head(*call)
            best = min(best, (time.perf_counter() - start) / len(calls))
        structure = json.loads((art / "metrics.json").read_text())["structure"]
        rows.append((art.name, structure["edge_macs"],   # as `splitexit train` counted them
                     per_frame_us(head, frames, repeats) / 1000, best * 1000))
        print(f"I: {rows[-1]}", flush=True)
    print(f"\nconv head + exit per frame at batch 1, 1 thread, {n} {source}, best of "
          f"{repeats}; C: float32 export, `cc {' '.join(cflags)}`, called through ctypes")
    print("| head | head MACs | NumPy ms/frame | C ms/frame | C vs NumPy | C MACs/ns | "
          f"MACs, C time vs {rows[0][0]} |\n|---|---|---|---|---|---|---|")
    for name, macs, numpy_ms, c_ms in rows:
        print(f"| {name} | {macs} | {numpy_ms:.3f} | {c_ms:.4f} | {numpy_ms / c_ms:.1f}x | "
              f"{macs / (c_ms * 1e6):.1f} | {macs / rows[0][1]:.2f}x, {c_ms / rows[0][3]:.2f}x |")


def trained(art: Path, name: str, data: str, epochs: int | None = None) -> Path:
    """The artifact folder, trained first (`splitexit train NAME`) if it is missing."""
    if not (art / "edge.npz").is_file():
        print(f"I: training {name} into {art}", flush=True)
        subprocess.run([sys.executable, "-m", "pipeline.cli", "train", name, "--out",
                        str(art), "--quiet", "--data", data,
                        *(["--epochs", str(epochs)] if epochs else [])], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return art


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs", help="folder holding the trained heads")
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--conv", nargs="+", type=Path, metavar="DIR",
                    help="time these trained conv heads (NumPy and the C export) instead")
    ap.add_argument("--cflags", default="-O2 -march=native",
                    help="compiler flags for --conv's C heads, as --cflags=\"-O3 ...\" "
                         "(default: %(default)s)")
    ap.add_argument("--edge", nargs="*", metavar="HEAD", choices=HEADS,
                    help="only the C edge step against the C head alone (float32), for these "
                         "heads (default: all)")
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS,
                    help="the heads of the main tables (default: all; the dense twin is each "
                         "one's reference, so it is always among them)")
    ap.add_argument("--epochs", type=int, help="epochs for the heads trained here")
    ap.add_argument("--starts", type=int, default=3,
                    help="edge processes started per head (the best counts)")
    add_tiny(ap)
    args = ap.parse_args()
    apply_tiny(ap, args, frames=20, repeats=1, heads=["paper-dense"], epochs=1, starts=1)
    if args.edge is not None:
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="edge-step-"))
        frames = load_dataset(args.data).test.images[:args.frames].astype(np.float32) / 255
        print_edge_table({name: c_edge(trained(Path(args.runs) / name, name, args.data,
                                               args.epochs),
                                       frames, 5 * args.repeats, work)
                          for name in args.edge or HEADS},
                         args.frames, 5 * args.repeats)
        return
    if args.conv:
        import tempfile

        conv_table(args.conv, args.data, args.frames, args.repeats, args.cflags.split(),
                   Path(tempfile.mkdtemp(prefix="edge-head-conv-")))
        return

    import torch

    from pipeline.model.artifacts import load_edge

    import tempfile

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="edge-head-"))
    data = load_dataset(args.data)
    frames = data.test.images[:args.frames].astype(np.float32) / 255
    calibration = data.train.images[:CALIBRATION_FRAMES].astype(np.float32) / 255
    rows = {}
    heads = [name for name in HEADS if name in args.heads or name in TWIN.values()]
    for name in heads:
        art = trained(Path(args.runs) / name, name, args.data, args.epochs)
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
                      "onnx": (per_frame_us(onnx, frames, args.repeats)
                               if (onnx := onnx_runner(art, work)) else float("nan")),
                      "torch_edge": process_start(TORCH_EDGE, art, args.data, args.starts),
                      "numpy_edge": process_start(NUMPY_EDGE, art, args.data, args.starts),
                      "c": c_head(art, frames, calibration, 5 * args.repeats, work),
                      "edge": c_edge(art, frames, 5 * args.repeats, work),
                      "table_bytes": table_bytes(stored)}
        print(f"I: {name}: {rows[name]}", flush=True)

    print(f"\nhead + exit per frame at batch 1, 1 thread, {args.frames} Fashion-MNIST test "
          f"frames, best of {args.repeats}")
    print("| head | MACs | vs dense twin MACs | torch µs | NumPy µs | onnxruntime µs | "
          "NumPy vs torch | torch vs dense twin | NumPy vs dense twin | onnxruntime vs dense "
          "twin |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        twin = rows[TWIN[name]]
        print(f"| {name} | {r['macs']} | {twin['macs'] / r['macs']:.1f}x fewer | "
              f"{r['torch']:.1f} | {r['numpy']:.1f} | {r['onnx']:.1f} | "
              f"{r['torch'] / r['numpy']:.2f}x | {twin['torch'] / r['torch']:.2f}x | "
              f"{twin['numpy'] / r['numpy']:.2f}x | {twin['onnx'] / r['onnx']:.2f}x |")
    mhz = cpu_mhz()
    if all(r["c"] for r in rows.values()):
        print(f"\nthe C export, per frame at batch 1, best of {5 * args.repeats}; cycles at "
              f"the {mhz:.0f} MHz /proc/cpuinfo reports; vs dense twin: same variant and flags")
        print("| head | variant | flags | ns per frame | vs dense twin | cycles per MAC | "
              "vs torch | head bytes (text+data) | vs its tables |\n"
              "|---|---|---|---|---|---|---|---|---|")
        for name, r in rows.items():
            for (variant, label), c in r["c"].items():
                twin = rows[TWIN[name]]["c"][(variant, label)]
                cycles = c["ns"] * mhz / 1000 / r["macs"] if mhz else float("nan")
                print(f"| {name} | {variant} | {label} | {c['ns']:.0f} | "
                      f"{twin['ns'] / c['ns']:.1f}x | {cycles:.2f} | "
                      f"{r['torch'] * 1000 / c['ns']:.0f}x | {c['bytes']} | "
                      f"{c['bytes'] / r['table_bytes'][variant]:.2f}x |")
    if all(r["edge"] for r in rows.values()):
        print_edge_table({name: r["edge"] for name, r in rows.items()}, args.frames,
                         5 * args.repeats)
    print(f"\nan edge process answering its first frame (best of {args.starts} processes)")
    print("| head | torch edge: s to first answer | RSS MiB | torch-free edge: s | RSS MiB |"
          "\n|---|---|---|---|---|")
    for name, r in rows.items():
        (ts, trss), (ns, nrss) = r["torch_edge"], r["numpy_edge"]
        print(f"| {name} | {ts:.2f} | {trss:.0f} | {ns:.2f} | {nrss:.0f} |")


if __name__ == "__main__":
    main()
