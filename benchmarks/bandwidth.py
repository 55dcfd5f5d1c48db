"""Bytes on the network against accuracy: bottleneck width x bits x coder, on Fashion-MNIST.

Each configuration trains for each seed into runs/bandwidth/NAME-sSEED (kept: a second run
only measures), calibrated on validation at its target offload. Then, on the 10 000 test
frames and through the real wire (pipeline.protocol.wire): the exit decides on every frame
with the NumPy head, offloaded frames run the bottleneck, are encoded with each coder (none,
lz4, the model's static code) and decoded, and the tail answers the decoded features.
Reported per configuration, mean ± sd over seeds: head parameters, bytes per offloaded
frame (every ZeroMQ frame counted) for each coder and the best, average bytes per frame,
the share answered on the edge, and split+exit accuracy. The PNG plots accuracy against
average bytes per frame, with the raw frame and its deflate marked.

    python -m benchmarks.bandwidth                     # the grid below, 3 seeds, 2 at a time
    python -m benchmarks.bandwidth --seeds 1 --only b32x4 default
    python -m benchmarks.bandwidth --tiny --data IDX_DIR --runs DIR   # 1 seed, 1 epoch, 1 model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks import add_tiny, apply_tiny
from benchmarks.common import DEFAULT_BEFORE_BANDWIDTH
from pipeline.model.config import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]

# 38 % offloaded on validation: at least 60 % of test frames answered on the edge (the goal)
OFFLOAD = "calibrate.target_offload=0.38"
BOTTLENECK = ["model.split=2", "model.exit_fan_out=0", OFFLOAD]


def bottleneck(width: int, fan_out: int, bits: int, exit_at: int = 2, tail: int = 256):
    """A 800-400 (fan-out 2) head, then a `width`-wide bottleneck at the split sent as
    `bits`-bit codes; the exit reads the bottleneck (exit_at 2) or the 400 layer (1)."""
    return ("default", [*DEFAULT_BEFORE_BANDWIDTH, f"model.widths=[800, 400, {width}, {tail}, 10]",
                        f"model.fan_out=[2, {fan_out}, {tail}, 10]", f"model.exit_at={exit_at}",
                        f"model.uplink_bits={bits}", *BOTTLENECK])


def uint4(rate: float, tail: tuple[int, ...] = (100,)):
    """No bottleneck: the 400 features at the split trained for 4-bit codes, with a penalty
    of `rate` on their mean magnitude (cheap for the static code), and a dense `tail`."""
    hidden = ", ".join(map(str, tail))
    return ("default", [*DEFAULT_BEFORE_BANDWIDTH, f"model.widths=[800, 400, {hidden}, 10]",
                        f"model.fan_out=[2, {hidden}, 10]", "model.uplink_bits=4",
                        f"train.rate_weight={rate}", OFFLOAD])


# name: (config, overrides). The references first, then the frontier's candidates; "default"
# is configs/default.toml as shipped, the same model as "x4 rate1.0 tail1024".
GRID = {
    "paper-dense": ("paper-dense", []),
    "paper-sparse": ("paper-sparse", []),
    "old default": ("default", DEFAULT_BEFORE_BANDWIDTH),
    "default": ("default", []),
    "b16x4": bottleneck(16, 10, 4),
    "b32x2": bottleneck(32, 12, 2),
    "b32x4": bottleneck(32, 12, 4),
    "b32x8": bottleneck(32, 12, 8),
    "b64x2": bottleneck(64, 8, 2),
    "b64x4": bottleneck(64, 8, 4),
    "b48x4": bottleneck(48, 12, 4),
    "b32x4 tail512": bottleneck(32, 12, 4, tail=512),
    # the exit on the 400 layer (sparse, as the default's): the bottleneck runs on offloads only
    "b32x4 exit@400": ("default", [*bottleneck(32, 10, 4, exit_at=1)[1],
                                   "model.exit_fan_out=5"]),
    "x4": uint4(0.0),
    "x4 rate0.1": uint4(0.1),
    "x4 rate0.3": uint4(0.3),
    "x4 rate0.6": uint4(0.6),
    "x4 rate1.0": uint4(1.0),
    "x4 rate1.0 tail256x2": uint4(1.0, (256, 256)),
    "x4 rate1.0 tail512x2": uint4(1.0, (512, 512)),
    "x4 rate0.8 tail1024": uint4(0.8, (1024,)),
    # conv heads (#15): predefined-sparse channel connectivity, and its dense twin
    "conv-sparse": ("conv-sparse", []),
    "conv-dense": ("conv-dense", []),
}
# What a row's head is compared with: its dense twin's (head params, head MACs); the MLPs'
# is paper-dense (800-40 dense, exit 40-10).
DENSE_TWINS = {"conv-sparse": "conv-dense"}
DENSE_TWIN_PARAMS, DENSE_TWIN_MACS = 32_450, 32_400
GOAL_ACCURACY = 88.1  # % split+exit: the dense twin's full model (notes/accuracy-study.md)


def train(name: str, seed: int, out: Path, threads: int, extra: list[str] | None = None) -> None:
    config, overrides = GRID[name]
    if (out / "metrics.json").is_file():
        return
    sets = [a for o in [*overrides, f"train.seed={seed}", f"model.name='{name}'", *(extra or [])]
            for a in ("--set", o)]
    subprocess.run([sys.executable, "-m", "pipeline.cli", "train", config, "--out", str(out),
                    "--quiet", "--threads", str(threads), *sets], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    print(f"I: trained {out}", file=sys.stderr, flush=True)


def measure(out: Path, pixels: np.ndarray, labels: np.ndarray) -> dict:
    """One trained model through the real wire, every test frame."""
    import torch

    from pipeline.edge.config import wire_dtype
    from pipeline.edge.numpy_head import exit_scores, load_numpy_head
    from pipeline.model.artifacts import load_server
    from pipeline.protocol import wire

    head, server = load_numpy_head(out), load_server(out)
    metrics = json.loads((out / "metrics.json").read_text())
    exit_logits, hidden = head.run_exit(pixels)
    local = exit_scores(exit_logits, head.score, head.temperature) >= head.threshold
    sent = np.flatnonzero(~local)
    features = head.run_uplink(hidden[sent])
    dtype = wire_dtype("auto", head.uplink_bits)
    coders = {"none": wire.Codec.NONE, "lz4": wire.Codec.LZ4}
    if head.code is not None:  # Huffman or rANS, the smaller for each message
        coders["static"] = wire.Codec.STATIC
    tag = wire.model_tag(head.model_id)
    sizes, decoded = {}, None
    for name, codec in coders.items():
        msgs = [wire.encode_request(i + 1, tag, features[i:i + 1], dtype, codec, head.code)
                for i in range(len(sent))]
        sizes[name] = float(np.mean([wire.wire_bytes(m) for m in msgs]))
        decoded = np.concatenate([wire.decode_request(m, server.code).features for m in msgs])
    with torch.inference_mode():
        tail_cls = server.tail(torch.from_numpy(decoded)).argmax(1).numpy()
    answers = exit_logits.argmax(1)
    answers[sent] = tail_cls
    best = min(sizes.values())
    return {"head_params": metrics["structure"]["edge_params"],
            "head_macs": metrics["structure"]["edge_macs"],
            "edge_bytes": (out / "edge.npz").stat().st_size, "bytes": sizes,
            "best_bytes": best, "per_frame": best * len(sent) / len(pixels),
            "local": float(local.mean()), "accuracy": float((answers == labels).mean()),
            "dtype": dtype.name.lower()}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", nargs="+", choices=list(GRID), help="configurations to run")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bandwidth"))
    ap.add_argument("--parallel", type=int, default=2, help="trainings at a time, 1 thread each")
    ap.add_argument("--png", help="the plot (default: RUNS/frontier.png)")
    ap.add_argument("--data", default=FASHION_MNIST_DIR, help="IDX folder (default: %(default)s)")
    ap.add_argument("--epochs", type=int, help="override every configuration's epochs")
    add_tiny(ap)
    args = ap.parse_args()
    apply_tiny(ap, args, seeds=1, only=["paper-sparse"], epochs=1, parallel=1)
    names = args.only or list(GRID)
    extra = [*([f"data.dir={args.data!r}"] if args.data != FASHION_MNIST_DIR else []),
             *([f"train.epochs={args.epochs}"] if args.epochs else [])]
    runs = Path(args.runs)
    jobs = [(n, s, runs / f"{n.replace(' ', '_').replace('@', 'at')}-s{s}")
            for n in names for s in range(args.seeds)]
    with ThreadPoolExecutor(args.parallel) as pool:
        for f in [pool.submit(train, n, s, out, 1, extra) for n, s, out in jobs]:
            f.result()

    from pipeline.floor.data import load_test_split

    test = load_test_split(args.data)
    pixels, labels = test.images.astype(np.float32) / 255, test.labels
    deflate = float(np.mean([len(zlib.compress(i.tobytes(), 6)) for i in test.images]))
    results: dict[str, list[dict]] = {}
    for n, _, out in jobs:
        results.setdefault(n, []).append(measure(out, pixels, labels))

    source = "Fashion-MNIST" if args.data == FASHION_MNIST_DIR else args.data
    print(f"\n{source} test set, {args.seeds} seed(s) each (mean ± sd); bytes count every "
          f"ZeroMQ frame; raw frame 784 B, deflate {deflate:.0f} B")
    print("| model | head params | head MACs | vs dense twin (params / MACs) | edge.npz B | "
          "uplink | B/offloaded: none | lz4 | static | best | B per frame | answered on edge | "
          "split+exit accuracy % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, rs in results.items():
        params, macs = rs[0]["head_params"], rs[0]["head_macs"]
        twin = results.get(DENSE_TWINS.get(n, ""))
        twin_params, twin_macs = ((twin[0]["head_params"], twin[0]["head_macs"]) if twin
                                  else (DENSE_TWIN_PARAMS, DENSE_TWIN_MACS))
        versus = ("—" if n in DENSE_TWINS.values() or n == "paper-dense" or
                  (n in DENSE_TWINS and not twin) else
                  f"{twin_params / params:.1f}x / {twin_macs / macs:.1f}x fewer")
        by = {c: mean_sd([r["bytes"][c] for r in rs]) if c in rs[0]["bytes"] else "-"
              for c in ("none", "lz4", "static")}
        print(f"| {n} | {params} | {macs} | {versus} | {rs[0]['edge_bytes']} | "
              f"{rs[0]['dtype']} | {by['none']} | {by['lz4']} | {by['static']} | "
              f"{mean_sd([r['best_bytes'] for r in rs])} | "
              f"{mean_sd([r['per_frame'] for r in rs])} | "
              f"{mean_sd([100 * r['local'] for r in rs])} % | "
              f"{mean_sd([100 * r['accuracy'] for r in rs])} |")
    plot(results, deflate, Path(args.png or runs / "frontier.png"))


def plot(results: dict, deflate: float, png: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("I: no matplotlib: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(10, 6))
    for i, (n, rs) in enumerate(results.items()):
        x = [r["per_frame"] for r in rs]
        y = [100 * r["accuracy"] for r in rs]
        shipped = n == "default"
        ax.errorbar(statistics.mean(x), statistics.mean(y),
                    yerr=statistics.stdev(y) if len(y) > 1 else 0, fmt="*" if shipped else "o",
                    markersize=14 if shipped else 6, capsize=3)
        # neighbours alternate above and below their point, so close labels stay legible
        ax.annotate(n, (statistics.mean(x), statistics.mean(y)), textcoords="offset points",
                    xytext=(6, 4 if i % 2 else -11), fontsize=9 if shipped else 7,
                    fontweight="bold" if shipped else "normal")
    for label, x in (("raw frame, every frame sent", 784), ("deflate, every frame", deflate)):
        ax.axvline(x, linestyle="--", color="grey")
        ax.annotate(label, (x, ax.get_ylim()[0]), rotation=90, fontsize=7, va="bottom")
    ax.axhline(GOAL_ACCURACY, linestyle=":", color="grey")
    ax.annotate("the dense twin's full model (the goal)", (ax.get_xlim()[0], GOAL_ACCURACY),
                fontsize=7, va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on the network per frame (average over all frames)")
    ax.set_ylabel("split + exit accuracy on the test set (%)")
    ax.set_title("Fashion-MNIST: accuracy against uplink bytes")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"I: wrote {png}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
