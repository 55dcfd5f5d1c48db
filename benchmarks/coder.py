"""The static code's coder per frame, native C against the Python reference, beside the work
around it on each side: the NumPy head + exit that makes the features on the edge, and the
torch tail that answers them on the worker.

All on the Fashion-MNIST test frames and a trained artifact folder, in batches of 64 (a worker's
batch; the edge encodes the frames a batch could not answer in one request):
- head + exit: NumpyHead.run_exit, the exit's scores, then run_uplink (the bottleneck), as
  the edge runs them;
- quantize + encode: wire.encode_request with the static code (quantizer, float16 scales,
  the smaller of Huffman and rANS, header), native and with the Python coder;
- decode: wire.decode_request (budget, decode, dequantize), native and Python;
- tail: the worker's torch tail and softmax at batch 64, one thread.
Native and Python requests are checked to be the same bytes. Times are this thread's CPU
time (`time.thread_time`) per frame, best of the repeats, each step measured in turn in every
repeat, so a busy machine slows them alike; the goals (issue #26) are ratios in one run.

    python -m benchmarks.coder                 # runs/default (`splitexit train default`)
    python -m benchmarks.coder --quick         # 3 repeats, the Python coder once
    python -m benchmarks.coder --artifacts DIR --data IDX_DIR
    python -m benchmarks.coder --tiny --artifacts DIR --data IDX_DIR   # 128 frames, --quick
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")       # NumPy's BLAS and torch: one thread,
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as on the edge and in a worker

import numpy as np  # noqa: E402

from benchmarks import add_tiny, apply_tiny  # noqa: E402
from pipeline.edge.numpy_head import exit_scores, load_numpy_head  # noqa: E402
from pipeline.model.config import FASHION_MNIST_DIR  # noqa: E402
from pipeline.floor.data import load_test_split  # noqa: E402
from pipeline.floor import native  # noqa: E402
from pipeline.protocol import wire  # noqa: E402
from pipeline.protocol.wire import Codec, DType  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

BATCH = 64
GOALS = (("native encode / (head + exit)", "encode", "head", 0.25, "<="),
         ("native decode / tail", "decode", "tail", 0.5, "<="),
         ("Python / native encode", "encode_py", "encode", 20.0, ">="),
         ("Python / native decode", "decode_py", "decode", 20.0, ">="))


@contextlib.contextmanager
def python_coder():
    """The static code runs its Python reference inside (as with SPLITEXIT_NATIVE=0)."""
    saved = native.CODER._state
    native.CODER._state = {"lib": None, "status": "Python coder (benchmark)"}
    try:
        yield
    finally:
        native.CODER._state = saved


def per_frame_us(step, batches: list, frames: int) -> float:
    start = time.thread_time()
    for batch in batches:
        step(batch)
    return 1e6 * (time.thread_time() - start) / frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default=str(ROOT / "runs" / "default"))
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--frames", type=int, default=1280, help="test frames (batches of 64)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="3 repeats, the Python coder once")
    add_tiny(ap)
    args = ap.parse_args()
    apply_tiny(ap, args, frames=2 * BATCH, quick=True)
    if not (Path(args.artifacts) / "edge.npz").is_file():
        sys.exit(f"{args.artifacts} holds no trained model: run `splitexit train default` "
                 f"(writes runs/default) or pass --artifacts DIR")
    import torch

    from pipeline.model.artifacts import load_server

    torch.set_num_threads(1)
    repeats, python_repeats = (3, 1) if args.quick else (args.repeats, 3)
    head, server = load_numpy_head(args.artifacts), load_server(args.artifacts)
    code = head.code
    if code is None or head.uplink_bits not in (2, 4, 8):
        sys.exit(f"{args.artifacts}: its uplink has no static code (train with "
                 f"model.uplink_bits=4, as the default)")
    dtype = {2: DType.UINT2, 4: DType.UINT4, 8: DType.UINT8}[head.uplink_bits]
    images = load_test_split(args.data).images[:args.frames]
    pixels = images.reshape(len(images), -1).astype(np.float32) / 255
    frames = len(pixels) // BATCH * BATCH
    if frames == 0:
        sys.exit(f"--frames {args.frames}: at least {BATCH}")
    pixel_batches = [pixels[i:i + BATCH] for i in range(0, frames, BATCH)]

    def head_exit(px):
        logits, hidden = head.run_exit(px)
        exit_scores(logits, head.score, head.temperature)
        return head.run_uplink(hidden)

    features = [head_exit(px) for px in pixel_batches]
    tag = wire.model_tag(head.model_id)

    def encode(x):
        return wire.encode_request(1, tag, x, dtype, Codec.STATIC, code)

    messages = [encode(x) for x in features]
    with python_coder():
        if [encode(x) for x in features] != messages:
            sys.exit("native and Python requests differ: the coder is broken")
    decoded = [wire.decode_request(m, code).features for m in messages]
    tail, temperature = server.tail.eval(), server.temperature
    tensors = [torch.from_numpy(x) for x in decoded]

    def run_tail(x):
        with torch.inference_mode():
            torch.softmax(tail(x) / temperature, dim=1).max(dim=1)

    steps = {"head": (head_exit, pixel_batches), "encode": (encode, features),
             "decode": (lambda m: wire.decode_request(m, code), messages),
             "tail": (run_tail, tensors)}
    best = {name: float("inf") for name in (*steps, "encode_py", "decode_py")}
    for r in range(repeats):
        for name, (step, batches) in steps.items():
            best[name] = min(best[name], per_frame_us(step, batches, frames))
        if r < python_repeats:
            with python_coder():
                for name in ("encode", "decode"):
                    step, batches = steps[name]
                    best[name + "_py"] = min(best[name + "_py"],
                                             per_frame_us(step, batches, frames))

    sizes = [len(m[0]) for m in messages]
    codecs = sorted({Codec(m[0][2] & 0xF).name.lower() for m in messages})
    print(f"coder: {native.coder_status()}; model {args.artifacts} ({code.channels} features, "
          f"{head.uplink_bits}-bit, codecs {', '.join(codecs)}); {frames} test frames in "
          f"batches of {BATCH}, {sum(sizes) / frames:.1f} B a frame on the wire; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"\nper frame, us of CPU, best of {repeats} (Python coder: best of "
          f"{min(repeats, python_repeats)})")
    print("| step (batch 64) | native | Python coder | Python / native |\n|---|---|---|---|")
    print(f"| head + exit (NumPy) | {best['head']:.2f} | | |")
    for name, what in (("encode", "quantize + encode (wire.encode_request)"),
                       ("decode", "decode (wire.decode_request)")):
        print(f"| {what} | {best[name]:.2f} | {best[name + '_py']:.1f} | "
              f"{best[name + '_py'] / best[name]:.0f}x |")
    print(f"| tail (torch, 1 thread) | {best['tail']:.2f} | | |")
    print("\n| goal (issue #26) | measured | target | met |\n|---|---|---|---|")
    for what, a, b, target, sense in GOALS:
        ratio = best[a] / best[b]
        met = ratio <= target if sense == "<=" else ratio >= target
        print(f"| {what} | {ratio:.2f} | {sense} {target} | {'yes' if met else 'no'} |")


if __name__ == "__main__":
    main()
