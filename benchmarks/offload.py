"""The offload runtime against the same model in one process; bytes and accuracy on the wire.

Three tables, all on the Fashion-MNIST test set and a trained artifact directory:
1. throughput: frames/s at 100 % offload through edge -> broker -> workers (real processes,
   loopback tcp; the edge encodes and the workers decode with the native coder where it
   builds, as its status line says) vs head + tail called frame by frame in one process;
2. offload-hop latency at a low rate (batch of one, no batching wait): what the network
   hop adds to a frame over answering locally;
3. uplink bytes per offloaded frame for each dtype and codec, the edge's encode and the
   worker's decode per frame (CPU time, one frame a message), and the accuracy each costs
   (all frames offloaded), next to the raw frame and its deflate size.

    python -m benchmarks.offload                       # uses runs/default (trained if missing)
    python -m benchmarks.offload --frames 5000 --workers 2
    python -m benchmarks.offload --tiny --artifacts DIR --data IDX_DIR   # 100 frames
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from benchmarks import add_tiny, apply_tiny
from benchmarks.common import read_jsonl, start_pool
from pipeline.floor import native, quantization
from pipeline.protocol import wire
from pipeline.model.artifacts import load_model, load_server, set_threshold
from pipeline.model.calibrate import OFFLOAD_ALL
from pipeline.model.config import FASHION_MNIST_DIR
from pipeline.floor.data import load_test_split
from pipeline.edge.config import EdgeConfig
from pipeline.edge.producer import run_producer
from pipeline.protocol.wire import CODEC_NAMES, DTYPE_NAMES
from workers.pool import ProcessGroup


def in_process(model, pixels: torch.Tensor) -> float:
    """Frames/s of head + tail, one frame at a time, as an edge with a local tail would;
    after a few untimed frames (the sparse layers time their kernels at first use)."""
    with torch.inference_mode():
        for i in range(min(len(pixels), 20)):
            model.tail(model.head(pixels[i:i + 1])[1])
        start = time.perf_counter()
        for i in range(len(pixels)):
            _, features = model.head(pixels[i:i + 1])
            model.tail(features)
        return len(pixels) / (time.perf_counter() - start)


def pipeline_run(art: Path, frames: int, workers: int, fps: float | None, max_wait_ms: float,
                 data_dir: str, tmp: Path) -> list[dict]:
    group = ProcessGroup()
    results = tmp / f"run-{time.monotonic_ns()}.jsonl"
    try:
        front, _, _ = start_pool(group, art, workers, max_wait_ms)
        edge = group.start("edge", run_producer, str(art),
                           EdgeConfig(front, 5000.0, results=str(results)), "dataset", fps,
                           frames, data_dir)
        group.wait([edge])
    finally:
        group.stop()
    return read_jsonl(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="runs/default")
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--frames", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--latency-fps", type=float, default=200.0)
    add_tiny(ap)
    args = ap.parse_args()
    apply_tiny(ap, args, frames=100, latency_fps=1000.0)
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="offload-bench-"))
    art = tmp / "all-offload"
    shutil.copytree(args.artifacts, art)
    set_threshold(art, OFFLOAD_ALL, "max_softmax")  # every frame goes to the server
    model, _, _ = load_model(art)
    test = load_test_split(args.data)
    pixels = torch.from_numpy(test.images[:args.frames].copy()).float() / 255
    labels = test.labels[:args.frames]

    local_fps = in_process(model, pixels)
    outcomes = pipeline_run(art, args.frames, args.workers, None, 0.0, args.data, tmp)
    span = (max(o["capture_ts"] + o["latency_ms"] / 1000 for o in outcomes)
            - min(o["capture_ts"] for o in outcomes))
    piped_fps = len(outcomes) / span
    print(f"\n1. throughput, {args.frames} frames, 100 % offload, {args.workers} worker(s), "
          f"1 producer, torch 1 thread per process; static code: {native.coder_status()} "
          f"(edge and workers build the same one)")
    print("| path | frames/s | ratio |\n|---|---|---|")
    print(f"| head + tail in one process, frame by frame | {local_fps:.0f} | 1.00 |")
    print(f"| edge -> broker -> worker (loopback tcp) | {piped_fps:.0f} | "
          f"{piped_fps / local_fps:.2f} |")
    paths = {o["path"] for o in outcomes}
    print(f"(paths seen: {sorted(paths)}; answers {len(outcomes)} for {args.frames} frames)")

    slow = pipeline_run(art, min(args.frames, 1000), 1, args.latency_fps, 0.0, args.data, tmp)
    hop = [o["latency_ms"] - o["head_ms"] for o in slow if o["path"] == "offload"]
    local = [o["head_ms"] for o in slow]
    q = np.percentile(hop, [50, 99])
    print(f"\n2. offload hop at {args.latency_fps:.0f} frames/s, batch of one (max_wait 0)")
    print("| | p50 ms | p99 ms |\n|---|---|---|")
    print(f"| head + exit on the edge | {np.percentile(local, 50):.3f} | "
          f"{np.percentile(local, 99):.3f} |")
    print(f"| added by the offload (capture -> server answer, minus head) | {q[0]:.3f} | "
          f"{q[1]:.3f} |")

    with torch.inference_mode():
        _, features = model.head(pixels)
        reference = model.tail(features).argmax(1).numpy()
    raw_frame = 784
    deflate = np.mean([len(zlib.compress(img.tobytes(), 6)) for img in
                       test.images[:args.frames]])
    print(f"\n3. uplink bytes per offloaded frame (one frame a message, ZeroMQ framing "
          f"included) and accuracy with every frame offloaded; raw frame {raw_frame} B, "
          f"deflate {deflate:.0f} B; coder: {native.coder_status()}")
    print("| dtype | codec | bytes on the wire | scales + payload | encode µs | decode µs | "
          "accuracy % | agrees with float32 |")
    print("|---|---|---|---|---|---|---|---|")
    code = load_server(art).code  # the model's static code, if trained for its uplink
    for dname, dtype in DTYPE_NAMES.items():
        for cname, codec in CODEC_NAMES.items():
            if codec == wire.Codec.STATIC and (code is None or dtype not in wire.UNSIGNED_BITS
                                               or code.symbols != 1 << quantization.BITS[dtype]):
                continue
            sizes, preds, payloads, encode_s, decode_s = [], [], [], 0.0, 0.0
            for i in range(args.frames):
                x = features[i:i + 1].numpy()
                t = time.thread_time()
                msg = wire.encode_request(i, bytes(wire.MODEL_TAG_BYTES), x, dtype, codec, code)
                encode_s += time.thread_time() - t
                sizes.append(wire.wire_bytes(msg))
                payloads.append(len(msg[0]) - wire.REQUEST_HEADER_BYTES)
                t = time.thread_time()
                r = wire.decode_request(msg, code)
                decode_s += time.thread_time() - t
                with torch.inference_mode():
                    preds.append(int(model.tail(torch.from_numpy(r.features)).argmax()))
            preds = np.array(preds)
            print(f"| {dname} | {cname} | {np.mean(sizes):.1f} | {np.mean(payloads):.1f} | "
                  f"{1e6 * encode_s / args.frames:.1f} | {1e6 * decode_s / args.frames:.1f} | "
                  f"{100 * np.mean(preds == labels):.2f} | "
                  f"{100 * np.mean(preds == reference):.2f}% |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
