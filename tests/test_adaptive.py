"""The budget controller on real processes: a broker, one worker and an edge. When the
worker dies mid-stream, an edge holding a target offload ratio stops sending; one with the
trained threshold, fixed, keeps sending and every frame it sends falls back."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter

from pipeline.edge.config import EdgeConfig
from pipeline.edge.producer import run_producer
from workers.pool import ProcessGroup

FRAMES, FPS, TARGET = 600, 100.0, 0.5     # the generated test split twice, over 6 s


def through_a_dying_worker(art, idx_dir, results, observed, target) -> tuple[list, list]:
    """Stream until 30 frames were answered by the worker, kill it; (outcomes final before
    the kill, outcomes final after it)."""
    group = ProcessGroup()
    try:
        front, w0 = observed.broker_and_worker(group, art)
        edge = group.start("edge", run_producer, str(art),
                           EdgeConfig(front, 300.0, results=str(results), max_pack=1,
                                      target_offload=target),
                           "dataset", FPS, FRAMES, str(idx_dir), None, True)
        observed.wait_for("splitexit_edge_frames_total", 30, [edge], path="offload")
        os.kill(w0.pid, signal.SIGKILL)
        killed = int(observed.total("splitexit_edge_frames_total"))
        group.wait([edge])
    finally:
        group.stop()
    outcomes = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(outcomes) == FRAMES
    return outcomes[:killed], outcomes[killed:]   # in the order they became final


def sent(outcomes) -> float:
    """Frames that went to the server: not the exit's, and not shed (an unfamiliar frame
    answered unknown at once while the server's share is cut)."""
    return sum(o["path"] != "exit" and o["reason"] != "shed" for o in outcomes) / len(outcomes)


def fell_back(outcomes) -> float:
    return sum(o["path"] == "fallback" and o["reason"] != "shed"
               for o in outcomes) / len(outcomes)


def test_a_fixed_threshold_keeps_sending_to_a_dead_worker(artifacts, idx_dir, tmp_path,
                                                          observed):
    """The baseline the controller is measured against (the trained threshold offloads
    about half of these frames)."""
    before, after = through_a_dying_worker(artifacts, idx_dir, tmp_path / "r.jsonl",
                                           observed, None)
    assert fell_back(after) > 0.3 and sent(after[len(after) // 2:]) > 0.3


def test_a_stopped_worker_reduces_offload_instead_of_producing_fallbacks(
        artifacts, idx_dir, tmp_path, observed):
    before, after = through_a_dying_worker(artifacts, idx_dir, tmp_path / "r.jsonl",
                                           observed, TARGET)
    assert sent(before) > TARGET - 0.15                  # it did offload while it could
    assert fell_back(after) < 0.15, Counter(o["path"] for o in after)
    settled = after[len(after) // 2:]
    assert sent(settled) <= 0.05, Counter(o["path"] for o in settled)   # a probe trickle
