"""An edge's choice among several brokers, as a pure object: a stable per-edge preference
that spreads edges evenly, failover when a link drops or requests go unanswered, probes that
bring a broker back once it answers again."""

import collections

import pytest

from pipeline.edge.brokers import RETRY_S, STRIKES, Brokers

ENDPOINTS = [f"tcp://10.0.0.{i}:5555" for i in range(1, 5)]


def linked(endpoints=ENDPOINTS, edge_id="edge-a"):
    brokers = Brokers(endpoints, edge_id)
    for i in range(len(brokers)):
        brokers.link_up(i, 0.0)
    return brokers


def test_the_same_list_in_any_order_gives_an_edge_the_same_broker():
    first = linked(ENDPOINTS)
    shuffled = linked(ENDPOINTS[::-1])
    assert first.endpoint(first.pick(0)) == shuffled.endpoint(shuffled.pick(0))


def test_edges_spread_evenly_and_a_dead_brokers_edges_spread_over_the_rest():
    edges = [linked(edge_id=f"camera-{n}") for n in range(2000)]
    first = collections.Counter(e.endpoint(e.pick(0)) for e in edges)
    assert set(first) == set(ENDPOINTS) and min(first.values()) > 400   # 500 each, ideally
    dead = ENDPOINTS.index(max(first, key=first.get))
    for e in edges:
        e.link_down(dead)
    moved = collections.Counter(e.endpoint(e.pick(0)) for e in edges)
    assert ENDPOINTS[dead] not in moved
    for endpoint, count in moved.items():   # each survivor took about a third of them
        assert count - first[endpoint] > first[ENDPOINTS[dead]] / 3 * 0.7


def test_a_dropped_link_fails_over_at_once_and_a_returning_broker_is_probed_first():
    brokers = linked()
    home = brokers.pick(0)
    brokers.link_down(home)
    other = brokers.pick(0)
    assert other != home
    brokers.link_up(home, now=5.0)               # back: on probation
    assert not brokers.live(home)
    assert brokers.pick(5.0) == home             # one request probes it ...
    assert brokers.pick(5.0) == other            # ... the rest go on to the live one
    brokers.failed(home, now=5.1)                # the probe found no worker yet
    assert brokers.pick(5.0 + RETRY_S / 2) == other
    assert brokers.pick(5.0 + RETRY_S) == home   # the next probe, a retry later
    brokers.answered(home)
    assert brokers.live(home) and brokers.pick(6.5) == home


def test_unanswered_requests_take_a_broker_out_until_a_probe_is_answered():
    brokers = linked()
    home = brokers.pick(0)
    for n in range(STRIKES - 1):
        brokers.failed(home, now=1.0)
        assert brokers.pick(1.0) == home            # a miss or two: still home
    brokers.failed(home, now=1.0)
    other = brokers.pick(1.0)
    assert other != home and not brokers.live(home)
    assert brokers.pick(1.0 + RETRY_S / 2) == other   # no probe before retry_s
    assert brokers.pick(1.0 + RETRY_S) == home        # the preferred one is probed
    assert brokers.pick(1.0 + RETRY_S) == other
    brokers.answered(home)
    assert brokers.live(home) and brokers.pick(1.0 + RETRY_S) == home


def test_a_less_preferred_broker_down_is_not_probed_while_home_is_live():
    brokers = linked()
    order = [brokers.pick(0)]
    brokers.link_down(order[0])
    order.append(brokers.pick(0))
    brokers.link_up(order[0], 0.0)
    brokers.answered(order[0])                       # home is back and answering
    for _ in range(STRIKES):
        brokers.failed(order[1], now=0.0)
    assert {brokers.pick(t) for t in (0.0, RETRY_S, 2 * RETRY_S)} == {order[0]}


def test_an_answer_clears_the_strikes():
    brokers = linked()
    home = brokers.pick(0)
    for _ in range(10):
        for _ in range(STRIKES - 1):
            brokers.failed(home, 0.0)
        brokers.answered(home)
    assert brokers.pick(0) == home


def test_no_broker_linked_yet_sends_to_the_first_preference():
    brokers = Brokers(ENDPOINTS, "edge-a")
    assert brokers.pick(0) == linked().pick(0)


@pytest.mark.parametrize("endpoints,strikes,message", [
    ([], STRIKES, "at least one broker"),
    (["tcp://a:1", "tcp://a:1"], STRIKES, "listed twice"),
    (ENDPOINTS, 0, "strikes"),
])
def test_bad_settings_are_plain_value_errors(endpoints, strikes, message):
    with pytest.raises(ValueError, match=message):
        Brokers(endpoints, "edge", strikes)
