"""The Grafana dashboard, built from the PromQL in monitoring.metrics so the two never drift.

    python -m monitoring.dashboard > configs/grafana-dashboard.json

(tests/test_monitoring.py checks the committed file is what this prints, and runs every
expression in it against a real Prometheus.)
"""

from __future__ import annotations

import json
import re

from monitoring.metrics import PROMQL

__all__ = ["PANELS", "dashboard", "expressions"]

# (title, unit, [(legend, expression)])
PANELS = [
    ("Offload ratio", "percentunit", [("offloaded", PROMQL["offload_ratio"])]),
    ("Frames per second", "short", [("frames", PROMQL["frames_per_second"]),
                                  ("{{reason}} fallbacks", PROMQL["fallbacks_per_second"])]),
    ("Uplink bandwidth", "Bps", [("bytes/s", PROMQL["uplink_bytes_per_second"])]),
    ("Uplink bytes per offloaded frame", "bytes",
     [("bytes/frame", PROMQL["uplink_bytes_per_offloaded_frame"])]),
    ("Latency p99 by path", "s", [("{{path}}", PROMQL["latency_p99_seconds"]),
                                  ("{{path}} p50", PROMQL["latency_p99_seconds"]
                                   .replace("0.99", "0.5", 1))]),
    ("Broker queue depth", "short", [("queued", PROMQL["queue_depth"])]),
    ("Broker refusals and undeliverable messages", "reqps",
     [("busy", PROMQL["broker_busy_per_second"]),
      ("{{reason}}", PROMQL["broker_dropped_per_second"])]),
    ("Worker time per batch: tail and queue, p99", "s",
     [("tail", PROMQL["tail_p99_seconds"]), ("queue", PROMQL["worker_queue_p99_seconds"])]),
    ("Frames per tail call", "short", [("mean batch", PROMQL["batch_frames_mean"])]),
    ("Live workers", "short", [("workers", PROMQL["workers"])]),
    ("Compression ratio", "short", [("features / payload", PROMQL["compression_ratio"])]),
    ("Exit quality in production", "percentunit",
     [("exit-vs-tail agreement (shadows)", PROMQL["shadow_agreement"]),
      ("exit accuracy, the tail judging (shadows)", PROMQL["shadow_exit_accuracy"]),
      ("exit accuracy it claims (mean calibrated confidence)",
       PROMQL["exit_claimed_accuracy"])]),
    ("Unfamiliar frames: flagged by the edge, answered unknown by the tail", "percentunit",
     [("{{where}}", PROMQL["unfamiliar_ratio"])]),
    ("Budget controller: threshold and offload ratio aimed at", "short",
     [("{{producer}} threshold", PROMQL["exit_threshold"]),
      ("{{producer}} aimed ratio", PROMQL["controller_ratio"]),
      ("{{producer}} target ratio", PROMQL["controller_target_ratio"]),
      ("{{producer}} state (1 backing off, 2 recovering)", PROMQL["controller_state"])]),
]


# Grafana picks the window: at least four scrape intervals, whatever Prometheus scrapes at
# (a fixed [1m] is empty under Prometheus' default 1 m interval).
RATE_WINDOW = re.compile(r"\[\d+[smh]\]")
GRAFANA_WINDOW = "[$__rate_interval]"
# Every selector is narrowed to the instances and (edge metrics) producers picked at the top.
SELECTOR = re.compile(r"\b(splitexit_\w+)(?:\{([^}]*)\})?")
VARIABLES = {"instance": "label_values(splitexit_ready, instance)",
             "producer": "label_values(splitexit_edge_frames_total, producer)"}


def for_grafana(expr: str) -> str:
    def narrow(m: re.Match) -> str:
        labels = [m.group(2)] if m.group(2) else []
        labels.append('instance=~"$instance"')
        if m.group(1).startswith("splitexit_edge_"):
            labels.append('producer=~"$producer"')
        return f"{m.group(1)}{{{', '.join(labels)}}}"
    return SELECTOR.sub(narrow, RATE_WINDOW.sub(GRAFANA_WINDOW, expr))


def as_grafana_sends(expr: str, window: str = "1m") -> str:
    """A dashboard query as Grafana sends it with every instance and producer picked."""
    return (expr.replace(GRAFANA_WINDOW, f"[{window}]").replace('"$instance"', '".*"')
            .replace('"$producer"', '".*"'))


def dashboard() -> dict:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(65 + j), "expr": for_grafana(expr), "legendFormat": legend}
                        for j, (legend, expr) in enumerate(targets)],
        })
    return {
        "title": "splitexit", "uid": "splitexit", "schemaVersion": 39, "version": 1,
        "time": {"from": "now-15m", "to": "now"}, "refresh": "5s",
        "templating": {"list": [{"name": "datasource", "type": "datasource",
                                 "query": "prometheus"}] + [
            {"name": name, "type": "query", "query": query, "refresh": 2, "includeAll": True,
             "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
             "datasource": {"type": "prometheus", "uid": "${datasource}"}}
            for name, query in VARIABLES.items()]},
        "panels": panels,
    }


def expressions() -> list[str]:
    """The panels' queries as Prometheus receives them from Grafana, every instance and
    producer picked (what the tests run against a real Prometheus)."""
    return [as_grafana_sends(for_grafana(expr)) for _, _, targets in PANELS
            for _, expr in targets]


if __name__ == "__main__":
    print(json.dumps(dashboard(), indent=2))
