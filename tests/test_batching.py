"""A worker's dynamic batching as a pure object: full batches, waits, draining, and requests
that pack several frames never split across two tail calls."""

import pytest

from workers.batching import Batcher


def test_a_batch_is_due_when_full_or_when_the_oldest_waited_long_enough():
    b = Batcher(max_batch=64, max_wait_s=0.002)
    assert not b.due(now=10.0) and b.next_due() is None
    b.add("r1", frames=10, now=10.0)
    assert not b.due(now=10.001) and b.next_due() == pytest.approx(10.002)
    assert b.due(now=10.002)
    b.add("r2", frames=54, now=10.0005)
    assert b.due(now=10.0006)  # 64 frames: full


def test_zero_wait_runs_as_soon_as_anything_is_pending():
    b = Batcher(max_batch=64, max_wait_s=0.0)
    b.add("r", frames=1, now=5.0)
    assert b.due(now=5.0)


def test_draining_runs_what_is_held_at_once():
    b = Batcher(max_batch=64, max_wait_s=60.0)
    b.add("r", frames=1, now=0.0)
    assert not b.due(now=1.0) and b.due(now=1.0, draining=True)


def test_take_fills_up_to_max_batch_in_arrival_order_without_splitting_a_request():
    b = Batcher(max_batch=8, max_wait_s=0.0)
    for name, frames, t in (("a", 3, 0.0), ("b", 4, 0.1), ("c", 2, 0.2), ("d", 1, 0.3)):
        b.add(name, frames, t)
    assert b.take() == [("a", 0.0), ("b", 0.1)]     # c would make 9 frames
    assert b.frames == 3 and len(b) == 2
    assert b.take() == [("c", 0.2), ("d", 0.3)] and b.frames == 0 and not b


def test_a_request_larger_than_max_batch_still_runs_alone():
    b = Batcher(max_batch=4, max_wait_s=0.0)
    b.add("big", frames=9, now=0.0)
    b.add("next", frames=1, now=0.0)
    assert b.take() == [("big", 0.0)] and len(b) == 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Batcher(max_batch=0, max_wait_s=0.0)
    with pytest.raises(ValueError):
        Batcher(max_batch=1, max_wait_s=-1.0)
