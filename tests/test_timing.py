"""The protocol's shared back-off: sources and workers retry on the same schedule shape."""

from pipeline.protocol.timing import Backoff, backoff_delays


def test_backoff_doubles_to_a_cap():
    assert backoff_delays(6, start_s=0.5, max_s=8.0) == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff_delays(3, start_s=0.1, max_s=0.25) == [0.1, 0.2, 0.25]


def test_backoff_object_doubles_then_resets_on_a_sign_of_life():
    b = Backoff(start_s=0.25, max_s=1.0)
    assert [b.next() for _ in range(4)] == [0.25, 0.5, 1.0, 1.0]
    b.reset()
    assert b.next() == 0.25
