"""The budget controller driven by synthetic score streams and an injected clock: it holds
an offload ratio or an uplink budget, backs off when the server refuses, and climbs back."""

import numpy as np
import pytest

from pipeline.edge.controller import (OFFLOAD_ALL, REFUSED_DECREASE, SATURATED_DECREASE,
                                     Controller, ControllerConfig, State)

FPS = 1000.0
TRAINED = 0.9


class Stream:
    """Frames in batches of 1-8 at FPS through a controller; what each batch offloaded."""

    def __init__(self, controller: Controller, seed: int = 0, bytes_per_offload: float = 70.0):
        self.c, self.rng, self.now = controller, np.random.default_rng(seed), 0.0
        self.bytes_per_offload = bytes_per_offload
        self.log: list[tuple[float, int, int, int]] = []   # (now, frames, offloaded, bytes)

    def run(self, frames: int, a: float = 4.0, b: float = 1.5, each=None) -> None:
        """`frames` more frames with Beta(a, b) scores (mostly confident, as an exit is)."""
        done = 0
        while done < frames:
            n = int(self.rng.integers(1, 9))
            self.now += n / FPS
            scores = self.rng.beta(a, b, n)
            offloaded = int((scores < self.c.observe(scores, self.now)).sum())
            sent = round(offloaded * self.bytes_per_offload + 16 * (offloaded > 0))
            self.c.sent(n, offloaded, sent, self.now)
            self.log.append((self.now, n, offloaded, sent))
            if each:
                each(self.now, offloaded)
            done += n

    def offload_since(self, t: float) -> float:
        rows = [r for r in self.log if r[0] >= t]
        return sum(r[2] for r in rows) / sum(r[1] for r in rows)

    def bytes_per_second_since(self, t: float) -> float:
        rows = [r for r in self.log if r[0] >= t]
        return sum(r[3] for r in rows) / (rows[-1][0] - t)


def offload(target=0.3, **kw) -> Controller:
    return Controller(ControllerConfig(target_offload=target, **kw), TRAINED)


def test_the_trained_threshold_stands_until_enough_scores_arrived():
    c = offload(min_frames=50)
    assert c.observe([0.5] * 49, 0.0) == TRAINED
    assert c.observe([0.5], 0.001) != TRAINED


@pytest.mark.parametrize("target", [0.05, 0.3, 0.6])
def test_a_target_offload_ratio_is_held_within_two_points_after_warm_up(target):
    s = Stream(offload(target))
    s.run(500)
    warm = s.now
    s.run(10_000)
    assert s.offload_since(warm) == pytest.approx(target, abs=0.02)
    assert s.c.state is State.TRACKING


def test_a_drifting_scene_moves_the_threshold_not_the_offload_ratio():
    """Frames become harder (scores drop): a fixed threshold would offload far more; the
    controller is back on target one window later."""
    s = Stream(offload(0.3, window=1000))
    s.run(3000)
    easy_threshold = s.c.threshold
    s.run(1000, a=2.0, b=2.0)                 # the drift
    moved = s.now
    s.run(5000, a=2.0, b=2.0)
    assert s.offload_since(moved) == pytest.approx(0.3, abs=0.02)
    assert s.c.threshold < easy_threshold
    fixed = np.random.default_rng(1).beta(2.0, 2.0, 10_000) < easy_threshold
    assert fixed.mean() > 0.6                 # what not adapting would have sent


def test_a_busy_storm_cuts_the_ratio_once_per_hold_and_recovery_returns_to_target():
    s = Stream(offload(0.3, hold_s=0.25))
    s.run(2000)
    storm_start = s.now
    ratios = []

    def busy(now, offloaded):                 # every request refused for one second
        if offloaded:
            s.c.refused("busy", now)
        ratios.append(s.c.ratio)

    s.run(1000, each=busy)
    assert s.c.state in (State.BACKING_OFF, State.RECOVERING)
    assert min(ratios) >= s.c.cfg.floor
    # the first refusal cuts it; refusals within the hold do not cut again
    assert ratios[1] == pytest.approx(REFUSED_DECREASE * 0.3, abs=0.03)
    cuts = sum(1 for a, b in zip(ratios, ratios[1:]) if b < a * 0.75)
    assert cuts <= (s.now - storm_start) / 0.25 + 1
    assert s.offload_since(storm_start) < REFUSED_DECREASE * 0.3

    def ok(now, offloaded):                   # the server answers again
        if offloaded:
            s.c.answered(now)

    s.run(6000, each=ok)     # fast up to 85 % of where it was refused, then 8x slower
    assert s.c.state is State.TRACKING and s.c.cap is None
    back = s.now
    s.run(2000, each=ok)
    assert s.offload_since(back) == pytest.approx(0.3, abs=0.02)


def test_no_worker_drops_to_the_floor_and_silence_does_not_count_as_recovery():
    s = Stream(offload(0.3, floor=0.01))
    s.run(2000)
    s.c.refused("no_worker", s.now)
    s.run(3000)                                  # nothing answers, nothing refuses
    assert s.c.cap == 0.01 and s.c.ratio == 0.01
    low = s.now
    s.run(2000)
    assert s.offload_since(low) == pytest.approx(0.01, abs=0.01)

    def ok(now, offloaded):
        if offloaded:
            s.c.answered(now)

    seen = []
    s.run(6000, each=lambda now, o: (ok(now, o), seen.append(s.c.cap)))
    steps = sorted({c for c in seen if c is not None})
    assert steps[:4] == pytest.approx([0.01, 0.02, 0.04, 0.08])   # doubling from the floor
    assert s.c.cap is None and s.c.ratio == 0.3


def test_an_overloaded_server_that_still_answers_is_halved_not_abandoned():
    """Half the requests refused, half answered: each hold halves the cap at most once, and
    never to the floor while answers keep coming."""
    s = Stream(offload(0.4, hold_s=0.25))
    s.run(2000)
    turn = [0]

    def half_busy(now, offloaded):
        if offloaded:
            turn[0] += 1
            s.c.refused("busy", now) if turn[0] % 2 else s.c.answered(now)

    caps = []
    s.run(600, each=lambda now, o: (half_busy(now, o), caps.append(s.c.cap)))
    assert min(c for c in caps if c is not None) > s.c.cfg.floor


def test_deadlines_with_no_answer_in_between_mean_nobody_serves():
    s = Stream(offload(0.4, hold_s=0.25, floor=0.01))
    s.run(2000)
    s.c.refused("deadline", s.now)
    s.run(100)
    assert s.c.cap == pytest.approx(REFUSED_DECREASE * 0.4, abs=0.03)     # first: cut
    s.run(300)                                              # past the hold, nothing answered
    s.c.refused("deadline", s.now)
    assert s.c.cap == 0.01                                  # second: the floor


def test_a_saturated_pool_is_backed_off_from_before_it_refuses():
    """Answers forwarded while requests queue at the broker (the load hint): most of a
    hold's answers queued -> the cap is cut without a single refusal; a few -> held, not
    cut, and not raised either."""
    s = Stream(offload(0.4, hold_s=0.25))
    s.run(2000)
    s.run(500, each=lambda now, o: o and s.c.answered(now, queued=3))
    assert s.c.cap is not None and s.c.cap <= SATURATED_DECREASE * 0.4 + 0.03
    assert s.c.state is not State.TRACKING

    s = Stream(offload(0.4, hold_s=0.25))
    s.run(2000)
    s.c.refused("busy", s.now)
    cut = s.c.cap
    turn = [0]

    def sometimes_queued(now, offloaded):
        if offloaded:
            turn[0] += 1
            s.c.answered(now, queued=int(turn[0] % 4 == 0))    # 1 answer in 4 queued

    s.run(2000, each=sometimes_queued)
    assert s.c.cap == cut                       # neither cut again nor raised


def test_a_cut_goes_below_what_the_server_actually_served():
    """The server answered only 150 of the ~300 frames a second sent to it: a refusal cuts
    to a share of that throughput, not of what was sent."""
    s = Stream(offload(0.3))
    served = [0]

    def half_served(now, offloaded):
        served[0] += offloaded
        if served[0] >= 2:
            s.c.answered(now, frames=served[0] // 2)
            served[0] = 0

    s.run(3000, each=half_served)
    s.c.refused("deadline", s.now)
    assert s.c.cap == pytest.approx(REFUSED_DECREASE * 0.15, abs=0.03)


def test_refusals_that_say_nothing_about_load_do_not_move_it():
    s = Stream(offload(0.3))
    s.run(1000)
    for reason in ("wrong_model", "bad_request"):
        s.c.refused(reason, s.now)
    assert s.c.cap is None and s.c.state is State.TRACKING


def test_an_uplink_budget_is_held_and_followed_when_it_halves():
    budget = 8000.0     # bytes/s; at 1000 frames/s and ~70 B an offload: ~11 % offloaded
    s = Stream(Controller(ControllerConfig(uplink_budget=budget), TRAINED))
    s.run(3000)
    steady = s.now
    s.run(6000)
    assert s.bytes_per_second_since(steady) == pytest.approx(budget, rel=0.10)
    s.c.retarget(uplink_budget=budget / 2)
    s.run(3000)                                # settling: one rate window and then some
    halved = s.now
    s.run(6000)
    assert s.bytes_per_second_since(halved) == pytest.approx(budget / 2, rel=0.10)


def test_a_target_of_everything_offloads_everything():
    s = Stream(offload(1.0))
    s.run(1000)
    assert s.c.threshold == OFFLOAD_ALL


@pytest.mark.parametrize("kw, words", [
    ({}, "give one target"),
    ({"target_offload": 0.3, "uplink_budget": 1e4}, "give one target"),
    ({"target_offload": 1.5}, "target_offload 1.5"),
    ({"target_offload": 0.0}, "target_offload 0.0"),
    ({"uplink_budget": -1.0}, "uplink_budget -1.0"),
    ({"uplink_budget": float("inf")}, "uplink_budget inf"),
    ({"target_offload": 0.3, "min_frames": 0}, "min_frames 0"),
])
def test_impossible_targets_are_one_line_errors(kw, words):
    """A pure core names its own parameter, never a command-line flag (the edge's config
    does that: tests/test_runtime_config.py)."""
    with pytest.raises(ValueError, match=words.replace(".", r"\.")) as e:
        Controller(ControllerConfig(**kw), TRAINED)
    assert "--" not in str(e.value) and "\n" not in str(e.value)
