"""Every metric splitexit exports: the one place they are named. Dashboards and tests rely
on these names; change them here or nowhere.

Conventions (Prometheus naming): `splitexit_` namespace, the unit in the name (`_seconds`,
`_bytes`), `_total` on counters, and only bounded labels: `producer` and `worker` (one per
process), `path` (exit | offload | fallback), `reason` (a short fixed vocabulary), `status`.

Derived figures are PromQL, not gauges, so that they stay right across processes and
restarts (see OFFLOAD_RATIO_PROMQL and friends below).

Multiprocess mode: a launcher (`up`, `workers -n`, `edge -n`) sets PROMETHEUS_MULTIPROC_DIR
before its children import prometheus_client (monitoring.exposition does it), so each child
writes its own files and the launcher's one endpoint serves the sum. Gauges therefore carry
a `multiprocess_mode`; Info and Enum metrics are not used (multiprocess mode lacks them).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "EDGE_FRAMES", "EDGE_FALLBACKS", "EDGE_UPLINK_BYTES", "EDGE_FEATURE_BYTES",
    "EDGE_PAYLOAD_BYTES", "EDGE_REQUESTS", "EDGE_LATENCY", "EDGE_HEAD", "EDGE_DUPLICATES",
    "WORKER_REQUESTS", "WORKER_FRAMES", "WORKER_TAIL", "WORKER_BATCH", "WORKER_QUEUE",
    "BROKER_REQUESTS", "BROKER_QUEUE_DEPTH", "BROKER_WORKERS", "BROKER_FREE_CREDIT",
    "BROKER_REDELIVERIES", "BROKER_DROPS", "BAD_MESSAGES", "LATENCY_BUCKETS_S", "PROMQL",
]

# From 0.1 ms (a local exit) to 2.5 s (far past any deadline), ~2x apart.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5)
# Frames per tail call: powers of two up to the largest max_batch worth running.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# -- edge producers ---------------------------------------------------------------------------
EDGE_FRAMES = Counter("splitexit_edge_frames", "Frames given their final answer, by path",
                      ["producer", "path"])
EDGE_FALLBACKS = Counter("splitexit_edge_fallbacks",
                         "Offloaded frames answered locally after all, by reason",
                         ["producer", "reason"])
EDGE_UPLINK_BYTES = Counter("splitexit_edge_uplink_bytes",
                            "Bytes of requests put on the wire, ZeroMQ framing included",
                            ["producer"])
EDGE_FEATURE_BYTES = Counter("splitexit_edge_feature_bytes",
                             "Bytes of the quantized features before compression",
                             ["producer"])
EDGE_PAYLOAD_BYTES = Counter("splitexit_edge_payload_bytes",
                             "Bytes of the feature payloads as sent (after lz4, if it helped)",
                             ["producer"])
EDGE_REQUESTS = Counter("splitexit_edge_requests", "Requests by outcome: answered, refused, "
                        "deadline, unreachable", ["producer", "status"])
EDGE_LATENCY = Histogram("splitexit_edge_latency_seconds",
                         "Capture to final answer, by path", ["producer", "path"],
                         buckets=LATENCY_BUCKETS_S)
EDGE_HEAD = Histogram("splitexit_edge_head_seconds", "Head + exit time per frame",
                      ["producer"], buckets=LATENCY_BUCKETS_S)
EDGE_DUPLICATES = Counter("splitexit_edge_duplicate_answers",
                          "Answers for frames already final (late or redelivered), discarded",
                          ["producer"])

# -- tail workers -----------------------------------------------------------------------------
WORKER_REQUESTS = Counter("splitexit_worker_requests", "Requests by status: ok, or why refused",
                          ["worker", "status"])
WORKER_FRAMES = Counter("splitexit_worker_frames", "Frames run through the tail", ["worker"])
WORKER_TAIL = Histogram("splitexit_worker_tail_seconds", "Tail time per batch", ["worker"],
                        buckets=LATENCY_BUCKETS_S)
WORKER_BATCH = Histogram("splitexit_worker_batch_frames", "Frames per tail call", ["worker"],
                         buckets=BATCH_BUCKETS)
WORKER_QUEUE = Histogram("splitexit_worker_queue_seconds",
                         "Wait in the worker between arrival and its batch", ["worker"],
                         buckets=LATENCY_BUCKETS_S)

# -- broker -----------------------------------------------------------------------------------
BROKER_REQUESTS = Counter("splitexit_broker_requests",
                          "Edge requests by status: dispatched, busy, expired", ["status"])
BROKER_QUEUE_DEPTH = Gauge("splitexit_broker_queue_depth", "Requests waiting for a worker",
                           multiprocess_mode="livesum")
BROKER_WORKERS = Gauge("splitexit_broker_workers", "Live workers", multiprocess_mode="livesum")
BROKER_FREE_CREDIT = Gauge("splitexit_broker_free_credit",
                           "Requests the live workers can still take", multiprocess_mode="livesum")
BROKER_DROPS = Counter("splitexit_broker_dropped_messages",
                       "Messages the broker could not deliver: peer gone or not reading",
                       ["reason"])
BROKER_REDELIVERIES = Counter("splitexit_broker_redeliveries",
                              "Requests sent again after their worker went silent")

# -- every component --------------------------------------------------------------------------
BAD_MESSAGES = Counter("splitexit_bad_messages", "Messages dropped or refused as malformed",
                       ["component", "reason"])

# The PromQL that dashboards, `splitexit up` and the tests use, over a 1-minute window.
PROMQL = {
    "offload_ratio": 'sum(rate(splitexit_edge_frames_total{path!="exit"}[1m])) '
                     '/ sum(rate(splitexit_edge_frames_total[1m]))',
    "uplink_bytes_per_second": "sum(rate(splitexit_edge_uplink_bytes_total[1m]))",
    "uplink_bytes_per_offloaded_frame":
        'sum(rate(splitexit_edge_uplink_bytes_total[1m])) '
        '/ sum(rate(splitexit_edge_frames_total{path!="exit"}[1m]))',
    "frames_per_second": "sum(rate(splitexit_edge_frames_total[1m]))",
    "fallbacks_per_second": "sum by (reason) (rate(splitexit_edge_fallbacks_total[1m]))",
    "compression_ratio": "sum(rate(splitexit_edge_feature_bytes_total[1m])) "
                         "/ sum(rate(splitexit_edge_payload_bytes_total[1m]))",
    "latency_p99_seconds": "histogram_quantile(0.99, sum by (path, le) "
                           "(rate(splitexit_edge_latency_seconds_bucket[1m])))",
    "queue_depth": "sum(splitexit_broker_queue_depth)",
    "workers": "sum(splitexit_broker_workers)",
}
