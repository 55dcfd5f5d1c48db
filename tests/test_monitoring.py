"""Metrics: exposition after a real run matches what the run did, `top` reads it, and a real
Prometheus server computes the same offload ratio and bytes as the run's JSONL results."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from monitoring.dashboard import PANELS, dashboard, expressions
from monitoring import exposition
from monitoring.metrics import PROMQL
from monitoring.top import format_table, scrape, summarize
from pipeline.model.config import CONFIG_DIR
from tests.conftest import ROOT, free_port
from workers.pool import LAUNCHER_STOP_BOUND_S, START_TIMEOUT_S, die_with_parent, \
    wait_until

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class UpRun:
    """`splitexit up` in a subprocess that keeps serving metrics after its replay."""

    def __init__(self, artifacts, idx_dir, run_dir: Path, hold_s: float = 60.0,
                 fps: float = 400.0, port: int | None = None):
        self.port = port or free_port()
        self.run_dir = run_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "up", "--artifacts", str(artifacts),
             "--data", str(idx_dir), "--fps", str(fps), "--run-dir", str(run_dir),
             "--metrics-port", str(self.port), "--hold", str(hold_s), "--deadline-ms", "2000",
             "--frontend", f"tcp://127.0.0.1:{free_port()}",
             "--backend", f"tcp://127.0.0.1:{free_port()}"],
            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            preexec_fn=partial(die_with_parent, os.getpid()))   # and pytest killed: gone too
        self.url = f"http://127.0.0.1:{self.port}/metrics"

    def wait_for_replay(self, timeout_s: float = START_TIMEOUT_S) -> None:
        end = time.monotonic() + timeout_s
        for line in self.proc.stderr:
            if "replay done" in line:
                return
            assert time.monotonic() < end, "up did not finish its replay"
        raise AssertionError(f"up exited early: {self.proc.wait()}")

    def outcomes(self) -> list[dict]:
        return [json.loads(line) for path in sorted(self.run_dir.glob("edge-*.jsonl"))
                for line in path.read_text().splitlines()]

    def stop(self) -> None:
        """Ctrl-C, and wait for `up` to exit: it stops within LAUNCHER_STOP_BOUND_S, its
        children with it, or the test fails (what it left is killed, by the conftest check
        if not here). The rest of its output is read meanwhile: nothing reads the pipes
        after the replay, and a full pipe would block its last lines."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.communicate(timeout=LAUNCHER_STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError(f"up did not stop within {LAUNCHER_STOP_BOUND_S} s of SIGINT")


def samples(url: str) -> dict:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] += s.value
    return out


def total(values: dict, name: str, **match) -> float:
    return sum(v for (n, labels), v in values.items()
               if n == name and all(dict(labels).get(k) == w for k, w in match.items()))


def test_dashboard_file_is_the_generated_one():
    committed = json.loads((ROOT / "configs" / "grafana-dashboard.json").read_text())
    assert committed == dashboard()
    assert PROMQL["offload_ratio"] in [e for _, _, targets in PANELS for _, e in targets]
    # Grafana chooses every rate window (a fixed one is empty at a 1 m scrape interval)
    exprs = [t["expr"] for p in committed["panels"] for t in p["targets"]]
    assert all("[" not in e or "[$__rate_interval]" in e for e in exprs)
    assert not any(re.search(r"\[\d+[smh]\]", e) for e in exprs)
    # ... and narrows every selector to the instances (and producers) picked
    assert all(e.count("splitexit_") == e.count('instance=~"$instance"') for e in exprs)
    variables = {v["name"] for v in committed["templating"]["list"]}
    assert {"datasource", "instance", "producer"} <= variables


def test_exposition_after_a_run_matches_the_results(artifacts, idx_dir, tmp_path):
    run = UpRun(artifacts, idx_dir, tmp_path / "up")
    try:
        run.wait_for_replay()
        values = samples(run.url)
        top = summarize(scrape([run.url]), scrape([run.url]))
        assert http_ok(run.url.replace("/metrics", "/ready"))  # broker and workers still up
    finally:
        run.stop()
    outcomes = run.outcomes()
    paths = Counter(o["path"] for o in outcomes)
    assert len(outcomes) == 300
    for path in ("exit", "offload", "fallback"):
        assert total(values, "splitexit_edge_frames_total", path=path) == paths[path]
    assert total(values, "splitexit_edge_frames_total") == 300  # exit + offload + fallback
    assert total(values, "splitexit_edge_uplink_bytes_total") == sum(
        o["uplink_bytes"] for o in outcomes)
    offloaded = paths["offload"] + paths["fallback"]
    assert total(values, "splitexit_edge_latency_seconds_count", path="offload") == \
        paths["offload"]
    assert total(values, "splitexit_worker_frames_total") == paths["offload"]
    assert total(values, "splitexit_broker_requests_total", status="dispatched") == \
        total(values, "splitexit_edge_requests_total", status="answered")
    assert offloaded > 0 and total(values, "splitexit_broker_workers") == 2
    assert top["up"] == {run.url: True} and top["frames_total"] == 300


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:   # ./run.sh installs it: CI never skips
        pytest.skip("promtool not installed (Debian package prometheus; ./run.sh installs it)")
    return path


def test_metric_names_pass_promtool(artifacts, idx_dir, tmp_path, promtool):
    run = UpRun(artifacts, idx_dir, tmp_path / "up")
    try:
        run.wait_for_replay()
        text = urllib.request.urlopen(run.url, timeout=5).read()
    finally:
        run.stop()
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def prometheus_query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


def http_ok(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=5).status == 200
    except OSError:  # not listening yet, or not ready (503)
        return False


def scalar(base: str, expr: str) -> float | None:
    r = prometheus_query(base, expr)
    return float(r["data"]["result"][0]["value"][1]) if r["data"]["result"] else None


def test_the_shipped_scrape_config_and_alert_rules_pass_promtool(promtool):
    """prometheus.yml (which loads alerts.yml) is a valid config, the rules are valid, and
    each alert fires when it should and not before (tests/promtool/alerts_test.yml)."""
    for args, where in ((["check", "config", "prometheus.yml"], CONFIG_DIR),
                        (["check", "rules", "alerts.yml"], CONFIG_DIR),
                        (["test", "rules", "alerts_test.yml"], ROOT / "tests" / "promtool")):
        r = subprocess.run([promtool, *args], cwd=where, capture_output=True, text=True)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])
    assert "6 rules found" in subprocess.run([promtool, "check", "rules", "alerts.yml"],
                                             cwd=CONFIG_DIR, capture_output=True,
                                             text=True).stdout


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((CONFIG_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_rule_is_tested_firing_and_not_firing():
    """tests/promtool/alerts_test.yml holds, for every alert, a moment it must fire and one
    it must not (before its `for`, or on a look-alike: another broker, an optional target)."""
    cases = yaml.safe_load((ROOT / "tests" / "promtool" / "alerts_test.yml").read_text())
    fires, quiet = set(), set()
    for case in cases["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert fires == names and quiet == names


def test_every_alert_rule_links_its_runbook_section():
    """runbook_url is a path from the repository's root to a heading named after the alert
    (docs/runbook.md: one section per alert)."""
    from tests.test_docs import anchors

    for rule in alert_rules():
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert (ROOT / path).is_file() and path.startswith("docs/"), rule["alert"]
        assert anchor == rule["alert"].lower() and anchor in anchors(ROOT / path), rule["alert"]


def test_a_real_prometheus_agrees_with_the_results(artifacts, idx_dir, tmp_path):
    if not Path(PROMETHEUS).exists():
        pytest.skip("prometheus not installed (Debian package prometheus; ./run.sh installs it)")
    metrics_port, prom_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 500ms\nscrape_configs:\n"
                      f"  - job_name: up\n    static_configs:\n"
                      f"      - targets: ['127.0.0.1:{metrics_port}']\n")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=partial(die_with_parent, os.getpid()))
    base = f"http://127.0.0.1:{prom_port}"
    wait_until(lambda: http_ok(f"{base}/-/ready"), START_TIMEOUT_S, "Prometheus ready", [prom])
    # 300 frames over ~5 s: Prometheus (scraping every 0.5 s) sees the counters rise
    run = UpRun(artifacts, idx_dir, tmp_path / "up", hold_s=60, fps=30, port=metrics_port)
    try:
        run.wait_for_replay()
        outcomes = run.outcomes()
        paths = Counter(o["path"] for o in outcomes)
        expected_ratio = (paths["offload"] + paths["fallback"]) / len(outcomes)
        expected_bytes = sum(o["uplink_bytes"] for o in outcomes)
        ratio_expr = ('sum(splitexit_edge_frames_total{path!="exit"}) '
                      '/ sum(splitexit_edge_frames_total)')
        wait_until(lambda: scalar(base, "sum(splitexit_edge_frames_total)") == len(outcomes),
                   START_TIMEOUT_S, "Prometheus scraping the final counts", [prom, run.proc])
        # two more scrapes, so rate() windows have points after the end
        scrapes = scalar(base, 'count_over_time(up{job="up"}[1h])')
        wait_until(lambda: scalar(base, 'count_over_time(up{job="up"}[1h])') >= scrapes + 2,
                   START_TIMEOUT_S, "two more scrapes", [prom, run.proc])
        ratio = float(prometheus_query(base, ratio_expr)["data"]["result"][0]["value"][1])
        sent = float(prometheus_query(base, "sum(splitexit_edge_uplink_bytes_total)")
                     ["data"]["result"][0]["value"][1])
        assert ratio == pytest.approx(expected_ratio, abs=1e-12)
        assert sent == expected_bytes
        for expr in expressions():  # every dashboard query is valid PromQL on these names
            r = prometheus_query(base, expr)
            assert r["status"] == "success", (expr, r)
        shipped = prometheus_query(base, PROMQL["offload_ratio"])["data"]["result"]
        assert shipped and 0 < float(shipped[0]["value"][1]) <= 1
    finally:
        prom.terminate()
        prom.wait(10)
        run.stop()


class Exporter:
    """A real /metrics endpoint on a free port serving whatever `text` says now: a process
    whose counters the test sets, restarts (lower values) or stops."""

    def __init__(self, port: int = 0):
        import http.server
        import threading

        exporter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = exporter.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.text = ""
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def counters(self, frames_exit: int, frames_offload: int, fallbacks: int) -> None:
        self.text = (
            "# TYPE splitexit_edge_frames_total counter\n"
            f'splitexit_edge_frames_total{{path="exit"}} {frames_exit}\n'
            f'splitexit_edge_frames_total{{path="offload"}} {frames_offload}\n'
            "# TYPE splitexit_edge_fallbacks_total counter\n"
            f'splitexit_edge_fallbacks_total{{reason="deadline"}} {fallbacks}\n')

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def exporters():
    made = []
    yield lambda port=0: made.append(Exporter(port)) or made[-1]
    for e in made:
        e.close()


def test_top_counts_a_restarted_or_vanished_endpoint_as_a_reset_never_a_negative_rate(
        exporters):
    steady, restarting, leaving = exporters(), exporters(), exporters()
    steady.counters(100, 50, 1)
    restarting.counters(5000, 3000, 40)
    leaving.counters(9000, 9000, 90)
    endpoints = [steady.url, restarting.url, leaving.url]
    a = scrape(endpoints)
    steady.counters(130, 70, 3)        # +30 exit, +20 offload, +2 fallbacks
    restarting.counters(12, 8, 1)      # restarted: counts from zero, as PromQL's rate()
    leaving.close()                    # gone: adds nothing (it had added 18000 frames)
    b = scrape(endpoints)
    top = summarize(a, b)
    dt = b.time - a.time
    assert top["up"] == {steady.url: True, restarting.url: True, leaving.url: False}
    assert top["frames_per_s"] * dt == pytest.approx(30 + 20 + 12 + 8)
    assert top["offload_ratio"] == pytest.approx((20 + 8) / 70)
    assert top["fallbacks_per_s"]["deadline"] * dt == pytest.approx(2 + 1)
    assert "frames/s -" not in format_table(top)
    # An endpoint that comes back adds its rise from then on, not its whole history.
    exporters(leaving.server.server_address[1]).counters(500, 500, 5)
    c = scrape(endpoints)
    assert c.up[leaving.url] and summarize(b, c)["frames_per_s"] == 0


def test_top_shows_a_dead_endpoint_as_down_and_fails_when_none_answers(exporters):
    from tests.test_cli import one_line_failure

    live, dead = exporters(), f"http://127.0.0.1:{free_port()}/metrics"
    live.counters(10, 10, 0)
    summary = summarize(scrape([dead]), scrape([dead]))
    assert summary["up"] == {dead: False} and summary["frames_per_s"] == 0
    assert f"{dead} DOWN" in format_table(summary)

    def top(*endpoints):
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "top", *endpoints,
                               "--count", "1", "--interval", "0.1"], capture_output=True,
                              text=True, cwd=ROOT, timeout=60)
    r = top(dead, live.url)            # one down, the rest still shows
    assert r.returncode == 0, r.stderr
    assert f"{dead} DOWN" in r.stdout and f"{live.url} up" in r.stdout
    r = top(dead)                      # none answers: the table, then one error line
    one_line_failure(r)
    assert f"{dead} DOWN" in r.stdout and "no endpoint answered" in r.stderr


def test_histogram_quantile_interpolates_like_promql():
    from monitoring.top import _quantile

    buckets = {"0.1": 50.0, "0.2": 100.0, "+Inf": 100.0}  # cumulative counts
    assert _quantile(0.5, buckets) == pytest.approx(0.1)
    assert _quantile(0.75, buckets) == pytest.approx(0.15)
    assert _quantile(0.25, buckets) == pytest.approx(0.05)
    assert _quantile(0.5, {"+Inf": 0.0}) is None


def test_a_child_creating_its_metric_file_does_not_break_a_collection(tmp_path):
    # prometheus-client creates a child's file empty, then sizes it: a scrape in between
    # must skip it, not fail on 0 bytes.
    (tmp_path / "counter_12345.db").write_bytes(b"")
    registry = exposition.multiprocess_registry(tmp_path)
    assert exposition.total(registry, "splitexit_ready") == 0


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        assert reply.status == 200
        return reply.read().decode()


def test_half_open_connections_hold_no_threads_and_a_scrape_is_still_served():
    """#25 finding 10: 300 half-open requests held 300 threads. Now a peer that sends
    nothing, or half a request line, costs no thread: the server's stay bounded, those
    beyond MAX_CONNECTIONS are closed oldest first, and a real scrape is answered."""
    import socket
    import threading

    server = exposition.MetricsServer(0).start()
    peers = []
    try:
        _scrape(server.port)                               # the scrape pool exists now
        before = threading.active_count()
        for i in range(300):
            peer = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            if i % 2:
                peer.sendall(b"GET /metr")                 # a partial request line
            peers.append(peer)
        assert "python_gc_objects_collected_total" in _scrape(server.port)
        assert threading.active_count() <= before + exposition.SCRAPE_THREADS
        # the oldest were closed to make room: the server ends them (EOF), no thread did
        closed = sum(peer.recv(1) == b"" for peer in peers[:300 - exposition.MAX_CONNECTIONS])
        assert closed == 300 - exposition.MAX_CONNECTIONS
    finally:
        for peer in peers:
            peer.close()
        server.close()


def test_a_peer_that_trickles_its_request_is_closed_after_the_head_timeout(monkeypatch):
    """The deadline is for the whole request head, so a byte at a time does not renew it."""
    import socket

    monkeypatch.setattr(exposition, "HEAD_TIMEOUT_S", 0.5)
    server = exposition.MetricsServer(0).start()
    try:
        peer = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        start = time.monotonic()
        with peer:
            peer.settimeout(0.1)
            ended = False
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" * 20:   # bounded: ~6 s
                try:
                    peer.sendall(bytes([byte]))
                    ended = peer.recv(1) == b""            # waits 0.1 s for the server
                except TimeoutError:
                    continue
                except ConnectionError:
                    ended = True
                if ended:
                    break
        assert ended and time.monotonic() - start < 5
        assert "python_gc_objects_collected_total" in _scrape(server.port)
    finally:
        server.close()
