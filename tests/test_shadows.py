"""Shadows measure the exit in production: a sample of the frames it answered also goes to
the server. Their answers are measurements only: never a frame's answer, never an offload."""

import json
from collections import Counter

import numpy as np
import pytest

from pipeline.edge.config import EdgeConfig
from pipeline.edge.producer import run_producer
from pipeline.edge.shadows import SHADOW_TIMEOUT_S, Shadows
from pipeline.protocol.wire import Error, Refusal, Reply
from workers.pool import ProcessGroup


def reply(msg_id, classes, confidences):
    return Reply(msg_id, "w", np.array(classes, np.uint8), np.array(confidences, np.float32),
                 0, 0, 1)


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.5, 1.0])
def test_sampling_is_systematic_and_takes_the_fraction_asked(fraction):
    s = Shadows(fraction)
    rng = np.random.default_rng(0)
    picked = sum(len(s.pick(int(n))) for n in rng.integers(0, 9, 2000))
    exited = sum(int(n) for n in np.random.default_rng(0).integers(0, 9, 2000))
    assert abs(picked - fraction * exited) <= 1


def test_agreement_and_the_exit_accuracy_the_tail_judges():
    s = Shadows(1.0)
    s.open(1, [3, 5], now=0.0)
    s.open(2, [7], now=0.0)
    s.open(3, [1], now=0.0)
    assert s.answer(reply(1, [3, 4], [0.9, 0.8]))          # agrees on one frame of two
    assert s.answer(reply(2, [7], [0.7]))
    assert s.refuse(Error(3, Refusal.BUSY, "shadows go only to free credit"))
    assert not s.answer(reply(9, [0], [1.0]))               # not a shadow: the table's
    c = s.counts
    assert (c.sent, c.answered, c.dropped, c.agreed) == (4, 3, 1, 2)
    assert c.agreement == pytest.approx(2 / 3)
    assert c.exit_accuracy == pytest.approx((0.9 + 0.7) / 3)


def test_unanswered_shadows_are_bounded_and_dropped_when_stale():
    s = Shadows(1.0, max_outstanding=2)
    s.open(1, [0], now=0.0)
    s.open(2, [0], now=1.0)
    assert not s.room(now=2.0)                             # two wait: send no more
    assert s.room(now=SHADOW_TIMEOUT_S + 0.5)              # the first went stale
    assert s.counts.dropped == 1
    assert s.answer(reply(2, [0], [0.9]))                  # a late answer still counts
    s.open(3, [0, 1], now=20.0)
    s.close()                                              # the stream ended unanswered
    assert (s.counts.sent, s.counts.answered, s.counts.dropped) == (4, 1, 3)


def test_shadows_never_change_an_answer_and_never_count_as_offloads(artifacts, idx_dir,
                                                                    tmp_path, observed):
    """Two edges replay the same frames through one broker and worker, one shadowing every
    frame its exit answers: frame by frame the same final answers, the same offloads, the
    same uplink bytes, and the shadows answered (or turned away by a busy broker)."""
    group = ProcessGroup()
    try:
        front, _ = observed.broker_and_worker(group, artifacts)
        edges = [group.start(f"edge{i}", run_producer, str(artifacts),
                             EdgeConfig(front, 10_000.0, producer_id=i, shadow=float(i),
                                        max_pack=1, results=str(tmp_path / f"{i}.jsonl")),
                             "dataset", 200.0, None, str(idx_dir)) for i in (0, 1)]
        group.wait(edges)
        totals = {name: [observed.total(f"splitexit_edge_{name}_total", producer=str(i))
                         for i in (0, 1)] for name in ("uplink_bytes", "requests")}
        offloads = [observed.total("splitexit_edge_frames_total", producer=str(i),
                                   path="offload") for i in (0, 1)]
        shadows = {o: observed.total("splitexit_edge_shadow_frames_total", producer="1",
                                     outcome=o) for o in ("sent", "answered", "dropped")}
        agreed = observed.total("splitexit_edge_shadow_agreements_total", producer="1")
        claimed = observed.total("splitexit_edge_exit_confidence_total", producer="0")
    finally:
        group.stop()
    rows = [[json.loads(line) for line in (tmp_path / f"{i}.jsonl").read_text().splitlines()]
            for i in (0, 1)]
    plain, shadowed = ({o["frame"]: (o["path"], o["cls"]) for o in r} for r in rows)
    # the accuracy the exit claims: the sum of its answers' calibrated confidences
    assert claimed == pytest.approx(sum(o["confidence"] for o in rows[0] if o["path"] == "exit"))
    assert plain == shadowed
    exited = Counter(p for p, _ in shadowed.values())["exit"]
    assert exited > 50
    assert shadows["sent"] == exited
    # the broker turns a shadow away when no worker has free credit: never all of them here
    assert shadows["answered"] + shadows["dropped"] == exited and shadows["answered"] > exited / 2
    assert 0 < agreed <= exited
    assert offloads[0] == offloads[1] and totals["uplink_bytes"][0] == totals["uplink_bytes"][1]
    assert totals["requests"][0] == totals["requests"][1]
