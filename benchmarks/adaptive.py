"""The budget controller against a fixed threshold, side by side (issue #13's goals).

Real processes on loopback: a broker and tail workers; the edge producer runs in this process,
so the benchmark changes things mid-stream at known times (stops a worker, starts one,
halves the uplink budget). Every scenario replays the Fashion-MNIST test set through the same
trained model (runs/default) twice: once with the trained threshold fixed, once with the
controller.

    python -m benchmarks.adaptive                   # all scenarios, ~2 minutes
    python -m benchmarks.adaptive --only capacity   # one of: target capacity budget shadow ece
    python -m benchmarks.adaptive --tiny --artifacts DIR --data IDX_DIR --ece-dirs DIR
                                                    # every scenario at a tenth of its length

Server capacity is emulated where a scenario needs it to bind: a paced worker sleeps
PER_FRAME_S for every frame after its real tail call, so it serves at most 1 / PER_FRAME_S
frames per second however busy the 2 cores are (the real tail alone serves ~6 000).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from benchmarks import add_tiny, apply_tiny
from benchmarks.common import free_port, metrics, read_jsonl
from monitoring.exposition import total
from monitoring.metrics import READY
from pipeline.edge.config import EdgeConfig
from pipeline.edge.async_edge import AsyncEdge
from pipeline.edge.results import Summary
from pipeline.edge.sources import open_source
from pipeline.model.config import FASHION_MNIST_DIR
from workers.broker import run_broker
from workers.config import BrokerConfig, WorkerConfig
from workers.pool import ProcessGroup, START_TIMEOUT_S, wait_until

PER_FRAME_S = 0.005             # a paced worker: at most 200 frames/s
SETTLE_WINDOW_S = 1.0           # fallbacks are judged per window of this length


def run_paced_worker(artifacts: str, cfg: WorkerConfig, name: str, per_frame_s: float) -> None:
    """A real tail worker that then sleeps per frame it answered: a slower server."""
    from workers import tail_worker

    run_batch = tail_worker.TailWorker._run_batch

    def paced(self) -> None:
        before = self.frames
        run_batch(self)
        time.sleep((self.frames - before) * per_frame_s)

    tail_worker.TailWorker._run_batch = paced
    tail_worker.run_worker(artifacts, cfg, name)


class Pool:
    """A broker and named workers (w0, w1, ... to start with) on fresh loopback ports, paced
    or as fast as they go."""

    def __init__(self, artifacts: str, paced: bool, workers: int = 2):
        self.artifacts, self.paced = artifacts, paced
        self.registry = metrics()    # before any child starts: they write where it reads
        self.group = ProcessGroup()
        self.front = f"tcp://127.0.0.1:{free_port()}"
        self.back = f"tcp://127.0.0.1:{free_port()}"
        self.workers: dict[str, object] = {}
        # Requests queued past the edges' deadline are dropped, as `up` configures it: serving
        # them would only make the next ones late too (for both edges compared).
        self.group.start("broker", run_broker, BrokerConfig(
            self.front, self.back, queue_timeout_s=EdgeConfig.deadline_ms / 1000))
        self._confirmed = 0
        try:
            for i in range(workers):
                self.add(f"w{i}")
        except BaseException:
            self.close()
            raise

    def add(self, name: str, wait: bool = True) -> None:
        from workers.tail_worker import run_worker

        cfg = WorkerConfig(self.back, max_batch=8 if self.paced else 64)
        self.workers[name] = (self.group.start(name, run_paced_worker, self.artifacts, cfg,
                                               name, PER_FRAME_S) if self.paced
                              else self.group.start(name, run_worker, self.artifacts, cfg, name))
        self._confirmed += 1
        if wait:
            n = self._confirmed
            wait_until(lambda: total(self.registry, READY, role="worker") >= n, START_TIMEOUT_S,
                       f"{name} confirmed by the broker", list(self.workers.values()))

    def stop(self, name: str) -> None:
        """SIGTERM: the worker drains what it holds and leaves; capacity drops at once."""
        os.kill(self.workers[name].pid, signal.SIGTERM)
        self._confirmed -= 1

    def close(self) -> None:
        self.group.stop()


def stream(args, pool: Pool, cfg: EdgeConfig, frames: int, fps: float, results: Path,
           events: list = (), threshold: float | None = None) -> tuple[list[dict], dict, Summary]:
    """Replay `frames` test frames (looping) at `fps` through an in-process edge; `events`
    are (seconds after the start, what to call with the producer). Returns (outcomes in
    capture order, {event name: wall time it happened}, the edge's summary)."""
    cfg = replace(cfg, broker=pool.front, results=str(results))
    happened: dict[str, float] = {}

    async def main():
        producer = AsyncEdge(args.artifacts, cfg, registry=CollectorRegistry())
        if threshold is not None:
            producer.threshold = threshold
        loop = asyncio.get_running_loop()
        for at_s, name, action in events:
            loop.call_later(at_s, lambda n=name, a=action: (a(producer),
                                                            happened.setdefault(n, time.time())))
        return await producer.run(source)

    source = open_source("dataset", fps=fps, limit=frames, data_dir=args.data, loop=True)
    try:
        summary = asyncio.run(main())
    finally:
        source.close()
    return sorted(read_jsonl(results), key=lambda o: o["capture_ts"]), happened, summary


def share(outcomes, counted) -> float | None:
    """The fraction of `outcomes` that `counted` holds for; None for none (a window that a
    --tiny run is too short to reach)."""
    return sum(map(counted, outcomes)) / len(outcomes) if outcomes else None


def offload(outcomes) -> float | None:
    return share(outcomes, lambda o: o["path"] != "exit")


def fallbacks(outcomes) -> float | None:
    return share(outcomes, lambda o: o["path"] == "fallback")


def accuracy(outcomes) -> float | None:
    return share(outcomes, lambda o: o["cls"] == o["label"])


def between(outcomes, start: float, end: float = float("inf")) -> list[dict]:
    return [o for o in outcomes if start <= o["capture_ts"] < end]


def settled_after(outcomes, start: float, end: float, limit: float = 0.01) -> float | None:
    """Seconds after `start` from which every SETTLE_WINDOW_S window up to `end` had at most
    `limit` of its frames fall back; None if the last window still had more."""
    t, last_bad = start, None
    while t + SETTLE_WINDOW_S <= end:
        window = between(outcomes, t, t + SETTLE_WINDOW_S)
        if window and fallbacks(window) > limit:
            last_bad = t + SETTLE_WINDOW_S
        t += SETTLE_WINDOW_S / 4
    if last_bad is not None and last_bad + SETTLE_WINDOW_S > end:
        return None
    return 0.0 if last_bad is None else last_bad - start


def fixed_threshold_for(artifacts: str, target: float) -> float:
    """The threshold a fixed policy would use for `target`: chosen on validation, as
    `splitexit calibrate --target-offload` would, without rewriting the artifacts."""
    from pipeline.model import calibrate as cal
    from pipeline.model.artifacts import load_model
    from pipeline.model.config import CalibrationConfig
    from pipeline.model.train import dataset, predict

    model, edge, _ = load_model(artifacts)
    val = dataset(edge.config).val     # the split it was trained and calibrated with
    exit_logits, final_logits = predict(model, val)
    labels = val.labels
    result = cal.sweep(cal.exit_scores(exit_logits, edge.score, edge.temperature),
                       (exit_logits.argmax(1).numpy() == labels),
                       (final_logits.argmax(1).numpy() == labels))
    return cal.choose_threshold(result, CalibrationConfig(policy="offload",
                                                          target_offload=target))


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f} %"


# -- scenarios ---------------------------------------------------------------------------------

def target(args, tmp: Path) -> None:
    """Target offload 30 %: realized within 2 points after 500 frames, accuracy as fixed."""
    settle = int(500 * args.scale)
    fixed = fixed_threshold_for(args.artifacts, 0.3)
    pool = Pool(args.artifacts, paced=False)
    try:
        rows = []
        for name, cfg, threshold in (
                ("fixed threshold (30 % on validation)", EdgeConfig(), fixed),
                ("controller, target 0.30", EdgeConfig(target_offload=0.3), None)):
            outcomes, _, _ = stream(args, pool, cfg, args.frames, args.fps,
                                 tmp / f"target-{len(rows)}.jsonl", threshold=threshold)
            after = outcomes[settle:]
            rows.append((name, pct(offload(after)), pct(accuracy(outcomes)),
                         pct(fallbacks(outcomes))))
    finally:
        pool.close()
    print(f"\n## Target offload 30 % ({args.frames} test frames at {args.fps:.0f} frames/s, "
          f"2 workers)\n")
    print(f"| edge | offload after {settle} frames | accuracy | fallbacks |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def capacity(args, tmp: Path) -> None:
    """Two paced workers (2 x 200 frames/s) serve 30 % of 1 000 frames/s; one stops at
    `stop_s` (200 < the 300 needed), a new one starts at `restore_s`."""
    stop_s, restore_s, frames, fps = 6.0 * args.scale, 14.0 * args.scale, 20_000, 1000.0
    frames, settle_s = int(frames * args.scale), 2.0 * args.scale
    rows = []
    fixed = fixed_threshold_for(args.artifacts, 0.3)
    for name, cfg, threshold in (("fixed threshold (30 %)", EdgeConfig(), fixed),
                                 ("controller, target 0.30", EdgeConfig(target_offload=0.3),
                                  None)):
        pool = Pool(args.artifacts, paced=True)
        try:
            outcomes, at, _ = stream(
                args, pool, cfg, frames, fps, tmp / f"capacity-{len(rows)}.jsonl",
                [(stop_s, "stop", lambda p: pool.stop("w1")),
                 (restore_s, "restore", lambda p: pool.add("w2", wait=False))], threshold)
        finally:
            pool.close()
        start = outcomes[0]["capture_ts"]
        end = outcomes[-1]["capture_ts"]
        halved, restored = at["stop"], at["restore"]
        settle = settled_after(outcomes, halved, restored)
        back = between(outcomes, restored + settle_s, end)
        rows.append((name, pct(offload(between(outcomes, start, halved))),
                     pct(offload(between(outcomes, halved, restored))),
                     pct(fallbacks(between(outcomes, halved, restored))),
                     pct(fallbacks(between(outcomes, halved + settle_s, restored))),
                     "never" if settle is None else f"{settle:.2f} s",
                     pct(offload(back)), pct(fallbacks(back)), pct(accuracy(outcomes))))
    print(f"\n## Server capacity halves ({frames} frames at {fps:.0f} frames/s; 2 workers of "
          f"{1 / PER_FRAME_S:.0f} frames/s each; w1 stopped at {stop_s:g} s, a new worker "
          f"at {restore_s:g} s)\n")
    print(f"| edge | offload, 2 workers | offload, 1 worker | fallbacks, 1 worker | ... from "
          f"+{settle_s:g} s | every 1 s window <= 1 % after | offload, restored (+{settle_s:g} "
          f"s) | fallbacks, restored | accuracy |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def budget(args, tmp: Path) -> None:
    """An uplink budget of `budget_bps`, halved at `halve_s`."""
    budget_bps, halve_s, frames, fps = 12_000.0, 8.0 * args.scale, 16_000, 1000.0
    frames, settle_s = int(frames * args.scale), 2.0 * args.scale
    rows = []
    for name, cfg in (("fixed threshold (trained)", EdgeConfig()),
                      (f"controller, budget {budget_bps:.0f} B/s",
                       EdgeConfig(uplink_budget=budget_bps))):
        pool = Pool(args.artifacts, paced=False)
        try:
            outcomes, at, _ = stream(
                args, pool, cfg, frames, fps, tmp / f"budget-{len(rows)}.jsonl",
                [(halve_s, "halve", lambda p: p.controller and p.controller.retarget(
                    uplink_budget=budget_bps / 2))])
        finally:
            pool.close()
        start, end = outcomes[0]["capture_ts"], outcomes[-1]["capture_ts"]
        halved = at["halve"]

        def rate(a, b):
            return sum(o["uplink_bytes"] for o in between(outcomes, a, b)) / max(b - a, 1e-3)

        full, half = rate(start + settle_s, halved), rate(halved + settle_s, end)
        rows.append((name, f"{full:.0f} ({full / budget_bps - 1:+.1%})",
                     f"{half:.0f} ({half / (budget_bps / 2) - 1:+.1%})",
                     pct(offload(between(outcomes, halved + settle_s, end))),
                     pct(accuracy(outcomes))))
    print(f"\n## Uplink budget halved ({frames} frames at {fps:.0f} frames/s; "
          f"{budget_bps:.0f} B/s, then {budget_bps / 2:.0f} B/s from {halve_s:g} s; "
          f"bytes/s measured from {settle_s:g} s after the start and after the change)\n")
    print("| edge | B/s, full budget (vs budget) | B/s, half budget (vs half) | offload, "
          "half budget | accuracy |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def shadow(args, tmp: Path) -> None:
    """Shadows at 2 %: the agreement they estimate vs the true exit-vs-tail agreement over
    every exited frame of the replay (each sent through the same wire and tail offline)."""
    from pipeline.edge.numpy_head import exit_scores, load_numpy_head
    from pipeline.model.artifacts import load_server
    from pipeline.floor.data import load_test_split
    from pipeline.protocol import wire
    import torch

    pool = Pool(args.artifacts, paced=False)
    try:
        outcomes, _, summary = stream(args, pool, EdgeConfig(shadow=0.02), args.frames, args.fps,
                              tmp / "shadow.jsonl")
    finally:
        pool.close()
    shadows = summary.shadows
    head, server = load_numpy_head(args.artifacts), load_server(args.artifacts)
    test = load_test_split(args.data)
    pixels = test.images.astype(np.float32) / 255
    exit_logits, hidden = head.run_exit(pixels)
    exited = exit_scores(exit_logits, head.score, head.temperature) >= head.threshold
    features = head.run_uplink(hidden[exited])
    dtype = wire.DTYPE_FOR_BITS.get(head.uplink_bits, wire.DType.INT8)
    step = wire.MAX_FRAMES_PER_REQUEST
    sent = np.concatenate([wire.decode_request(wire.encode_request(
        1, b"tag!", features[i:i + step], dtype, wire.Codec.NONE)).features
        for i in range(0, len(features), step)])
    with torch.inference_mode():
        tail_cls = server.tail(torch.from_numpy(sent)).argmax(1).numpy()
    exit_cls = exit_logits[exited].argmax(1)
    truth = float((tail_cls == exit_cls).mean())
    true_acc = float((exit_cls == test.labels[exited]).mean())
    print(f"\n## Shadows at 2 % ({len(outcomes)} test frames, {int(exited.sum())} answered "
          f"by the exit)\n")
    print("| | shadows | estimate | truth (every exited frame) | error |\n|---|---|---|---|---|")
    print(f"| exit-vs-tail agreement | {shadows.answered} answered of {shadows.sent} | "
          f"{pct(shadows.agreement)} | {pct(truth)} | "
          f"{100 * (shadows.agreement - truth):+.2f} points |")
    print(f"| exit accuracy, the tail judging | | {pct(shadows.exit_accuracy)} | "
          f"{pct(true_acc)} (labels) | {100 * (shadows.exit_accuracy - true_acc):+.2f} points |")


def ece(args, tmp: Path) -> None:
    """Expected calibration error of the exit and the tail on test, before and after the
    temperature fitted on validation, and its floor (what a perfectly calibrated classifier
    with the same confidences shows on 10 000 frames), for every trained folder given."""
    import json

    print("\n## Calibration (15-bin ECE on the test set; temperature fitted on validation)\n")
    print("| model | exit ECE before | after (T) | floor | tail ECE before | after (T) | floor |"
          "\n|---|---|---|---|---|---|---|")
    for folder in args.ece_dirs:
        path = Path(folder) / "metrics.json"
        if not path.is_file():
            continue
        q = json.loads(path.read_text())["calibration"].get("confidence")
        if not q or "test_ece_floor" not in q["exit"]:
            print(f"| {folder} | (calibrated by an older splitexit: run `splitexit calibrate "
                  f"{folder}`) | | | | | |")
            continue
        print(f"| {folder} | " + " | ".join(
            f"{c['test_ece_before']:.4f} | {c['test_ece_after']:.4f} ({c['temperature']:.2f}) "
            f"| {c['test_ece_floor']:.4f}" for c in (q["exit"], q["final"])) + " |")


SCENARIOS = {"target": target, "capacity": capacity, "budget": budget, "shadow": shadow,
             "ece": ece}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="runs/default")
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--fps", type=float, default=2000.0)
    ap.add_argument("--only", choices=list(SCENARIOS), action="append")
    ap.add_argument("--ece-dirs", nargs="*", default=["runs/default", "runs/paper-sparse",
                                                      "runs/paper-dense"])
    ap.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    add_tiny(ap)
    args = ap.parse_args()
    apply_tiny(ap, args, frames=300, scale=0.1)
    tmp = Path(tempfile.mkdtemp(prefix="adaptive-"))
    for name in args.only or SCENARIOS:
        SCENARIOS[name](args, tmp)


if __name__ == "__main__":
    main()
