"""Soak: stream for minutes at a steady rate; memory must stay flat and no frame be lost.

Starts a broker, 2 tail workers and 2 edge producers (real processes, loopback tcp) that
loop over the Fashion-MNIST test set at a fixed rate, and reports the resident memory of
every process after a warm-up and at the end, frames sent vs final answers, and fallbacks
with their reasons.

    python -m benchmarks.soak                        # 10 minutes at 2 x 200 frames/s
    python -m benchmarks.soak --minutes 1 --fps 100
    python -m benchmarks.soak --tiny --artifacts DIR --data IDX_DIR   # 3 s, 1 producer
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks import add_tiny, apply_tiny
from benchmarks.common import read_jsonl, start_pool
from pipeline.model.config import FASHION_MNIST_DIR
from pipeline.edge.config import EdgeConfig
from pipeline.edge.producer import run_producer
from workers.pool import ProcessGroup

WARMUP_S = 20.0


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="runs/default")
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=200.0, help="per producer")
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--warmup-s", type=float, default=WARMUP_S,
                    help="seconds before the first RSS reading")
    ap.add_argument("--every-s", type=float, default=5.0, help="seconds between RSS readings")
    add_tiny(ap)
    args = ap.parse_args()
    apply_tiny(ap, args, minutes=0.05, fps=50.0, producers=1, workers=1, warmup_s=0.5,
               every_s=0.5)

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    frames_each = int(args.fps * args.minutes * 60)
    group = ProcessGroup()
    try:
        front, _, procs = start_pool(group, args.artifacts, args.workers)
        edges = []
        for i in range(args.producers):
            cfg = EdgeConfig(front, 100.0, producer_id=i, results=str(tmp / f"edge-{i}.jsonl"))
            edges.append(group.start(f"edge-{i}", run_producer, args.artifacts, cfg, "dataset",
                                     args.fps, frames_each, args.data, None, True))
            procs[f"edge-{i}"] = edges[-1]
        time.sleep(args.warmup_s)
        start_rss = {name: rss_mib(p.pid) for name, p in procs.items()}
        end_rss = dict(start_rss)
        started = time.monotonic()
        while any(e.is_alive() for e in edges):
            for name, p in procs.items():  # the last reading before each process ends
                value = rss_mib(p.pid)
                if value is not None and (not name.startswith("edge") or p.is_alive()):
                    end_rss[name] = value
            time.sleep(args.every_s)
            print(f"I: {time.monotonic() - started:.0f} s", flush=True)
    finally:
        group.stop()

    per_edge = [read_jsonl(path) for path in sorted(tmp.glob("edge-*.jsonl"))]
    outcomes = [o for edge in per_edge for o in edge]
    sent = frames_each * args.producers
    unique = sum(len({o["frame"] for o in edge}) for edge in per_edge)
    paths = Counter(o["path"] for o in outcomes)
    reasons = Counter(o["reason"] for o in outcomes if o["reason"])
    print(f"\nsoak: {args.minutes:g} min at {args.producers} x {args.fps:g} frames/s, "
          f"{args.workers} workers; RSS after {args.warmup_s:g} s warm-up and at the end")
    print("| process | RSS start MiB | RSS end MiB | change |\n|---|---|---|---|")
    for name in procs:
        a, b = start_rss[name], end_rss[name]
        change = f"{100 * (b - a) / a:+.1f}%" if a and b else "—"
        start, end = (f"{v:.1f}" if v else "— (ended before the warm-up did)" for v in (a, b))
        print(f"| {name} | {start} | {end} | {change} |")
    print(f"\nframes sent {sent}, final answers {len(outcomes)}, unique {unique}, "
          f"lost {sent - unique}")
    print(f"paths {dict(paths)}; fallbacks by reason {dict(reasons) or 'none'}")


if __name__ == "__main__":
    main()
