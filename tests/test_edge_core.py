"""The edge's combined rules, in-process: the pure EdgeCore decides which frames the exit
answers, offloads or shadows, and what each answer, refusal, failed send and deadline makes
of them. The clock is the test's: `now` in seconds from the first batch."""

import math
import random

import numpy as np
import pytest

from pipeline.edge.brokers import RETRY_S, Brokers
from pipeline.edge.controller import ControllerConfig, State
from pipeline.edge.core import EdgeCore
from pipeline.edge.source_base import Frame
from pipeline.protocol import wire
from pipeline.protocol.wire import Refusal

THRESHOLD, DEADLINE_S = 0.5, 0.1
EXIT_CLASS = 1                  # what the exit says of every frame here
CLASSES = [f"class{i}" for i in range(10)]
REQUEST_BYTES = 101


def frames(n, first=0):
    return [Frame(first + i, np.zeros(4, np.float32), None, "test", 0.0) for i in range(n)]


class Edge:
    """Drives a core the way AsyncEdge does, sends included; collects every outcome."""

    def __init__(self, core):
        self.core, self.outcomes, self.next_frame = core, [], 0
        self.requests, self.shadows = [], []       # msg_ids, in sending order
        self.sizes = {}                            # msg_id -> frames

    def batch(self, scores, now=0.0, sendable=True):
        batch = frames(len(scores), self.next_frame)
        self.next_frame += len(scores)
        plan = self.core.decide(batch, [EXIT_CLASS] * len(batch), np.array(scores, np.float32),
                                2.0, now)
        self.outcomes += plan.local
        if plan.shadow:
            msg_id = self.core.open_shadow(plan, now)
            self.core.shadow_sent(msg_id, 50 if sendable else None)
            self.shadows.append(msg_id)
            self.sizes[msg_id] = len(plan.shadow)
        if plan.offload:
            msg_id = self.core.open_request(plan, REQUEST_BYTES, now)
            self.outcomes += self.core.request_sent(plan, msg_id, sendable, REQUEST_BYTES,
                                                    80 * len(plan.offload), 60, now)
            self.requests.append(msg_id)
            self.sizes[msg_id] = len(plan.offload)
        return plan

    def answer(self, msg_id, classes, confidence=0.9, now=0.0, **load):
        reply = wire.Reply(msg_id, "w0", np.array(classes, np.uint8),
                           np.full(len(classes), confidence, np.float32), 10, 20, 1, **load)
        self.outcomes += self.core.receive(reply, now)

    def refuse(self, msg_id, reason=Refusal.BUSY, now=0.0):
        self.outcomes += self.core.receive(wire.Error(msg_id, reason, "detail"), now)

    def at(self, now):
        self.outcomes += self.core.expire(now)

    def paths(self):
        """frame -> (path, class, reason); fails if a frame has two answers."""
        got = {}
        for o in self.outcomes:
            assert o.frame not in got, f"frame {o.frame} answered twice"
            got[o.frame] = (o.path, o.cls, o.reason)
        return got


def core(**kw):
    return EdgeCore(THRESHOLD, DEADLINE_S, CLASSES, **kw)


EXIT = ("exit", EXIT_CLASS, None)
# (name, scores of one batch at t=0, what follows (the request is "r"), each frame's answer,
#  counts that must hold)
CASES = [
    ("sure frames: the exit's answers, nothing sent", [0.9, 0.6], [],
     {0: EXIT, 1: EXIT}, {"uplink_bytes": 0, "requests.answered": 0}),
    ("unsure frames: one request, the server's answers", [0.1, 0.9, 0.2],
     [("answer", [7, 8])],
     {0: ("offload", 7, None), 1: EXIT, 2: ("offload", 8, None)},
     {"uplink_bytes": REQUEST_BYTES, "feature_bytes": 160, "payload_bytes": 60,
      "requests.answered": 1}),
    ("refused: the exit's answers, with the broker's reason", [0.1, 0.2], [("refuse", "BUSY")],
     {0: ("fallback", EXIT_CLASS, "busy"), 1: ("fallback", EXIT_CLASS, "busy")},
     {"requests.refused": 1}),
    ("no answer: nothing before the deadline, the exit's answer at it", [0.1],
     [("at", DEADLINE_S / 2), ("expect", {}), ("at", DEADLINE_S)],
     {0: ("fallback", EXIT_CLASS, "deadline")}, {"requests.deadline": 1}),
    ("an answer after the deadline: a duplicate, the fallback stands", [0.1],
     [("at", DEADLINE_S), ("answer", [3])],
     {0: ("fallback", EXIT_CLASS, "deadline")}, {"duplicates": 1}),
    ("a redelivered second answer: a duplicate, the first stands", [0.1],
     [("answer", [3]), ("answer", [4])], {0: ("offload", 3, None)}, {"duplicates": 1}),
    ("a refusal after the answer: the answer stands", [0.1],
     [("answer", [3]), ("refuse", "NO_WORKER")], {0: ("offload", 3, None)},
     {"requests.answered": 1, "requests.refused": 0}),
    ("a class the model lacks: not believed, the deadline decides", [0.1],
     [("answer", [10]), ("expect", {}), ("at", DEADLINE_S)],
     {0: ("fallback", EXIT_CLASS, "deadline")}, {"bad.class_range": 1}),
    ("a confidence above 1: not believed, a true answer still counts", [0.1],
     [("answer_conf", [3], 1.5), ("answer", [4])], {0: ("offload", 4, None)},
     {"bad.confidence_range": 1}),
    ("an answer for another number of frames: not believed", [0.1, 0.2],
     [("answer", [3]), ("at", DEADLINE_S)],
     {0: ("fallback", EXIT_CLASS, "deadline"), 1: ("fallback", EXIT_CLASS, "deadline")},
     {"bad.answer_count": 1}),
    ("answers and refusals for ids never sent: not believed", [0.1],
     [("forged_answer", [3]), ("forged_refusal", "BUSY"), ("answer", [5])],
     {0: ("offload", 5, None)}, {"bad.unknown_msg_id": 2}),
]


@pytest.mark.parametrize("name,scores,events,expected,counts", CASES, ids=[c[0] for c in CASES])
def test_each_frame_gets_the_one_answer_the_rules_give(name, scores, events, expected, counts):
    edge = Edge(core())
    edge.batch(scores)
    r = edge.requests[0] if edge.requests else None
    for event, *args in events:
        if event == "expect":
            assert edge.paths() == args[0]
        elif event == "at":
            edge.at(args[0])
        elif event == "answer":
            edge.answer(r, args[0])
        elif event == "answer_conf":
            edge.answer(r, args[0], confidence=args[1])
        elif event == "refuse":
            edge.refuse(r, Refusal[args[0]])
        elif event == "forged_answer":
            edge.answer(r + 1000, args[0])
        elif event == "forged_refusal":
            edge.refuse(r + 1000, Refusal[args[0]])
    edge.at(math.inf)   # whatever is left: nothing, in every case
    assert edge.paths() == expected
    for name, value in counts.items():
        kind, _, key = name.partition(".")
        got = edge.core.bad_replies[key] if kind == "bad" else edge.core.counts[name]
        assert got == value, name
    assert len(edge.core) == 0


def test_an_unsendable_request_falls_back_at_once_and_carried_no_bytes():
    edge = Edge(core())
    edge.batch([0.1, 0.2, 0.9], sendable=False)
    assert edge.paths() == {0: ("fallback", EXIT_CLASS, "unreachable"),
                            1: ("fallback", EXIT_CLASS, "unreachable"), 2: EXIT}
    assert [o.uplink_bytes for o in edge.outcomes if o.path == "fallback"] == [0, 0]
    assert edge.core.counts["uplink_bytes"] == 0 and edge.core.counts["requests.unreachable"] == 1
    edge.answer(edge.requests[0], [3, 4])   # it never left: an answer is a duplicate
    assert edge.core.counts["duplicates"] == 1 and len(edge.outcomes) == 3


def test_offloaded_frames_share_their_requests_bytes_and_carry_the_servers_timing():
    edge = Edge(core())
    edge.batch([0.1, 0.2, 0.3])
    edge.answer(edge.requests[0], [2, 3, 4])
    assert sum(o.uplink_bytes for o in edge.outcomes) == REQUEST_BYTES
    o = edge.outcomes[0]
    assert (o.worker, o.queue_us, o.tail_us, o.head_ms) == ("w0", 10, 20, 2.0)
    assert [o.class_name for o in edge.outcomes] == ["class2", "class3", "class4"]


def test_the_exit_answers_carry_their_score_and_the_confidence_sum_is_counted():
    edge = Edge(core())
    edge.batch([0.75, 0.25, 0.5])
    assert [(o.frame, o.confidence, o.class_name) for o in edge.outcomes] == [
        (0, 0.75, "class1"), (2, 0.5, "class1")]
    assert edge.core.counts["exit_confidence"] == pytest.approx(1.25)


def test_shadows_are_sampled_from_exits_never_offloads_and_measure_agreement():
    edge = Edge(core(shadow=0.5))
    plan = edge.batch([0.9, 0.8, 0.1, 0.7, 0.6])   # four exit, one offloaded
    assert plan.offload == [2] and plan.shadow == [1, 4]   # every second exited frame
    shadow, request = edge.shadows[0], edge.requests[0]
    assert shadow != request
    edge.answer(shadow, [EXIT_CLASS, 5], confidence=0.8)   # agrees on one of two
    edge.answer(request, [6])
    counts = edge.core.shadows.counts
    assert (counts.sent, counts.answered, counts.agreed) == (2, 2, 1)
    assert counts.exit_correct == pytest.approx(0.8)
    assert edge.paths() == {0: EXIT, 1: EXIT, 2: ("offload", 6, None), 3: EXIT, 4: EXIT}
    assert edge.core.counts["requests.answered"] == 1 and edge.core.counts["shadow_bytes"] == 50


def test_a_refused_or_unsendable_shadow_is_dropped_and_finalizes_nothing():
    edge = Edge(core(shadow=1.0))
    edge.batch([0.9], sendable=False)
    edge.batch([0.9])
    edge.refuse(edge.shadows[1], Refusal.BUSY)
    assert edge.core.shadows.counts.dropped == 2 and edge.core.counts["requests.refused"] == 0
    assert edge.paths() == {0: EXIT, 1: EXIT}


def budget(target=0.25, **kw):
    return ControllerConfig(target_offload=target, min_frames=10,
                            deadline_s=DEADLINE_S, **kw)


def test_no_shadows_while_the_controller_backs_off():
    edge = Edge(core(shadow=1.0, controller=budget()))
    rng = np.random.default_rng(0)
    edge.batch(rng.uniform(size=20))
    edge.refuse(edge.requests[0], Refusal.BUSY, now=0.01)
    assert edge.core.controller.state is State.BACKING_OFF
    dropped = edge.core.shadows.counts.dropped
    plan = edge.batch(rng.uniform(size=20), now=0.02)
    assert plan.shadow == [] and edge.core.shadows.counts.dropped > dropped


def test_the_budget_controller_moves_the_threshold_to_hold_its_target():
    edge = Edge(core(controller=budget(target=0.25)))
    rng = np.random.default_rng(1)
    offloaded = 0
    for i in range(50):
        now = i * 0.01
        plan = edge.batch(rng.uniform(size=10), now=now)
        if plan.offload:
            edge.answer(edge.requests[-1], [0] * len(plan.offload), now=now)
        offloaded += len(plan.offload) if i >= 10 else 0
    assert offloaded / 400 == pytest.approx(0.25, abs=0.05)
    assert edge.core.threshold == pytest.approx(0.25, abs=0.07)   # uniform scores
    assert edge.core.threshold != THRESHOLD


def test_no_worker_drops_the_offload_ratio_to_the_floor_and_answers_bring_it_back():
    edge = Edge(core(controller=budget(target=0.5, hold_s=0.05)))
    rng = np.random.default_rng(2)
    edge.batch(rng.uniform(size=20))
    edge.refuse(edge.requests[-1], Refusal.NO_WORKER, now=0.01)
    c = edge.core.controller
    assert c.cap == c.cfg.floor
    for i in range(2, 40):   # the server is back: every request answered at once
        now = i * 0.05
        plan = edge.batch(rng.uniform(size=20), now=now)
        if plan.offload:
            edge.answer(edge.requests[-1], [0] * len(plan.offload), now=now, free_credit=4)
    assert c.state is State.TRACKING and c.ratio == 0.5


def test_a_late_answer_still_tells_the_controller_the_server_is_there():
    """Two cuts with no answer between them mean nobody serves (the cap falls to the floor);
    an answer that came after its deadline in between says the server is there, only slow."""
    caps = {}
    for late_answer in (False, True):
        edge = Edge(core(controller=budget(target=0.5, hold_s=0.01)))
        edge.batch(np.linspace(0, 1, 20))
        first = edge.requests[-1]
        edge.at(DEADLINE_S)                        # the first cut: a deadline
        if late_answer:
            edge.answer(first, [0] * 10, now=DEADLINE_S + 0.01)
        assert edge.core.counts["duplicates"] == int(late_answer)
        edge.batch(np.linspace(0, 1, 20), now=DEADLINE_S + 0.02)
        edge.at(2 * DEADLINE_S + 0.05)             # the second, after the hold
        caps[late_answer] = edge.core.controller.cap
    assert caps[False] == budget().floor and caps[True] > budget().floor


def test_every_frame_gets_exactly_one_answer_whatever_comes_back():
    """A seeded storm: answers, duplicates, refusals, forgeries, untrue replies, failed
    sends and deadlines in random order; every frame ends with exactly one answer, and each
    request is counted once by how it ended."""
    rng, pick = np.random.default_rng(3), random.Random(3)
    edge = Edge(core(shadow=0.2))
    now, sent = 0.0, 0
    for _ in range(300):
        now += pick.uniform(0, 0.03)
        action = pick.random()
        if action < 0.35:
            plan = edge.batch(rng.uniform(size=pick.randint(1, 8)), now,
                              sendable=pick.random() > 0.1)
            sent += bool(plan.offload)
        elif action < 0.8 and edge.requests:
            msg_id = pick.choice(edge.requests[-3:] + edge.shadows[-2:])   # mostly live
            n = edge.sizes[msg_id] if pick.random() < 0.8 else pick.randint(1, 8)
            kind = pick.random()
            if kind < 0.6:
                edge.answer(msg_id, rng.integers(0, 10 + (pick.random() < 0.1), n).tolist(),
                            now=now)
            elif kind < 0.8:
                edge.refuse(msg_id, pick.choice(list(Refusal)), now=now)
            else:
                edge.answer(msg_id + 10_000, [1] * n, now=now)
        else:
            edge.at(now)
    edge.at(math.inf)
    edge.core.close()
    assert sorted(edge.paths()) == list(range(edge.next_frame))
    assert all(o.cls < 10 for o in edge.outcomes)
    assert {o.path for o in edge.outcomes} == {"exit", "offload", "fallback"}
    ended = sum(edge.core.counts[f"requests.{s}"]
                for s in ("answered", "refused", "deadline", "unreachable"))
    assert ended == sent == len(edge.requests) and len(edge.core) == 0
    s = edge.core.shadows.counts   # dropped: refused or unanswered if sent, or never sent
    assert s.answered <= s.sent <= s.answered + s.dropped


def test_new_requests_leave_a_broker_that_stops_answering_and_return_when_it_answers():
    brokers = Brokers(["tcp://b0:5555", "tcp://b1:5555"], "edge-a", strikes=2)
    brokers.link_up(0, 0.0), brokers.link_up(1, 0.0)
    edge = Edge(core(brokers=brokers))
    home = edge.batch([0.1]).broker
    edge.answer(edge.requests[-1], [3])
    assert edge.batch([0.1]).broker == home     # answered: stays home
    edge.refuse(edge.requests[-1], Refusal.NO_WORKER)   # a strike: the broker has no worker
    assert edge.batch([0.1], now=0.01).broker == home
    edge.at(0.01 + DEADLINE_S)                  # the second strike: a deadline
    plan = edge.batch([0.1], now=0.2)
    assert plan.broker == 1 - home              # new requests go to the other broker
    edge.answer(edge.requests[-1], [4], now=0.2)
    assert edge.core.sent_to == {home: 3, 1 - home: 1}
    brokers.link_down(1 - home)                 # the other dies; home is probed, answers
    assert edge.batch([0.1], now=0.2 + RETRY_S).broker == home
    edge.answer(edge.requests[-1], [5], now=0.3 + RETRY_S)
    assert brokers.live(home)
    paths = edge.paths()
    assert (paths[1][2], paths[2][2], paths[3][0], paths[4][0]) == (
        "no_worker", "deadline", "offload", "offload")


def test_busy_and_bad_request_refusals_say_the_broker_works():
    brokers = Brokers(["tcp://b0:5555", "tcp://b1:5555"], "edge-a", strikes=1)
    brokers.link_up(0, 0.0), brokers.link_up(1, 0.0)
    edge = Edge(core(brokers=brokers))
    home = edge.batch([0.1]).broker
    edge.refuse(edge.requests[-1], Refusal.BUSY)
    edge.batch([0.1])
    edge.refuse(edge.requests[-1], Refusal.BAD_REQUEST)
    assert edge.batch([0.1]).broker == home and brokers.live(home)
