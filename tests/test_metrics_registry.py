"""A metric set belongs to the registry it was built on: a library user who creates and
frees edges (each with a registry of its own) reads every sample from its own registry, and
freed registries take their metric sets with them."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry

from monitoring import metrics
from monitoring.metrics import BrokerMetrics, EdgeMetrics, for_registry


def test_fresh_registries_created_and_freed_in_turn_each_get_their_own_metrics():
    for i in range(200):
        registry = CollectorRegistry()
        m = for_registry(EdgeMetrics, registry)
        assert for_registry(EdgeMetrics, registry) is m        # one set a registry
        m.frames.labels(producer="p", path="exit").inc(i + 1)
        assert registry.get_sample_value(
            "splitexit_edge_frames_total", {"producer": "p", "path": "exit"}) == i + 1
        del registry, m
        gc.collect()


def test_a_freed_registry_frees_its_metric_sets():
    gc.collect()
    before = len(metrics._built)
    registry = CollectorRegistry()
    for_registry(EdgeMetrics, registry)
    for_registry(BrokerMetrics, registry)
    assert len(metrics._built) == before + 1
    del registry
    gc.collect()
    assert len(metrics._built) == before
