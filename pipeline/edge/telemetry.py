"""The edge's one exporter: what the core counted and the outcomes handed out, into the
metric set of monitoring.metrics (the names live there). Children are bound once per edge;
counts are copied as deltas, gauges written when they change: a few writes per wake-up, not
one per event."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from monitoring.metrics import PATHS, CounterDeltas, EdgeMetrics, ProcessMetrics, for_registry
from pipeline import __version__
from pipeline.edge.core import COUNTS, UNFAMILIAR_WHERE, EdgeCore
from pipeline.edge.inflight import BAD_REPLY_REASONS, FALLBACK_REASONS
from pipeline.edge.results import Outcome

__all__ = ["EdgeTelemetry"]

SOURCE_COUNTS = ("dropped", "reconnects")   # what a live source counts on its capture side
SHADOW_OUTCOMES = ("sent", "answered", "dropped")


class EdgeTelemetry:
    def __init__(self, registry: CollectorRegistry, producer_id: int, model_id: str,
                 core: EdgeCore):
        m, p = for_registry(EdgeMetrics, registry), str(producer_id)
        common = for_registry(ProcessMetrics, registry)
        self.core = core
        self.ready = common.ready.labels("edge")
        common.build_info.labels("edge", __version__, model_id).set(1)
        self.bad_messages = common.bad_messages
        self.handshake_failures = common.handshake_failures.labels("edge")
        self.frames = {path: m.frames.labels(p, path) for path in PATHS}
        self.latency = {path: m.latency.labels(p, path) for path in PATHS}
        self.fallbacks = {r: m.fallbacks.labels(p, r) for r in FALLBACK_REASONS}
        self.head = m.head.labels(p)
        self.core_counts = CounterDeltas({
            "duplicates": m.duplicates.labels(p), "exit_confidence": m.exit_confidence.labels(p),
            "uplink_bytes": m.uplink_bytes.labels(p), "feature_bytes": m.feature_bytes.labels(p),
            "payload_bytes": m.payload_bytes.labels(p), "shadow_bytes": m.shadow_bytes.labels(p),
            **{name: m.requests.labels(p, name.split(".", 1)[1]) for name in COUNTS
               if name.startswith("requests.")},
            **{f"unfamiliar.{w}": m.unfamiliar.labels(p, w) for w in UNFAMILIAR_WHERE}})
        self.bad_replies = CounterDeltas({r: m.bad_replies.labels(p, r)
                                          for r in BAD_REPLY_REASONS})
        self.shadows = CounterDeltas({
            **{o: m.shadows.labels(p, o) for o in SHADOW_OUTCOMES},
            "agreed": m.shadow_agreements.labels(p),
            "exit_correct": m.shadow_exit_correct.labels(p)})
        self.source = CounterDeltas({name: getattr(m, f"source_{name}").labels(p)
                                     for name in SOURCE_COUNTS})
        brokers = core.brokers
        self.broker_requests = CounterDeltas({i: m.broker_requests.labels(p, brokers.endpoint(i))
                                              for i in range(len(brokers))})
        self.broker_up = [m.broker_up.labels(p, brokers.endpoint(i))
                          for i in range(len(brokers))]
        self._brokers_shown: list[bool | None] = [None] * len(brokers)
        self.threshold = m.threshold.labels(p)
        self.threshold.set(core.threshold)
        controller = core.controller
        if controller:
            cfg = controller.cfg
            kind, target = (("offload_ratio", cfg.target_offload) if cfg.target_offload
                            else ("uplink_bytes_per_second", cfg.uplink_budget))
            m.controller_target.labels(p, kind).set(target)
            self.ratio, self.state = m.controller_ratio.labels(p), m.controller_state.labels(p)
        self._controller_shown: tuple | None = None

    def handed_out(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            self.frames[o.path].inc()
            self.latency[o.path].observe(o.latency_ms / 1000)
            if o.reason:
                self.fallbacks[o.reason].inc()

    def ran_head(self, head_ms: float, frames: int) -> None:
        for _ in range(frames):   # per frame, as the histogram's help says
            self.head.observe(head_ms / 1000)

    def export(self, source: object = None) -> None:
        """Copy what grew since the last call: the core's counts, the shadows', a live
        source's, and the controller's and the brokers' states where they changed."""
        core = self.core
        self.core_counts.export(core.counts)
        self.bad_replies.export(core.bad_replies)
        if core.shadows is not None:
            self.shadows.export(vars(core.shadows.counts))   # every ShadowCounts field
        self.broker_requests.export(core.sent_to)
        for i, gauge in enumerate(self.broker_up):
            if (live := core.brokers.live(i)) != self._brokers_shown[i]:
                self._brokers_shown[i] = live
                gauge.set(int(live))
        if source is not None:
            self.source.export({name: getattr(source, name, 0) for name in SOURCE_COUNTS})
        c = core.controller
        if c and (shown := (c.threshold, c.ratio, c.state)) != self._controller_shown:
            self._controller_shown = shown
            self.threshold.set(c.threshold)
            self.ratio.set(c.ratio)
            self.state.set(c.state)
