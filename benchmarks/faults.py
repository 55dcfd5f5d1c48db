"""Faults, measured: for each, frames sent, final answers, fallbacks and duplicates discarded.

Real processes on loopback: a broker, 2 tail workers; the edge producer runs in this process
(so its duplicate count is read directly) while a timer injects the fault mid-stream.
(The cut and throttled links between network namespaces are in tests/test_netns.py; run it
with `pytest -s tests/test_netns.py` to see the same figures.)

    python -m benchmarks.faults                 # runs/default, 2000 frames at 200 frames/s
    python -m benchmarks.faults --tiny --artifacts DIR --data IDX_DIR   # 200 frames, fault at 0.3 s
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path

from benchmarks import add_tiny, apply_tiny
from benchmarks.common import read_jsonl, start_pool
from workers.config import BrokerConfig
from workers.broker import run_broker
from pipeline.model.config import FASHION_MNIST_DIR
from pipeline.edge.config import EdgeConfig
from pipeline.edge.producer import run_producer
from workers.pool import ProcessGroup


def scenario(name, fault, args, tmp: Path, max_wait_ms: float = 2.0) -> dict:
    group = ProcessGroup()
    front, back, procs = start_pool(group, args.artifacts, 2, max_wait_ms)
    results = tmp / f"{''.join(c if c.isalnum() else '-' for c in name)}.jsonl"
    cfg = EdgeConfig(front, args.deadline_ms, results=str(results), max_pack=1)
    timer = threading.Timer(args.fault_at_s, fault, (group, procs, front, back))
    try:
        timer.start()
        summary = run_producer(args.artifacts, cfg, "dataset", args.fps, args.frames,
                               args.data)
    finally:
        timer.cancel()
        timer.join()   # a fault under way ends first: no broker started after the stop
        group.stop()
    outcomes = read_jsonl(results)
    return {"fault": name, "sent": args.frames, "answers": len(outcomes),
            "unique": len({o["frame"] for o in outcomes}),
            "fallbacks": dict(Counter(o["reason"] for o in outcomes if o["reason"])),
            "offloaded": sum(o["path"] == "offload" for o in outcomes),
            "duplicates": summary.duplicates}


def kill_worker(group, procs, front, back):
    os.kill(procs["w0"].pid, signal.SIGKILL)


def stall_worker(group, procs, front, back, stuck_s: float = 3.0):
    os.kill(procs["w0"].pid, signal.SIGSTOP)
    time.sleep(stuck_s)   # past the heartbeat liveness: the broker gives its work to w1
    os.kill(procs["w0"].pid, signal.SIGCONT)  # ... and it answers late


def restart_broker(group, procs, front, back, outage_s: float = 1.0):
    os.kill(procs["broker"].pid, signal.SIGKILL)
    time.sleep(outage_s)
    group.start("broker-2", run_broker, BrokerConfig(front, back))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="runs/default")
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--fps", type=float, default=200.0)
    ap.add_argument("--deadline-ms", type=float, default=500.0)
    ap.add_argument("--fault-at-s", type=float, default=4.0)
    ap.add_argument("--stuck-s", type=float, default=3.0, help="how long a worker is stopped")
    ap.add_argument("--outage-s", type=float, default=1.0, help="how long the broker is down")
    add_tiny(ap)
    args = ap.parse_args()
    apply_tiny(ap, args, frames=300, fps=300.0, fault_at_s=0.3, stuck_s=0.3, outage_s=0.2)
    tmp = Path(tempfile.mkdtemp(prefix="faults-"))
    rows = [scenario("none", lambda *a: None, args, tmp),
            scenario("worker SIGKILL", kill_worker, args, tmp, max_wait_ms=50.0),
            scenario(f"worker stuck {args.stuck_s:g} s (SIGSTOP/SIGCONT)",
                     partial(stall_worker, stuck_s=args.stuck_s), args, tmp, max_wait_ms=50.0),
            scenario(f"broker SIGKILL, restarted after {args.outage_s:g} s",
                     partial(restart_broker, outage_s=args.outage_s), args, tmp)]
    print(f"\n{args.frames} frames at {args.fps:g} frames/s, deadline {args.deadline_ms:g} "
          f"ms, fault at {args.fault_at_s:g} s")
    print("| fault | frames sent | final answers | unique | offloaded | fallbacks by reason "
          "| duplicates discarded |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['sent']} | {r['answers']} | {r['unique']} | "
              f"{r['offloaded']} | {r['fallbacks'] or 'none'} | {r['duplicates']} |")


if __name__ == "__main__":
    main()
