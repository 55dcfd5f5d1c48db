"""`splitexit top`: scrape /metrics endpoints and print a live summary.

Rates come from two scrapes `interval` apart, per series and endpoint as PromQL's rate()
takes them: a counter that went down belongs to a restarted process and counts from zero, and
an endpoint that answered only one of the two scrapes adds nothing (a rate is never negative,
and an endpoint coming back is not a burst of its whole history). Latency quantiles are
interpolated from the histogram buckets the same way PromQL's histogram_quantile does. An
endpoint that does not answer is listed as down and the rest still shows; `run_top` says
whether any answered, so that `splitexit top` fails when none did.
"""

from __future__ import annotations

import sys
import time
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from monitoring.metrics import PATHS

__all__ = ["scrape", "Snapshot", "increases", "summarize", "format_table", "run_top"]

SCRAPE_TIMEOUT_S = 2.0


class Snapshot:
    """Sample values of every endpoint that answered, keyed by (endpoint, name, labels)."""

    def __init__(self):
        self.values: dict[tuple, float] = defaultdict(float)
        self.up: dict[str, bool] = {}
        self.time = time.monotonic()

    def series(self, name: str, **match) -> dict[tuple, float]:
        """{(endpoint, labels): value} of the samples `name` whose labels match."""
        return {(url, labels): v for (url, n, labels), v in self.values.items()
                if n == name and all(dict(labels).get(k) == w for k, w in match.items())}

    def total(self, name: str, **match) -> float:
        return sum(self.series(name, **match).values())

    def by(self, name: str, label: str, **match) -> dict[str, float]:
        return _group(self.series(name, **match), label)


def _group(series: dict[tuple, float], label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (_, labels), v in series.items():
        out[dict(labels).get(label)] += v
    return out


def increases(a: Snapshot, b: Snapshot, name: str, **match) -> dict[tuple, float]:
    """How much each counter series rose from `a` to `b`, never negative: a series lower in
    `b` was reset (its process restarted) and rose by its whole value since; a series whose
    endpoint did not answer both scrapes is left out; one new at an endpoint that answered
    both counts from zero."""
    before = a.series(name, **match)
    return {key: v - before.get(key, 0.0) if v >= before.get(key, 0.0) else v
            for key, v in b.series(name, **match).items() if a.up.get(key[0])}


def scrape(endpoints: list[str]) -> Snapshot:
    snap = Snapshot()
    for url in endpoints:
        try:
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as r:
                text = r.read().decode()
            families = list(text_string_to_metric_families(text))
        except (OSError, ValueError):
            snap.up[url] = False
            continue
        snap.up[url] = True
        for family in families:
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items()
                                      if k not in ("pid",)))
                snap.values[(url, s.name, labels)] += s.value
    return snap


def _quantile(q: float, buckets: dict[str, float]) -> float | None:
    """histogram_quantile over cumulative bucket counts {le: count}."""
    edges = sorted((float(le), c) for le, c in buckets.items())
    if not edges or edges[-1][1] <= 0:
        return None
    rank = q * edges[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in edges:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-12)
        prev_le, prev_c = le, c
    return prev_le


def summarize(a: Snapshot, b: Snapshot) -> dict:
    """Figures for the window between two snapshots (rates) and at b (levels)."""
    dt = max(b.time - a.time, 1e-9)

    def rate(name, **match):
        return sum(increases(a, b, name, **match).values()) / dt

    frames = rate("splitexit_edge_frames_total")
    offloaded = frames - rate("splitexit_edge_frames_total", path="exit")
    uplink = rate("splitexit_edge_uplink_bytes_total")
    payload = rate("splitexit_edge_payload_bytes_total")
    latency = {}
    for path in PATHS:
        window = _group(increases(a, b, "splitexit_edge_latency_seconds_bucket", path=path),
                        "le")
        latency[path] = {q: _quantile(q, window) for q in (0.5, 0.95, 0.99)}
    batches = rate("splitexit_worker_batch_frames_count")
    return {
        "up": b.up,
        "frames_per_s": frames,
        "offload_ratio": offloaded / frames if frames > 0 else None,
        "fallbacks_per_s": {r: v / dt for r, v in _group(
            increases(a, b, "splitexit_edge_fallbacks_total"), "reason").items()},
        "unfamiliar_ratio": {w: v / dt / frames for w, v in _group(
            increases(a, b, "splitexit_edge_unfamiliar_frames_total"), "where").items()}
        if frames > 0 else {},
        "uplink_bytes_per_s": uplink,
        "uplink_bytes_per_offloaded_frame": uplink / offloaded if offloaded > 0 else None,
        "compression_ratio": rate("splitexit_edge_feature_bytes_total") / payload
        if payload > 0 else None,
        "latency_s": latency,
        "queue_depth": b.total("splitexit_broker_queue_depth"),
        "workers": b.total("splitexit_broker_workers"),
        "batch_frames": rate("splitexit_worker_batch_frames_sum") / batches
        if batches > 0 else None,
        "frames_total": b.total("splitexit_edge_frames_total"),
    }


def _fmt(value, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def format_table(s: dict) -> str:
    ms = {p: {q: (v * 1000 if v is not None else None) for q, v in qs.items()}
          for p, qs in s["latency_s"].items()}
    lines = [
        "endpoints: " + ", ".join(f"{url} {'up' if ok else 'DOWN'}" for url, ok in
                                  s["up"].items()),
        f"frames/s {s['frames_per_s']:.1f}   offload ratio {_fmt(s['offload_ratio'], '.1%')}   "
        f"fallbacks/s {({k: round(v, 1) for k, v in s['fallbacks_per_s'].items() if v}) or 0}   "
        f"unfamiliar: edge {s['unfamiliar_ratio'].get('edge', 0):.1%}, unknown "
        f"{s['unfamiliar_ratio'].get('tail', 0):.1%}",
        f"uplink {s['uplink_bytes_per_s']:.0f} B/s, "
        f"{_fmt(s['uplink_bytes_per_offloaded_frame'], '.1f', ' B')}/offloaded frame   "
        f"compression {_fmt(s['compression_ratio'], '.2f', 'x')}",
        f"queue depth {s['queue_depth']:.0f}   workers {s['workers']:.0f}   "
        f"batch {_fmt(s['batch_frames'], '.1f')} frames   total frames {s['frames_total']:.0f}",
        "| path | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for path, q in ms.items():
        lines.append(f"| {path} | {_fmt(q[0.5], '.2f')} | {_fmt(q[0.95], '.2f')} | "
                     f"{_fmt(q[0.99], '.2f')} |")
    return "\n".join(lines)


def run_top(endpoints: list[str], interval_s: float, count: int | None) -> bool:
    """Print `count` summaries (None: until Ctrl-C); whether any endpoint answered the last
    scrape."""
    before = after = scrape(endpoints)
    shown = 0
    try:
        while count is None or shown < count:
            time.sleep(interval_s)
            after = scrape(endpoints)
            table = format_table(summarize(before, after))
            if sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(table + "\n", flush=True)
            before, shown = after, shown + 1
    except KeyboardInterrupt:
        pass
    return any(after.up.values())
