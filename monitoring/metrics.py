"""Every metric splitexit exports: the one place they are named. Dashboards and tests rely
on these names; change them here or nowhere.

Conventions (Prometheus naming): `splitexit_` namespace, the unit in the name (`_seconds`,
`_bytes`), `_total` on counters, and only bounded labels: `producer` and `worker` (one per
process), `path` (exit | offload | fallback), `reason` (a short fixed vocabulary), `status`,
`role` (broker | worker | edge).

Metrics are built on a registry passed in (client_python's `registry=`): a process uses
`for_registry(EdgeMetrics)` on the global registry, an in-process test builds a fresh
`CollectorRegistry` and reads values back with `registry.get_sample_value(name, labels)`.

Derived figures are PromQL, not gauges, so that they stay right across processes and
restarts (see PROMQL below).

Multiprocess mode: a launcher (`up`, `workers -n`, `edge -n`) sets PROMETHEUS_MULTIPROC_DIR
before its children import prometheus_client (monitoring.exposition does it), so each child
writes its own files and the launcher's one endpoint serves the sum. Gauges therefore carry
a `multiprocess_mode`; Info and Enum metrics are not used (multiprocess mode lacks them).
"""

from __future__ import annotations

import threading
import weakref

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ProcessMetrics", "EdgeMetrics", "WorkerMetrics", "BrokerMetrics", "for_registry",
           "CounterDeltas",
           "PATHS", "ROLES", "LATENCY_BUCKETS_S", "HEAD_BUCKETS_S", "PROMQL", "READY"]

PATHS = ("exit", "offload", "fallback")       # how a frame got its final answer
ROLES = ("broker", "worker", "edge")          # what a process is, for `splitexit_ready`
READY = "splitexit_ready"

# From 0.1 ms (a local exit) to 2.5 s (far past any deadline), ~2x apart.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5)
# Head + exit per frame: 20 to 130 µs on this machine's 2 cores, so from 5 µs up.
HEAD_BUCKETS_S = (0.000005, 0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002,
                  0.005, 0.01)
# Frames per tail call: powers of two up to the largest max_batch worth running.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ProcessMetrics:
    """What every process exports: readiness (a probe and `up` wait on it) and bad input."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.ready = Gauge(READY, "1 once this process can do its job: a broker bound, a "
                           "worker confirmed by the broker, an edge connected with its head "
                           "loaded", ["role"], multiprocess_mode="livesum", registry=registry)
        self.handshake_failures = Counter("splitexit_handshake_failures",
                                          "CURVE handshakes with the broker that failed: this "
                                          "key is not allowed, or the broker key is wrong",
                                          ["role"], registry=registry)
        self.build_info = Gauge("splitexit_build_info", "1, labelled with the splitexit "
                                "version and the model id this process runs (empty for a "
                                "broker)", ["role", "version", "model_id"],
                                multiprocess_mode="livemax", registry=registry)
        self.bad_messages = Counter("splitexit_bad_messages",
                                    "Messages dropped or refused as malformed",
                                    ["component", "reason"], registry=registry)


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.frames = Counter("splitexit_edge_frames", "Frames given their final answer, by "
                              "path", ["producer", "path"], registry=registry)
        self.fallbacks = Counter("splitexit_edge_fallbacks",
                                 "Offloaded frames answered locally after all, by reason",
                                 ["producer", "reason"], registry=registry)
        self.uplink_bytes = Counter("splitexit_edge_uplink_bytes",
                                    "Bytes of requests put on the wire, ZeroMQ framing included",
                                    ["producer"], registry=registry)
        self.feature_bytes = Counter("splitexit_edge_feature_bytes",
                                     "Bytes of the quantized features before compression",
                                     ["producer"], registry=registry)
        self.payload_bytes = Counter("splitexit_edge_payload_bytes",
                                     "Bytes of the feature payloads as sent (after lz4, if it "
                                     "helped)", ["producer"], registry=registry)
        self.requests = Counter("splitexit_edge_requests", "Requests by outcome: answered, "
                                "refused, deadline, unreachable", ["producer", "status"],
                                registry=registry)
        self.latency = Histogram("splitexit_edge_latency_seconds",
                                 "Capture to final answer, by path", ["producer", "path"],
                                 buckets=LATENCY_BUCKETS_S, registry=registry)
        self.unfamiliar = Counter("splitexit_edge_unfamiliar_frames", "Frames unlike the "
                                  "training set, by whose score flagged them: edge (never the "
                                  "exit's answer, offloaded) or tail (answered unknown)",
                                  ["producer", "where"], registry=registry)
        self.head = Histogram("splitexit_edge_head_seconds", "Head + exit time per frame",
                              ["producer"], buckets=HEAD_BUCKETS_S, registry=registry)
        self.source_dropped = Counter("splitexit_edge_source_dropped_frames",
                                      "Frames a live source (camera, stream) skipped to stay "
                                      "current: the head was slower than the source",
                                      ["producer"], registry=registry)
        self.source_reconnects = Counter("splitexit_edge_source_reconnects",
                                         "Times a live source was lost and reopened",
                                         ["producer"], registry=registry)
        self.threshold = Gauge("splitexit_edge_threshold", "The exit threshold in use: frames "
                               "whose calibrated score is below it are offloaded", ["producer"],
                               multiprocess_mode="livesum", registry=registry)
        self.controller_target = Gauge("splitexit_edge_controller_target", "The target the "
                                       "budget controller holds, by kind: offload_ratio or "
                                       "uplink_bytes_per_second", ["producer", "kind"],
                                       multiprocess_mode="livesum", registry=registry)
        self.controller_ratio = Gauge("splitexit_edge_controller_ratio", "The offload ratio "
                                      "the controller aims at now: the target's, or less while "
                                      "the server cap binds", ["producer"],
                                      multiprocess_mode="livesum", registry=registry)
        self.controller_state = Gauge("splitexit_edge_controller_state", "0 tracking the "
                                      "target, 1 backing off from a refusing server, 2 "
                                      "recovering", ["producer"], multiprocess_mode="livesum",
                                      registry=registry)
        self.exit_confidence = Counter("splitexit_edge_exit_confidence",
                                       "Sum of the calibrated confidences of frames answered "
                                       "on the edge: / their count = the accuracy the exit "
                                       "claims", ["producer"], registry=registry)
        self.shadows = Counter("splitexit_edge_shadow_frames", "Exited frames also sent to "
                               "the server to measure the exit (never offloads), by outcome: "
                               "sent, answered, dropped", ["producer", "outcome"],
                               registry=registry)
        self.shadow_agreements = Counter("splitexit_edge_shadow_agreements",
                                         "Answered shadow frames whose tail class is the "
                                         "exit's", ["producer"], registry=registry)
        self.shadow_exit_correct = Counter("splitexit_edge_shadow_exit_correct",
                                           "Answered shadow frames weighted by the tail's "
                                           "confidence where it agrees with the exit: / "
                                           "answered = the exit's accuracy, the tail judging",
                                           ["producer"], registry=registry)
        self.shadow_bytes = Counter("splitexit_edge_shadow_bytes", "Bytes of shadow requests "
                                    "put on the wire (not in uplink_bytes)", ["producer"],
                                    registry=registry)
        self.duplicates = Counter("splitexit_edge_duplicate_answers",
                                  "Answers for frames already final (late or redelivered), "
                                  "discarded", ["producer"], registry=registry)
        self.broker_up = Gauge("splitexit_edge_broker_up", "1 while the edge counts a broker "
                               "as live (linked, and answering its requests), by endpoint",
                               ["producer", "broker"], multiprocess_mode="livesum",
                               registry=registry)
        self.broker_requests = Counter("splitexit_edge_broker_requests", "Requests sent, by "
                                       "broker endpoint: where the offloads go",
                                       ["producer", "broker"], registry=registry)
        self.bad_replies = Counter("splitexit_edge_bad_replies",
                                   "Replies dropped as untrue, by reason: class_range, "
                                   "confidence_range, answer_count, unknown_msg_id (their "
                                   "frames wait for the deadline)", ["producer", "reason"],
                                   registry=registry)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.requests = Counter("splitexit_worker_requests", "Requests by status: ok, or why "
                                "refused", ["worker", "status"], registry=registry)
        self.frames = Counter("splitexit_worker_frames", "Frames run through the tail",
                              ["worker"], registry=registry)
        self.tail = Histogram("splitexit_worker_tail_seconds", "Tail time per batch",
                              ["worker"], buckets=LATENCY_BUCKETS_S, registry=registry)
        self.batch = Histogram("splitexit_worker_batch_frames", "Frames per tail call",
                               ["worker"], buckets=BATCH_BUCKETS, registry=registry)
        self.held = Gauge("splitexit_worker_held_requests", "Requests received and not yet "
                          "answered (waiting for their batch)", ["worker"],
                          multiprocess_mode="livesum", registry=registry)
        self.queue = Histogram("splitexit_worker_queue_seconds",
                               "Wait in the worker between arrival and its batch", ["worker"],
                               buckets=LATENCY_BUCKETS_S, registry=registry)


class BrokerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.requests = Counter("splitexit_broker_requests",
                                "Edge requests by status: dispatched, busy, shadows_refused, "
                                "duplicate (msg_id already in flight), expired (in the queue), "
                                "expired_held (in a worker's hands)",
                                ["status"], registry=registry)
        self.queue_depth = Gauge("splitexit_broker_queue_depth", "Requests waiting for a "
                                 "worker", multiprocess_mode="livesum", registry=registry)
        self.workers = Gauge("splitexit_broker_workers", "Live workers",
                             multiprocess_mode="livesum", registry=registry)
        self.free_credit = Gauge("splitexit_broker_free_credit",
                                 "Requests the live workers can still take",
                                 multiprocess_mode="livesum", registry=registry)
        self.drops = Counter("splitexit_broker_dropped_messages",
                             "Messages the broker could not deliver: peer gone or not reading",
                             ["reason"], registry=registry)
        self.redeliveries = Counter("splitexit_broker_redeliveries",
                                    "Requests sent again after their worker went silent",
                                    registry=registry)
        self.replies_dropped = Counter("splitexit_broker_replies_dropped",
                                       "Worker replies not forwarded: unknown_worker (no "
                                       "READY), not_held (not given that request, or it went "
                                       "to another), late (it expired in that worker's hands)",
                                       ["reason"], registry=registry)


# Keyed on the registry itself, weakly: an id() outlives its registry and is reused by the
# next one, which then got a metric set bound to the dead one; and a registry freed frees
# its sets.
_built: weakref.WeakKeyDictionary[CollectorRegistry, dict[type, object]] = \
    weakref.WeakKeyDictionary()
_built_lock = threading.Lock()


def for_registry(cls: type, registry: CollectorRegistry = REGISTRY):
    """The one instance of a metric set on a registry (a registry refuses a name twice)."""
    with _built_lock:
        sets = _built.setdefault(registry, {})
        if cls not in sets:
            sets[cls] = cls(registry)
        return sets[cls]


class CounterDeltas:
    """Running counts a pure core keeps (no Prometheus inside: the scheduler's, the shadows',
    a source's), copied into counters as what grew since the last copy: one write per
    changed count per pass, not one per event (in multiprocess mode every write is a file
    write). `counters`: each count's name -> the counter (or labelled child) it feeds."""

    def __init__(self, counters: dict[str, Counter]):
        self.counters = dict(counters)
        self.last = dict.fromkeys(self.counters, 0)

    def export(self, counts: dict[str, int]) -> None:
        """`counts`: name -> the running total now, for some or all of the names."""
        for name, total in counts.items():
            if total > self.last[name]:
                self.counters[name].inc(total - self.last[name])
                self.last[name] = total


# The PromQL that dashboards, `splitexit up` and the tests use, over a 1-minute window (5
# minutes for shadows: at 2 % of exits a minute holds too few of them).
PROMQL = {
    "offload_ratio": 'sum(rate(splitexit_edge_frames_total{path!="exit"}[1m])) '
                     '/ sum(rate(splitexit_edge_frames_total[1m]))',
    "uplink_bytes_per_second": "sum(rate(splitexit_edge_uplink_bytes_total[1m]))",
    "uplink_bytes_per_offloaded_frame":
        'sum(rate(splitexit_edge_uplink_bytes_total[1m])) '
        '/ sum(rate(splitexit_edge_frames_total{path!="exit"}[1m]))',
    "frames_per_second": "sum(rate(splitexit_edge_frames_total[1m]))",
    "fallbacks_per_second": "sum by (reason) (rate(splitexit_edge_fallbacks_total[1m]))",
    # Frames unlike the training set, as a share of all frames: flagged by the edge's score
    # (offloaded), and answered `unknown` by the tail's
    "unfamiliar_ratio": "sum by (where) (rate(splitexit_edge_unfamiliar_frames_total[1m])) "
                        "/ ignoring(where) group_left "
                        "sum(rate(splitexit_edge_frames_total[1m]))",
    "compression_ratio": "sum(rate(splitexit_edge_feature_bytes_total[1m])) "
                         "/ sum(rate(splitexit_edge_payload_bytes_total[1m]))",
    "latency_p99_seconds": "histogram_quantile(0.99, sum by (path, le) "
                           "(rate(splitexit_edge_latency_seconds_bucket[1m])))",
    "exit_threshold": "max by (producer) (splitexit_edge_threshold)",
    "controller_ratio": "max by (producer) (splitexit_edge_controller_ratio)",
    "controller_target_ratio":
        'max by (producer) (splitexit_edge_controller_target{kind="offload_ratio"})',
    "controller_state": "max by (producer) (splitexit_edge_controller_state)",
    "exit_claimed_accuracy": "sum(rate(splitexit_edge_exit_confidence_total[1m])) "
                             '/ sum(rate(splitexit_edge_frames_total{path="exit"}[1m]))',
    "shadow_agreement": "sum(rate(splitexit_edge_shadow_agreements_total[5m])) / "
                        'sum(rate(splitexit_edge_shadow_frames_total{outcome="answered"}[5m]))',
    "shadow_exit_accuracy": "sum(rate(splitexit_edge_shadow_exit_correct_total[5m])) / sum("
                            'rate(splitexit_edge_shadow_frames_total{outcome="answered"}[5m]))',
    "queue_depth": "sum(splitexit_broker_queue_depth)",
    "broker_busy_per_second": 'sum(rate(splitexit_broker_requests_total{status="busy"}[1m]))',
    "broker_dropped_per_second":
        "sum by (reason) (rate(splitexit_broker_dropped_messages_total[1m]))",
    "tail_p99_seconds": "histogram_quantile(0.99, sum by (le) "
                        "(rate(splitexit_worker_tail_seconds_bucket[1m])))",
    "worker_queue_p99_seconds": "histogram_quantile(0.99, sum by (le) "
                                "(rate(splitexit_worker_queue_seconds_bucket[1m])))",
    "batch_frames_mean": "sum(rate(splitexit_worker_batch_frames_sum[1m])) "
                         "/ sum(rate(splitexit_worker_batch_frames_count[1m]))",
    "workers": "sum(splitexit_broker_workers)",
}
